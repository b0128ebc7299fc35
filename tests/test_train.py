"""The training loop, evaluation and the train/eval/plot commands, on tiny models (2 layers, 64 wide)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import main_in_process, random_gpt

import gptmini.train as train_mod
from gptmini.checkpoint import CONFIG_FILE, TRAIN_STATE_FILE, load_train_state
from gptmini.cli import main
from gptmini.evaluate import eval_windows, evaluate_checkpoint, evaluate_tokens
from gptmini.loading import load_checkpoint
from gptmini.rundir import recover_staged
from gptmini.tokenizer import EOT_ID, Tokenizer
from gptmini.train import train

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=32)


pytestmark = pytest.mark.usefixtures("tmp_token_cache", "one_thread")


def settings(**changes):
    """Tiny-run settings on the CPU: on a machine with a GPU, "auto" would train on CUDA in bf16."""
    return {
        **dict(batch_size=8, eval_interval=1000, eval_iters=2, log_interval=5, dtype="float32", device="cpu"),
        **changes,
    }


def weights(path):
    return load_checkpoint(path)[0].state_dict()


# ---- training -------------------------------------------------------------------------------------------------


def test_loss_falls_well_below_uniform(corpus, tmp_path):
    result = train(
        [corpus], config=settings(max_iters=120, lr=3e-3, warmup_iters=10), model=TINY, out=tmp_path
    )
    uniform = math.log(50257)
    assert result.reason == "done" and result.step == 120
    assert result.final.loss < 0.65 * uniform and result.train_loss < 0.65 * uniform
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in (
        "step",
        "elapsed_s",
        "tokens_seen",
        "train_loss",
        "val_loss",
        "val_bpb",
        "lr",
        "tokens_per_s",
    ):
        assert all(key in r for r in records)
    assert records[-1]["val_bpb"] == pytest.approx(result.final.bpb)
    # The saved checkpoint is the trained model: `eval --split val` reproduces the final figures.
    again = evaluate_checkpoint(tmp_path, split="val", device="cpu")
    assert again.loss == pytest.approx(result.final.loss, rel=1e-5)
    assert (tmp_path / "best" / "model.safetensors").exists()


def test_compact_vocabulary_by_default_and_full_gpt2_on_request(corpus, tmp_path, capsys):
    common = settings(max_iters=20, lr=3e-3, warmup_iters=5)
    compact = train([corpus], config=common, model=TINY, out=tmp_path / "compact")
    full = train([corpus], config={**common, "vocab": "gpt2"}, model=TINY, out=tmp_path / "full")
    c_config = load_checkpoint(tmp_path / "compact")[0].config
    limited = train([corpus], config={**common, "vocab": "300"}, model=TINY, out=tmp_path / "limited")
    assert load_checkpoint(tmp_path / "limited")[0].config.vocab_size == 300
    assert abs(limited.final.bytes - full.final.bytes) <= 16
    assert load_checkpoint(tmp_path / "full")[0].config.vocabulary is None
    tok = Tokenizer()
    train_text_ids = set(tok.encode(corpus.read_text(encoding="utf-8")))
    assert c_config.vocab_size == len(c_config.vocabulary) < len(train_text_ids) + 257
    # Bits per byte stay comparable: both score the same val bytes (unknown tokens are spelled with smaller ones;
    # only the unscored first position of the split may differ).
    assert abs(compact.final.bytes - full.final.bytes) <= 16
    # Text the corpus never used still encodes, scores and generates.
    other = tmp_path / "other.txt"
    other.write_text("你好，世界！ Quantum zebras 🎉 " * 20, encoding="utf-8")
    import gptmini

    lm = gptmini.load(tmp_path / "compact", device="cpu")
    first_token = lm.tokenizer.encode(other.read_text(encoding="utf-8"))[0]
    result = evaluate_checkpoint(tmp_path / "compact", [other], device="cpu")
    assert math.isfinite(result.loss)
    assert result.bytes == len(other.read_bytes()) - len(lm.tokenizer.token_bytes(first_token))  # unscored
    completion = lm.generate("你好 zebra", max_new_tokens=5, temperature=0, ignore_eos=True)
    assert 1 <= len(lm.tokenizer.encode(completion)) <= 5 * 4  # 5 tokens, each at most a few bytes
    # A compact vocabulary cannot be written in GPT-2's numbering: a clear refusal.
    with pytest.raises(SystemExit) as exit_info:
        main(["export-hf", str(tmp_path / "compact"), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--vocab gpt2" in err and len(err.strip().splitlines()) == 1


def test_save_dtype_halves_best_and_keeps_the_resumable_checkpoint_fp32(corpus, tmp_path):
    # Without --ema, best/ holds the live weights (rounded): compared with the resumable checkpoint's below.
    train([corpus], config=settings(max_iters=3, save_dtype="bfloat16", ema=0.0), model=TINY, out=tmp_path)
    best = json.loads((tmp_path / "best" / CONFIG_FILE).read_text())
    latest = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert best["weights_dtype"] == "bfloat16" and latest["weights_dtype"] == "float32"
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "best") < 0.55 * size(tmp_path)
    a, b = weights(tmp_path / "best"), weights(tmp_path)  # loaded as fp32: equal to bf16 rounding
    for name in a:
        torch.testing.assert_close(a[name], b[name].to(torch.bfloat16).float(), atol=0, rtol=0)


def interrupted_and_resumed_equals_uninterrupted(
    corpus, tmp_path, *, device: str, dtype: str, atol: float, model_fields=None
):
    cfg = settings(max_iters=16, grad_accum=2, eval_interval=6, dtype=dtype, device=device)
    # dropout draws from the RNG: it must be restored too
    model = {**TINY, "dropout": 0.1, **(model_fields or {})}
    train([corpus], config=cfg, model=model, out=tmp_path / "straight")

    stop_at_7 = lambda event: event.kind == "log" and event.step >= 7  # noqa: E731 - like Ctrl-C at step 7
    first = train(
        [corpus], config={**cfg, "log_interval": 7}, model=model, out=tmp_path / "split", callback=stop_at_7
    )
    assert first.reason == "interrupted" and first.step == 7
    assert load_train_state(tmp_path / "split")["step"] == 7
    resumed = train([corpus], out=tmp_path / "split", resume=True)
    assert resumed.reason == "done" and resumed.step == 16
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0)


def test_interrupted_and_resumed_equals_uninterrupted(corpus, tmp_path):
    # "auto": bf16 autocast on CPUs with bf16 matmuls, fp32 elsewhere; one process repeats itself either way.
    interrupted_and_resumed_equals_uninterrupted(corpus, tmp_path, device="cpu", dtype="auto", atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,atol", [("float32", 1e-6), ("bfloat16", 1e-4)])
def test_interrupted_and_resumed_equals_uninterrupted_on_cuda(corpus, tmp_path, dtype, atol):
    # fp32: the same kernels in the same order, exact as on the CPU. bf16: cuBLAS may pick another algorithm for the
    # resumed process's first matmuls; bf16 autocast turns such reorderings into differences of a bf16 rounding of
    # an update (lr 2e-3 × 2^-8 ≈ 1e-5 a step, 16 steps): 1e-4.
    interrupted_and_resumed_equals_uninterrupted(corpus, tmp_path, device="cuda", dtype=dtype, atol=atol)


# Commits step 0 into BASE, then for each kill point: a forked copy of this process commits step 1 into a copy of
# BASE and SIGKILLs itself just before (or just after) its Nth os.fsync/os.replace, the calls that order a save on
# disk. It prints one JSON line per kill point; the last save is the one that ran to the end unkilled.
KILL_AT_EACH_SYNC = r"""
import json, os, shutil, signal, sys, torch
sys.path.insert(0, sys.argv[2])
torch.set_num_threads(1)  # nothing multithreaded before fork()
from conftest import random_gpt
from gptmini.rundir import commit_checkpoint

