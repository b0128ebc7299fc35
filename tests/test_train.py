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
from conftest import random_gpt

import gptmini.train as train_mod
from gptmini.checkpoint import CONFIG_FILE, TRAIN_STATE_FILE, load_checkpoint, load_train_state
from gptmini.cli import main
from gptmini.evaluate import eval_windows, evaluate_checkpoint, evaluate_tokens
from gptmini.tokenizer import Tokenizer
from gptmini.train import recover_staged, train

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=32)


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """Token caches go to a temp dir, also for the module-scoped runs below (never into ~/.cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTMINI_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run best on one thread, and a shared 2-core machine stays responsive."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    train([corpus], config=settings(max_iters=3, save_dtype="bfloat16"), model=TINY, out=tmp_path)
    best = json.loads((tmp_path / "best" / CONFIG_FILE).read_text())
    latest = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert best["weights_dtype"] == "bfloat16" and latest["weights_dtype"] == "float32"
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "best") < 0.55 * size(tmp_path)
    a, b = weights(tmp_path / "best"), weights(tmp_path)  # loaded as fp32: equal to bf16 rounding
    for name in a:
        torch.testing.assert_close(a[name], b[name].to(torch.bfloat16).float(), atol=0, rtol=0)


def interrupted_and_resumed_equals_uninterrupted(corpus, tmp_path, *, device: str, dtype: str, atol: float):
    cfg = settings(max_iters=16, grad_accum=2, eval_interval=6, dtype=dtype, device=device)
    model = {**TINY, "dropout": 0.1}  # dropout draws from the RNG: it must be restored too
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


def test_kill_during_save_leaves_a_whole_checkpoint(tmp_path):
    """A process saving again and again is killed at random moments; what is on disk always loads, consistently."""
    script = f"""
import sys, torch
sys.path.insert(0, {str(ROOT / "tests")!r})
from conftest import random_gpt
from gptmini.train import commit_checkpoint
model = random_gpt(n_layer=4, n_embd=128, n_head=4)
for step in range(10**6):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))
    commit_checkpoint(model, sys.argv[1], train_state={{"step": step}}, meta={{"run": {{"step": step}}}})
    if step == 0:
        print("saved", flush=True)
"""
    out = tmp_path / "ckpt"
    for delay in (0.05, 0.2, 0.45):
        proc = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "saved"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        model, info = load_checkpoint(out)  # loadable even before recovery
        recover_staged(out)
        model, info = load_checkpoint(out)
        step = load_train_state(out)["step"]
        assert info["run"]["step"] == step
        assert torch.all(model.lm_head.weight == float(step))


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


def test_time_budget_ends_the_run(corpus, tmp_path):
    result = train(
        [corpus], config=settings(time_budget_s=3.0, warmup_iters=2, log_interval=1), model=TINY, out=tmp_path
    )
    assert result.reason == "time" and result.step > 0
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [lr for lr in lrs if lr is not None]
    assert lrs[-1] < lrs[0]  # the cosine followed the clock down


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


def cli(capsys, *args):
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


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


def test_plot_in_the_terminal(saved_run, capsys):
    code, out, _ = cli(capsys, "plot", saved_run, "--terminal")
    assert code == 0 and "train loss" in out and "step 6" in out


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
        (["CORPUS", "--optimizer", "sgd"], "unknown optimizer 'sgd'; choose muon or adamw"),
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
    train([corpus], config=settings(max_iters=6, eval_interval=2), model=TINY, out=out, evaluator=evaluator)
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
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    state = load_train_state(out)
    assert state["step"] >= 2
    assert json.loads((out / CONFIG_FILE).read_text())["run"]["step"] == state["step"]
    assert (out / TRAIN_STATE_FILE).exists()
