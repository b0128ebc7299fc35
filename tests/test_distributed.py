"""Training under torchrun on this CPU: 2 processes with gloo, tiny models (2 layers, 64 wide, block 32), fp32.

Each launch costs ~10 s here (three Python processes import torch), so the file keeps to five of them: the DDP
reference run, a Ctrl-C'd run and its resume, an FSDP run interrupted and resumed in the same processes, and a run
where one rank fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptmini.checkpoint import load_train_state, read_safetensors
from gptmini.cli import main
from gptmini.config import TrainConfig
from gptmini.loading import load_checkpoint
from gptmini.train import train

pytestmark = pytest.mark.slow  # torchrun: several processes each (run by .ci/run's second step)

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=32)
STEPS = 8
# Per-rank batch 4 on 2 ranks: the global batch of one process with batch 8.
# The CPU and gloo on any machine: with a GPU, "auto" would put the ranks on CUDA (NCCL, bf16).
FLAGS = ["--preset", "tiny", "--block-size", "32", "--max-iters", str(STEPS), "--batch-size", "4"]
FLAGS += ["--dtype", "float32", "--log-interval", "1", "--eval-interval", "4", "--eval-iters", "2"]
# The live weights, no moving average: FSDP runs keep none (tests/test_ema.py checks DDP's).
FLAGS += ["--device", "cpu", "--ema", "0"]
SETTINGS = dict(max_iters=STEPS, dtype="float32", log_interval=1, eval_interval=4, eval_iters=2, device="cpu")
SETTINGS.update(ema=0.0)

# Runs the CLI with train_step wrapped: ACTION runs before each step, with `step` and `rank` set.
PATCHED_CLI = """
import os, signal, sys, time
import gptmini.train as train_mod
from gptmini.cli import main

real_step = train_mod.train_step

def train_step(*args, **kwargs):
    step, rank = args[3], int(os.environ["RANK"])
    ACTION
    return real_step(*args, **kwargs)

train_mod.train_step = train_step
"""
RUN = "main(sys.argv[1:])\n"
# The run stops (exit 130), then `train --out OUT --resume` continues it in the same processes.
RUN_THEN_RESUME = """
try:
    main(sys.argv[1:])
except SystemExit as e:
    print(f"rank {os.environ['RANK']} exited {e.code}", file=sys.stderr)