base = sys.argv[1] + "/base"
model = random_gpt(n_layer=2, n_embd=32, n_head=2)

def commit(step, directory):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))
    commit_checkpoint(model, directory, train_state={"step": step}, meta={"run": {"step": step}})

commit(0, base)
real = {"fsync": os.fsync, "replace": os.replace}
for n in range(1, 100):
    for when in ("before", "after"):
        directory = f"{sys.argv[1]}/{when}-{n}"
        shutil.copytree(base, directory)
        pid = os.fork()
        if pid == 0:
            calls = [0]
            def hooked(name):
                def call(*args):
                    calls[0] += 1
                    if calls[0] == n and when == "before":
                        os.kill(os.getpid(), signal.SIGKILL)
                    result = real[name](*args)
                    if calls[0] == n and when == "after":
                        os.kill(os.getpid(), signal.SIGKILL)
                    return result
                return call
            os.fsync, os.replace = hooked("fsync"), hooked("replace")
            commit(1, directory)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        print(json.dumps({"dir": directory, "killed": killed}), flush=True)
        if not killed:
            sys.exit(0)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill points are forked processes")
def test_a_kill_at_any_fsync_or_replace_of_a_save_leaves_a_whole_checkpoint(tmp_path):
    """Killed before or after each of a save's fsyncs and renames, in turn: what is on disk always loads; after
    recovery it is wholly the previous checkpoint or wholly the new one, and once a kill point leaves the new one,
    every later one does."""
    from gptmini.rundir import COMPLETE_MARK, STAGING_DIR

    done = subprocess.run(
        [sys.executable, "-c", KILL_AT_EACH_SYNC, str(tmp_path), str(ROOT / "tests")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    points = [json.loads(line) for line in done.stdout.splitlines()]
    assert [p["killed"] for p in points] == [True] * (len(points) - 1) + [False]
    assert len(points) >= 2 * 10  # a save orders itself through at least ten fsyncs and renames
    steps = []
    for point in points:
        directory = Path(point["dir"])
        model, info = load_checkpoint(directory)  # loadable as it was left, before any recovery
        consistent = info["run"]["step"] == load_train_state(directory)["step"] == model.lm_head.weight[0, 0]
        # A mixed directory exists only beside a complete staged save, which recovery rolls forward.
        assert consistent or (directory / STAGING_DIR / COMPLETE_MARK).exists(), point
        recover_staged(directory)
        model, info = load_checkpoint(directory)
        step = load_train_state(directory)["step"]
        assert info["run"]["step"] == step and torch.all(model.lm_head.weight == float(step)), point
        assert not (directory / STAGING_DIR).exists()
        steps.append(step)
    assert (
        steps == sorted(steps) and steps[0] == 0 and steps[-1] == 1
    )  # old until one point, new from then on


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    real_step = train_mod.train_step

    def step_that_explodes(loss_model, optimizer, source, step, **kwargs):
        if step == 7:
            return float("nan"), None
        return real_step(loss_model, optimizer, source, step, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", step_that_explodes)
    result = train([corpus], config=settings(max_iters=20, eval_interval=5), model=TINY, out=tmp_path)
    assert (
        result.reason == "diverged" and "nan" in result.message and "last good checkpoint" in result.message
    )
    assert load_train_state(tmp_path)["step"] == 5  # the save at step 5 is what remains


class FakeClock:
    """`time.perf_counter` for gptmini's modules, moved on by hand: a `--time` run then takes the same steps on any
    machine. Every other `time` function is the real one."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.fixture
def fake_clock(monkeypatch):
    clock = FakeClock()
    for name, module in list(sys.modules.items()):
        if name.startswith("gptmini") and getattr(module, "time", None) is time:
            monkeypatch.setattr(module, "time", clock)
    return clock


def one_second_per_step(clock, stop_at: int | None = None):
    """A train() callback: each step's log event moves the clock on 1 s; at `stop_at` it stops the run."""

    def callback(event) -> bool:
        if event.kind == "log":
            clock.now += 1.0
            return event.step == stop_at
        return False

    return callback


TIMED = dict(time_budget_s=10.0, max_iters=None, warmup_iters=2, log_interval=1, lr=3e-3, min_lr_ratio=0.1)


def expected_time_lrs(budget: float = 10.0) -> list[float]:
    """By hand: step s starts s seconds in; linear warm-up over 2 steps, then cosine in elapsed/budget."""
    lr, floor = 3e-3, 3e-4
    return [
        lr * (s + 1) / 2 if s < 2 else floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * s / budget))
        for s in range(int(budget))
    ]


def logged_lrs(out) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["lr"] for r in records if r["lr"] is not None]


