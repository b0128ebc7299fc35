"""--ema: the moving average of the weights that evaluation and best/ use, on tiny models (2 layers, 64 wide)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from gptmini.checkpoint import load_train_state, read_safetensors
from gptmini.cli import main
from gptmini.loading import load_checkpoint
from gptmini.train import train

TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=32)
# Constant lr (no warm-up, no decay): a run of N steps is the first N steps of any longer one.
FLAT = dict(batch_size=8, eval_interval=1000, eval_iters=2, log_interval=1, dtype="float32", device="cpu")
FLAT.update(warmup_iters=0, min_lr_ratio=1.0)


pytestmark = pytest.mark.usefixtures("tmp_token_cache", "one_thread")


def saved_weights(run):
    return read_safetensors(run / "model.safetensors")


def test_the_average_is_the_hand_computed_one_over_three_steps(corpus, tmp_path):
    decay = 0.1  # below the warm-up's 2/12 at the third step: both sides of min(decay, n/(n+10)) are used
    after = []  # the live weights after steps 1, 2, 3 (runs of 1, 2 and 3 steps follow one trajectory)
    for steps in (1, 2, 3):
        train(
            [corpus], config={**FLAT, "max_iters": steps, "ema": 0.0}, model=TINY, out=tmp_path / f"s{steps}"
        )
        after.append(saved_weights(tmp_path / f"s{steps}"))  # without --ema: the live weights
    train([corpus], config={**FLAT, "max_iters": 3, "ema": decay}, model=TINY, out=tmp_path / "ema")
    ema_state = load_train_state(tmp_path / "ema")["ema"]
    assert ema_state["updates"] == 3
    # The average leaves training alone: the live weights (kept in train_state) are the run without it.
    for name, value in ema_state["live"].items():
        torch.testing.assert_close(value, after[2][name], atol=0, rtol=0)
    # e1 = w1 (the random init never counts); e_{n+1} = d_n·e_n + (1 − d_n)·w_{n+1}, d_n = min(decay, n/(n+10)).
    d1, d2 = min(decay, 1 / 11), min(decay, 2 / 12)
    assert d1 == 1 / 11 and d2 == decay
    best = load_checkpoint(tmp_path / "ema" / "best")[0].state_dict()
    run = load_checkpoint(tmp_path / "ema")[0].state_dict()
    for name, w1 in after[0].items():
        expected = d2 * (d1 * w1 + (1 - d1) * after[1][name]) + (1 - d2) * after[2][name]
        torch.testing.assert_close(best[name], expected, atol=1e-6, rtol=0)  # best/ holds the average
        torch.testing.assert_close(run[name], expected, atol=1e-6, rtol=0)  # ... and so does the run's model
    # ... which is not the live weights
    assert max((best[name] - after[2][name]).abs().max().item() for name in after[2]) > 1e-4


def test_interrupted_and_resumed_equals_uninterrupted_with_ema(corpus, tmp_path):
    cfg = dict(FLAT, max_iters=16, grad_accum=2, eval_interval=6, ema=0.9, warmup_iters=4, min_lr_ratio=0.1)
    train([corpus], config=cfg, model=TINY, out=tmp_path / "straight")
    stop_at_7 = lambda event: event.kind == "log" and event.step >= 7  # noqa: E731 - like Ctrl-C at step 7
    first = train([corpus], config=cfg, model=TINY, out=tmp_path / "split", callback=stop_at_7)
    assert first.reason == "interrupted" and first.step == 7
    resumed = train([corpus], out=tmp_path / "split", resume=True)
    assert resumed.reason == "done" and resumed.step == 16
    a, b = load_train_state(tmp_path / "straight")["ema"], load_train_state(tmp_path / "split")["ema"]
    assert a["updates"] == b["updates"] == 16
    for name in a["live"]:
        torch.testing.assert_close(a["live"][name], b["live"][name], atol=1e-6, rtol=0)
    for run in ("", "best"):  # the averages: the run's model and best/
        wa, wb = saved_weights(tmp_path / "straight" / run), saved_weights(tmp_path / "split" / run)
        for name in wa:
            torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=0)
    assert resumed.final.loss == pytest.approx(train_final_loss(tmp_path / "straight"), abs=1e-6)


def test_a_run_saved_with_ema_resumed_without_it_continues_from_the_live_weights(corpus, tmp_path):
    cfg = dict(FLAT, max_iters=10, ema=0.0)
    train([corpus], config=cfg, model=TINY, out=tmp_path / "straight")
    stop_at_5 = lambda event: event.kind == "log" and event.step >= 5  # noqa: E731
    train([corpus], config={**cfg, "ema": 0.9}, model=TINY, out=tmp_path / "split", callback=stop_at_5)
    assert train([corpus], config={"ema": 0.0}, out=tmp_path / "split", resume=True).step == 10
    wa, wb = saved_weights(tmp_path / "straight"), saved_weights(tmp_path / "split")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=0)


def train_final_loss(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"final"' in line][-1]["val_loss"]


@pytest.mark.parametrize("value", ["1.0", "-0.5"])
def test_an_ema_outside_0_1_is_a_one_line_exit_2(corpus, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(corpus), "--out", str(tmp_path / "run"), "--ema", value, "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "ema must be in [0, 1)" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_ranks_with_ema_average_like_one_process_with_twice_the_batch(corpus, tmp_path):
    # Every rank holds the same weights after each step, so each keeps the same average; rank 0 saves it.
    from test_distributed import FLAGS, ROOT, SETTINGS, STEPS, assert_same_weights, torchrun

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # the cache: this module's fixture
    done = torchrun(env, corpus, "--out", tmp_path / "ddp", *FLAGS, "--optimizer", "adamw", "--ema", "0.5")
    assert done.returncode == 0, done.stderr[-3000:]
    settings = {**SETTINGS, "optimizer": "adamw", "ema": 0.5, "batch_size": 8}
    train([corpus], config=settings, model=TINY, out=tmp_path / "one")
    assert load_train_state(tmp_path / "ddp")["ema"]["updates"] == STEPS
    assert_same_weights(tmp_path / "ddp" / "best", tmp_path / "one" / "best", atol=1e-5)
    assert_same_weights(tmp_path / "ddp", tmp_path / "one", atol=1e-5)