train_mod.train_step = real_step
main(["train", "--out", sys.argv[sys.argv.index("--out") + 1], "--resume", "--device", "cpu"])
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The token cache in a temp dir (for the launched ranks and for the runs in this process), one thread each."""
    cache = str(tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTMINI_CACHE_DIR", cache)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GPTMINI_CACHE_DIR": cache}
        torch.set_num_threads(threads)


def torchrun(
    env, *args, action: str | None = None, run: str = RUN, tmp: Path | None = None, timeout: float = 180
):
    """`torchrun --standalone --nproc_per_node 2 -m gptmini train ARGS` (or the patched CLI, given an action)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    if action is None:
        command += ["-m", "gptmini"]
    else:
        script = tmp / "patched_cli.py"
        script.write_text(PATCHED_CLI.replace("ACTION", action) + run)
        command += [str(script)]
    proc = subprocess.Popen(
        [*command, "train", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun passes SIGTERM on to the ranks (a SIGKILL would leave them running)
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"torchrun hung for {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def weights(path):
    return load_checkpoint(path)[0].state_dict()


def assert_same_weights(a, b, atol):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=atol, rtol=0, msg=name)


def metrics(path):
    """{(step, kind): record} from metrics.jsonl; each (step, kind) must appear once (rank 0 alone writes)."""
    records = [json.loads(line) for line in (Path(path) / "metrics.jsonl").read_text().splitlines()]
    keyed = {(r["step"], "eval" if r["val_loss"] is not None else "log"): r for r in records}
    assert len(keyed) == len(records), "a step was logged twice"
    return keyed


def assert_same_curves(a, b, atol):
    ma, mb = metrics(a), metrics(b)
    assert ma.keys() == mb.keys()
    for key in ma:
        for field in ("train_loss", "val_loss", "val_bpb"):
            if ma[key][field] is not None:
                assert mb[key][field] == pytest.approx(ma[key][field], abs=atol), (key, field)


@pytest.fixture(scope="module")
def ddp_run(env, corpus, tmp_path_factory):
    """The reference: 2 ranks × batch 4, 8 steps, uninterrupted, through the CLI."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    done = torchrun(env, corpus, "--out", out, *FLAGS)
    assert done.returncode == 0, done.stderr[-3000:]
    # Rank 0 alone reports: one summary, one final eval line.
    assert done.stderr.count("Training run") == 1 and done.stderr.count("final (full val split)") == 1
    return out


@pytest.fixture(scope="module")
def ddp_adamw_run(env, corpus, tmp_path_factory):
    """As ddp_run, with AdamW: the reference for FSDP, which shards the matrices Muon orthogonalises whole."""
    out = tmp_path_factory.mktemp("ddp-adamw") / "run"
    done = torchrun(env, corpus, "--out", out, *FLAGS, "--optimizer", "adamw")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_two_ranks_train_exactly_like_one_process_with_twice_the_batch(ddp_adamw_run, corpus, tmp_path):
    settings = {**SETTINGS, "optimizer": "adamw"}
    one = train([corpus], config={**settings, "batch_size": 8}, model=TINY, out=tmp_path / "one")
    assert one.step == STEPS
    assert_same_weights(ddp_adamw_run, tmp_path / "one", atol=1e-5)
    # The loss of every step, and the evals (each rank scores its share of the windows), match too.
    assert_same_curves(ddp_adamw_run, tmp_path / "one", atol=1e-5)
    # A log line per step, the eval at step 4 and the final one.
    assert len(metrics(ddp_adamw_run)) == STEPS + 2
    # ... and like one process accumulating the two ranks' halves of each batch.
    train([corpus], config={**settings, "batch_size": 4, "grad_accum": 2}, model=TINY, out=tmp_path / "acc")
    assert_same_weights(ddp_adamw_run, tmp_path / "acc", atol=1e-5)


def test_two_ranks_with_muon_in_fp32_train_like_one_process_with_twice_the_batch(env, corpus, tmp_path):
    # The default optimizer with --dtype float32: Muon's Newton–Schulz runs in fp32 too, so the float-rounding
    # differences between 2 ranks' and one process's gradients stay float-sized over 30 steps (iterating in bf16,
    # as bf16 runs do, they grew to 1e-3 here).
    assert TrainConfig().optimizer == "auto"  # which, for this shape and batch, is Muon (asserted below)
    steps = 30
    flags = ["--preset", "tiny", "--block-size", "32", "--max-iters", str(steps), "--dtype", "float32"]
    flags += ["--device", "cpu", "--log-interval", "10", "--eval-interval", "10", "--eval-iters", "2"]
    done = torchrun(env, corpus, "--out", tmp_path / "ddp", *flags, "--batch-size", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    config = dict(
        max_iters=steps, dtype="float32", device="cpu", log_interval=10, eval_interval=10, eval_iters=2
    )
    train([corpus], config={**config, "batch_size": 8}, model=TINY, out=tmp_path / "one")
    from gptmini.rundir import run_in

    assert run_in(tmp_path / "ddp")["train"]["optimizer"] == "muon"
    assert_same_weights(tmp_path / "ddp", tmp_path / "one", atol=1e-4)


def test_ctrl_c_stops_every_rank_cleanly_and_resume_equals_the_uninterrupted_run(
    ddp_run, env, corpus, tmp_path
):
    out = tmp_path / "run"
    # Ctrl-C in a terminal reaches torchrun, which forwards SIGINT to every rank: rank 0 presses it at step 3.
    ctrl_c = "if step == 3 and rank == 0: os.kill(os.getppid(), signal.SIGINT)"
    stopped = torchrun(env, corpus, "--out", out, *FLAGS, action=ctrl_c, tmp=tmp_path)
    assert stopped.returncode != 0
    saved = load_train_state(out)["step"]
    assert 3 <= saved < STEPS, stopped.stderr[-3000:]
    # Every rank stopped at the same step without a traceback; rank 0 alone says so.
    assert stopped.stderr.count(f"interrupted at step {saved}; saved to") == 1, stopped.stderr[-3000:]
    assert "[rank0]: Traceback" not in stopped.stderr and "[rank1]: Traceback" not in stopped.stderr

    resumed = torchrun(env, "--out", out, "--resume", "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(ddp_run, out, atol=1e-6)
    assert_same_curves(ddp_run, out, atol=1e-6)


def test_fsdp_trains_like_ddp_resumes_and_saves_an_ordinary_checkpoint(ddp_adamw_run, env, corpus, tmp_path):
    # FSDP shards the matrices Muon would orthogonalise whole: it trains with AdamW.
    reference = ddp_adamw_run
    out = tmp_path / "fsdp"
    # A Ctrl-C that reaches rank 1 only stops both ranks (at the same step); the resume runs with --fsdp too.
    ctrl_c = "if step == 3 and rank == 1: os.kill(os.getpid(), signal.SIGINT)"
    flags = [*FLAGS, "--fsdp", "--optimizer", "adamw"]
    done = torchrun(env, corpus, "--out", out, *flags, action=ctrl_c, run=RUN_THEN_RESUME, tmp=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 exited 130" in done.stderr and "rank 1 exited 130" in done.stderr
    assert done.stderr.count("× 2 ranks (FSDP)") == 2 and "resuming" in done.stderr
    assert_same_weights(reference, out, atol=1e-5)
    assert_same_curves(reference, out, atol=1e-5)
    # One unsharded model.safetensors (the plain GPT's names), the optimizer state whole: any process loads them.
    names = set(read_safetensors(out / "model.safetensors"))
    assert names == set(read_safetensors(reference / "model.safetensors"))
    # The optimizer state, keyed by name, equals the DDP run's (keyed by position: AdamW's groups hold the
    # matrices, then the vectors, each in named_parameters order).
    state = load_train_state(out)["optimizer"]["state"]
    named = list(load_checkpoint(reference)[0].named_parameters())
    order = [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]
    expected = load_train_state(reference)["optimizer"]["state"]
    assert set(state) == set(order) and len(expected) == len(order)
    for i, name in enumerate(order):
        assert float(state[name]["step"]) == float(expected[i]["step"]) == STEPS, name
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[name][moment], expected[i][moment], atol=1e-5, rtol=1e-4)
    import gptmini

    kw = dict(max_new_tokens=8, temperature=0, ignore_eos=True)
    text = gptmini.load(out, device="cpu").generate("To be", **kw)
    assert text == gptmini.load(reference, device="cpu").generate("To be", **kw)


def test_an_fsdp_run_resumes_in_one_process_without_fsdp(ddp_adamw_run, env, corpus, tmp_path):
    # 2 ranks × 4 under FSDP stop at step 3 or so; one process with batch 8 (the same global batch), no --fsdp,
    # finishes the run: the weights of the uninterrupted 2-rank run.
    out = tmp_path / "fsdp"
    ctrl_c = "if step == 3 and rank == 0: os.kill(os.getppid(), signal.SIGINT)"
    flags = [*FLAGS, "--fsdp", "--optimizer", "adamw"]
    stopped = torchrun(env, corpus, "--out", out, *flags, action=ctrl_c, tmp=tmp_path)
    assert stopped.returncode != 0 and 3 <= load_train_state(out)["step"] < STEPS, stopped.stderr[-3000:]
    resumed = train([corpus], out=out, resume=True, config={"batch_size": 8, "fsdp": False, "device": "cpu"})
    assert resumed.step == STEPS
    assert_same_weights(ddp_adamw_run, out, atol=1e-5)
    assert_same_curves(ddp_adamw_run, out, atol=1e-5)


def test_a_one_process_run_resumes_on_two_ranks(ddp_adamw_run, env, corpus, tmp_path):
    # One process with batch 8 stops at step 3; 2 ranks × 4 finish it: the uninterrupted 2-rank run again.
    out = tmp_path / "one"
    stop_at_3 = lambda event: event.kind == "log" and event.step >= 3  # noqa: E731 - like Ctrl-C at step 3
    config = {**SETTINGS, "optimizer": "adamw", "batch_size": 8}
    first = train([corpus], config=config, model=TINY, out=out, callback=stop_at_3)
    assert first.reason == "interrupted" and first.step == 3
    resumed = torchrun(env, "--out", out, "--resume", "--batch-size", "4", "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "× 2 ranks" in resumed.stderr
    assert_same_weights(ddp_adamw_run, out, atol=1e-5)
    assert_same_curves(ddp_adamw_run, out, atol=1e-5)


def test_a_failing_rank_stops_the_job_promptly_with_its_error_shown_once(env, corpus, tmp_path):
    fail = (
        "if step == 2 and rank == 1:\n"
        "        print(f'failing at {time.time()!r}', file=sys.stderr, flush=True)\n"
        "        raise RuntimeError(f'rank {rank} broke down at step {step}')"
    )
    done = torchrun(env, corpus, "--out", tmp_path / "run", *FLAGS, action=fail, tmp=tmp_path, timeout=120)
    ended = time.time()
    assert done.returncode != 0
    # Measured from the failure, not from the launch (start-up time varies with the machine's load).
    failed_at = float(re.search(r"failing at ([\d.]+)", done.stderr).group(1))
    assert ended - failed_at < 30, (
        f"{ended - failed_at:.0f} s after the failure: rank 0 waited for the dead rank"
    )
    assert done.stderr.count("rank 1 broke down at step 2") == 1, done.stderr[-3000:]
    assert "[rank0]: Traceback" not in done.stderr  # rank 0 lost its peer: it stops without a second trace


def test_fsdp_without_torchrun_is_a_one_line_error(env, corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(corpus), "--out", str(tmp_path / "run"), "--fsdp", "--max-iters", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "torchrun" in err, err
    assert not (tmp_path / "run").exists()


def test_fsdp_with_muon_is_a_one_line_error(env, corpus, tmp_path):
    """Asked for by name: `--optimizer auto` (the default) takes AdamW under --fsdp instead."""
    done = torchrun(
        env, corpus, "--out", tmp_path / "run", *FLAGS, "--fsdp", "--optimizer", "muon", timeout=120
    )
    # Rank 0 says it once and exits 2 (torchrun itself then exits 1, with its own report).
    assert done.returncode != 0 and "exitcode  : 2" in done.stderr, done.stderr[-3000:]
    assert done.stderr.count("error: Muon orthogonalises whole matrices") == 1, done.stderr[-3000:]
    assert not (tmp_path / "run").exists()


# ---- the same on GPUs -----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_with_nccl_train_like_one_gpu_with_twice_the_batch(env, corpus, tmp_path):
    # fp32 (no TF32: PyTorch's default for matmuls) and AdamW: NCCL's all-reduce averages in another order than one
    # process sums, so the weights agree to float rounding, as on the CPU.
    flags = [a for a in FLAGS if a not in ("--device", "cpu")] + ["--device", "cuda", "--optimizer", "adamw"]
    done = torchrun(env, corpus, "--out", tmp_path / "ddp", *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    config = {**SETTINGS, "device": "cuda", "optimizer": "adamw", "batch_size": 8}
    train([corpus], config=config, model=TINY, out=tmp_path / "one")
    assert_same_weights(tmp_path / "ddp", tmp_path / "one", atol=1e-5)
    assert_same_curves(tmp_path / "ddp", tmp_path / "one", atol=1e-5)