def test_time_budget_follows_the_clock_and_ends_the_run(corpus, tmp_path, fake_clock):
    result = train(
        [corpus], config=settings(**TIMED), model=TINY, out=tmp_path, callback=one_second_per_step(fake_clock)
    )
    # 10 s of budget at 1 s a step: ten steps, each with the lr of its place on the clock.
    assert result.reason == "time" and result.step == 10
    assert logged_lrs(tmp_path) == pytest.approx(expected_time_lrs(), rel=1e-9)


def test_a_time_run_resumes_where_its_clock_stopped(corpus, tmp_path, fake_clock):
    straight = train(
        [corpus],
        config=settings(**TIMED),
        model=TINY,
        out=tmp_path / "straight",
        callback=one_second_per_step(fake_clock),
    )
    out = tmp_path / "split"
    first = train(
        [corpus],
        config=settings(**TIMED),
        model=TINY,
        out=out,
        callback=one_second_per_step(fake_clock, stop_at=4),
    )
    assert first.reason == "interrupted" and first.step == 4
    assert load_train_state(out)["elapsed_s"] == pytest.approx(4.0)
    fake_clock.now += 3600.0  # time between the runs is not training time
    resumed = train([corpus], out=out, resume=True, callback=one_second_per_step(fake_clock))
    assert resumed.reason == "time" and resumed.step == straight.step == 10
    assert resumed.elapsed_s == pytest.approx(10.0)
    assert logged_lrs(out) == pytest.approx(expected_time_lrs(), rel=1e-9)
    a, b = weights(tmp_path / "straight"), weights(out)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def test_learning_rate_schedule():
    from gptmini.config import TrainConfig

    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_iters=10, max_iters=110)
    assert train_mod.learning_rate(cfg, 0, 0.0) == pytest.approx(0.1)
    assert train_mod.learning_rate(cfg, 9, 0.0) == pytest.approx(1.0)
    assert train_mod.learning_rate(cfg, 60, 0.5) == pytest.approx(0.55)
    assert train_mod.learning_rate(cfg, 110, 1.0) == pytest.approx(0.1)


# ---- evaluation -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,block,stride", [(100, 32, None), (33, 32, None), (97, 32, 8), (10, 32, None), (2, 4, 1)]
)
def test_windows_score_every_target_once(n, block, stride):
    scored = []
    for begin, length, skip in eval_windows(n, block, stride):
        assert 1 <= length <= block
        scored += range(begin + 1 + skip, begin + 1 + length)
    assert scored == list(range(1, n))


def test_bits_per_byte_equals_hand_computation():
    tok = Tokenizer()
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 3
    ids = np.array(tok.encode(text), dtype=np.uint16)
    model = random_gpt(std=0.1, block_size=16)
    lengths = np.array([len(tok.token_bytes(i)) for i in range(50257)])
    got = evaluate_tokens(model, ids, lengths, batch_size=3)
    # By hand: full logits, F.cross_entropy per non-overlapping 16-token window, bytes of the predicted text.
    nats, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 16):
            x = torch.tensor(ids[start : start + 16], dtype=torch.long)[None]
            y = torch.tensor(ids[start + 1 : start + 17], dtype=torch.long)[None]
            x = x[:, : y.shape[1]]
            logits = model(x)[0]
            nats += F.cross_entropy(logits[0].double(), y[0], reduction="sum").item()
            count += y.shape[1]
    n_bytes = len(tok.decode(ids[1:].tolist()).encode("utf-8"))
    assert got.tokens == count == len(ids) - 1 and got.bytes == n_bytes
    assert got.loss == pytest.approx(nats / count, rel=1e-5)
    assert got.bpb == pytest.approx(nats / (n_bytes * math.log(2)), rel=1e-5)
    assert got.ppl == pytest.approx(math.exp(nats / count), rel=1e-5)


# ---- command line ---------------------------------------------------------------------------------------------


cli = main_in_process


def snapshot(directory):
    return {
        p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(Path(directory).rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def saved_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    train([corpus], config=settings(max_iters=6, eval_interval=3), model=TINY, out=out)
    return out


def test_eval_command_json_and_split(saved_run, corpus, capsys):
    code, out, _ = cli(capsys, "eval", corpus, "-c", saved_run, "--json", "--device", "cpu")
    assert code == 0
    whole = json.loads(out)
    code, out, _ = cli(capsys, "eval", "-c", saved_run, "--split", "val", "--json", "--device", "cpu")
    val = json.loads(out)
    assert set(whole) >= {"loss", "ppl", "bpb"} and val["tokens"] < whole["tokens"] / 5
    expected = evaluate_checkpoint(saved_run, [corpus], split="val", device="cpu")
    assert val["bpb"] == pytest.approx(expected.bpb)


def test_eval_quantize_scores_the_quantized_weights(saved_run, corpus, capsys):
    """`eval --quantize`: the int8 / int4 model's own full logits, scored by hand, on the same windows."""
    import torch.nn.functional as F

    from gptmini.evaluate import head_loss_sum
    from gptmini.loading import load_checkpoint
    from gptmini.loss import IGNORE_INDEX
    from gptmini.quantize import prepare_for_decoding

    fp32 = json.loads(cli(capsys, "eval", corpus, "-c", saved_run, "--json", "--device", "cpu")[1])
    for scheme in ("int8", "int4"):
        code, out, _ = cli(
            capsys, "eval", corpus, "-c", saved_run, "--json", "--device", "cpu", "--quantize", scheme
        )
        got = json.loads(out)
        assert code == 0 and got["tokens"] == fp32["tokens"]
        assert got["bpb"] != fp32["bpb"] and got["bpb"] == pytest.approx(fp32["bpb"], rel=0.05)
        model = prepare_for_decoding(load_checkpoint(saved_run, device="cpu")[0], quantize=scheme)
        x = torch.randint(0, model.config.vocab_size, (2, 16))
        y = torch.randint(0, model.config.vocab_size, (2, 16))
        y[0, :3] = IGNORE_INDEX  # ignored positions
        # int8 quantises activations per call, over the batch it is given: a sequence alone rounds a hair apart.
        with torch.no_grad():
            logits = model(x)[0][..., : model.config.vocab_size].float()
            by_hand = F.cross_entropy(
                logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            assert float(head_loss_sum(model, model.hidden_states(x), y)) == pytest.approx(
                float(by_hand), rel=1e-4
            )


def test_plot_in_the_terminal(saved_run, capsys):
    code, out, _ = cli(capsys, "plot", saved_run, "--terminal")
    assert code == 0 and "train loss" in out and "step 6" in out


def test_plot_writes_a_png_of_both_curves(saved_run, tmp_path, capsys):
    image = pytest.importorskip("matplotlib.image")
    code, _, err = cli(capsys, "plot", saved_run, "--png", tmp_path / "loss.png")
    assert code == 0 and f"wrote {tmp_path / 'loss.png'}" in err
    png = tmp_path / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(png)
    assert pixels.shape[:2] == (540, 960)  # 8 × 4.5 inches at 120 dpi
    # Both series are drawn: matplotlib's first two colours (train loss C0 blue, val loss C1 orange) are there.
    rgb = (pixels[..., :3] * 255).round()
    for colour in ((31, 119, 180), (255, 127, 14)):
        assert (abs(rgb - torch.tensor(colour).numpy()).max(-1) < 8).sum() > 50, colour
    # Without matplotlib, the same command draws in the terminal.
    import importlib.util

    real_find_spec = importlib.util.find_spec
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else real_find_spec(n, *a)
        )
        code, out, _ = cli(capsys, "plot", saved_run)
    assert code == 0 and "train loss" in out and not (saved_run / "loss.png").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--split", "test"], "split must be all or val, got 'test'"),
        (["--batch-size", "0"], "batch-size must be a positive integer"),
        (["--stride", "0"], "stride must be in [1, 32] (the block size)"),
        (["--stride", "33"], "stride must be in [1, 32] (the block size)"),
        (["--dtype", "float64"], "unknown dtype 'float64'"),
        (["--dtype", "float16"], "float16"),
        (["--encoding-errors", "bogus"], "encoding-errors must be strict or replace, got 'bogus'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--quantize", "int3"], "unknown quantization 'int3'; choose none, int8, int4, or int4-32"),
        (["--bogus"], "No such option: --bogus"),
        (["NOFILES"], "no text given; pass FILES (or --split val"),
        (["/no/such.txt"], "does not exist"),
        (["BAD_UTF8"], "is not valid UTF-8 (byte offset 3)"),
        (["-c", "/no/such/dir"], "does not exist"),
    ],
)
def test_eval_mistakes_are_one_line_exit_2(saved_run, corpus, tmp_path, capsys, args, message):
    (tmp_path / "bad.txt").write_bytes(b"ok \xff tail")
    files = {"NOFILES": [], "BAD_UTF8": [tmp_path / "bad.txt"]}.get(args[0])
    if files is not None:
        args = [*files, *args[1:]]
    elif not args[0].startswith("/"):
        args = [corpus, *args]
    if "-c" not in args:
        args = [*args, "-c", saved_run]
    code, out, err = cli(capsys, "eval", *args, *(["--device", "cpu"] if "--device" not in args else []))
    assert code == 2 and out == "", err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_vocab_corpus_keeps_every_token_the_corpus_uses(corpus, tmp_path):
    tok = Tokenizer()
    byte_ids = {tok.encoding.encode_single_token(bytes([b])) for b in range(256)}
    train([corpus], config=settings(max_iters=1, vocab="corpus"), model=TINY, out=tmp_path)
    # By hand: the GPT-2 ids of the whole text (val split included), the 256 byte tokens and <|endoftext|>.
    used = set(tok.encode(corpus.read_text(encoding="utf-8")))
    config = load_checkpoint(tmp_path)[0].config
    assert config.vocabulary == sorted(used | byte_ids | {EOT_ID})
    assert config.vocab_size == len(config.vocabulary)
    # The README's figure for the whole of Shakespeare, counted the same way.
    everything = set(tok.encode((ROOT / "data" / "shakespeare.txt").read_text(encoding="utf-8")))
    assert len(everything | byte_ids | {EOT_ID}) == 19_553


def inductor_compiles() -> bool:
    try:
        return bool(torch.compile(lambda x: x * 2 + 1)(torch.ones(3)).sum() == 9)
    except Exception:  # no C++ compiler, an unsupported platform: inductor cannot run here
        return False


def test_train_compile_follows_the_eager_run(corpus, tmp_path):
    if not inductor_compiles():
        pytest.skip("torch.compile (inductor) cannot compile on this machine")
    config = settings(max_iters=3, log_interval=1)
    eager = train([corpus], config=config, model=TINY, out=tmp_path / "eager")
    compiled = train([corpus], config={**config, "compile": True}, model=TINY, out=tmp_path / "compiled")
    # The same math, fused differently: fp32 losses and weights agree to float rounding.
    assert compiled.step == eager.step == 3
    a, b = (
        [json.loads(line)["train_loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("eager", "compiled")
    )
    assert b == pytest.approx(a, abs=1e-5)
    wa, wb = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert wa.keys() == wb.keys()  # plain names: no `_orig_mod.` prefix
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "args,message",
    [
        (["/no/such.txt"], "does not exist"),
        (["EMPTY"], "corpus is empty"),
        (["BINARY"], "looks binary"),
        (["SHORT"], "too short for one training and one validation window"),
        (["CORPUS", "--n-embd", "64", "--n-head", "3"], "divisible by n_head"),
        (["CORPUS", "--n-layer", "0"], "n_layer must be a positive integer"),
        (["CORPUS", "--batch-size", "0"], "batch-size must be a positive integer"),
        (["CORPUS", "--time", "-5m"], "duration"),
        (["CORPUS", "--vocab", "100"], "vocab must be corpus, gpt2 or a number of tokens above 257"),
        (["CORPUS", "--vocab", "big"], "vocab must be corpus, gpt2 or a number"),
        (["CORPUS", "--out", "FILE/sub"], "cannot write to --out"),
        (["CORPUS", "--out", "EMPTYDIR", "--resume"], "nothing to resume"),
        (["CORPUS", "--out", "RUN"], "already holds a training run"),
        (["CORPUS", "--out", "RUN", "--resume", "--n-embd", "128"], "different model config"),
        (["CORPUS", "--optimizer", "sgd"], "unknown optimizer 'sgd'; choose auto, muon or adamw"),
        (["CORPUS", "--out", "RUN", "--resume", "--optimizer", "adamw"], "trained with --optimizer muon"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_touches_nothing(args, message, corpus, saved_run, tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "short.txt").write_text("Too short for two windows of 33 tokens.")
    (tmp_path / "file").write_text("x")
    (tmp_path / "emptydir").mkdir()
    names = dict(
        EMPTY=tmp_path / "empty.txt",
        BINARY=tmp_path / "binary.txt",
        SHORT=tmp_path / "short.txt",
        CORPUS=corpus,
        FILE=tmp_path / "file",
        EMPTYDIR=tmp_path / "emptydir",
        RUN=saved_run,
    )
    head = lambda a: a.split("/", 1)[0]  # noqa: E731
    args = [str(names[head(a)]) + a[len(head(a)) :] if head(a) in names else a for a in args]
    before_run, before_tmp = snapshot(saved_run), snapshot(tmp_path)
    code, _, err = cli(capsys, "train", *args, "--max-iters", "2", "--device", "cpu")
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert snapshot(saved_run) == before_run and snapshot(tmp_path) == before_tmp


def test_best_compares_the_final_model_on_the_same_windows_as_the_evals_before(corpus, tmp_path):
    from gptmini.evaluate import EvalResult

    # Each eval of the usual subset scores better than the last; the full split at the end scores worse than all of
    # them (as a harder, larger sample can). The final model is the best one and must land in best/.
    subset_losses = iter([3.0, 2.0, 1.0, 0.5])

    def evaluator(gpt, final):
        loss = 9.0 if final else next(subset_losses)
        return EvalResult(loss=loss, ppl=math.exp(loss), bpb=loss, tokens=1, bytes=1)

    out = tmp_path / "run"
    config = settings(max_iters=6, eval_interval=2, ema=0.0)  # best/ = the live weights of the step it chose
    train([corpus], config=config, model=TINY, out=out, evaluator=evaluator)
    best, last = weights(out / "best"), weights(out)
    assert all(torch.equal(best[k], last[k]) for k in last)  # the final weights, not step 4's


def test_a_run_saved_before_muon_existed_resumes_with_adamw(corpus, tmp_path):
    out = tmp_path / "old"
    train([corpus], config=settings(max_iters=2, optimizer="adamw"), model=TINY, out=out)
    saved = json.loads((out / "config.json").read_text())
    del saved["run"]["train"]["optimizer"]  # what an older gptmini wrote
    (out / "config.json").write_text(json.dumps(saved))
    assert train([corpus], config={"max_iters": 4}, out=out, resume=True).step == 4


def test_ctrl_c_saves_and_exits_cleanly(corpus, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptmini", "train", str(corpus), "--out", str(out), "--preset", "tiny"]
        + ["--block-size", "32", "--time", "5m", "--log-interval", "1", "--eval-interval", "100000"]
        + ["--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    metrics = out / "metrics.jsonl"
    try:  # Ctrl-C once two steps are logged (or the run has died: then its error shows below)
        deadline = time.monotonic() + 120
        while proc.poll() is None and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert time.monotonic() < deadline, "no step logged in 120 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    state = load_train_state(out)
    assert state["step"] >= 2
    assert json.loads((out / CONFIG_FILE).read_text())["run"]["step"] == state["step"]
    assert (out / TRAIN_STATE_FILE).exists()
