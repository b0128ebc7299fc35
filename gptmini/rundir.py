"""The run directory `gptmini train` writes: checkpoints saved so a kill never leaves half of one, the refusal to
clobber another run, and `metrics.jsonl` (one JSON record per log or eval line).

    OUT/config.json, model.safetensors, train_state.pt   the resumable checkpoint (committed through OUT/.saving/)
    OUT/best/                                           the best-scoring weights, for inference
    OUT/metrics.jsonl                                   the curves (`gptmini plot`)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gptmini.checkpoint import (
    CONFIG_FILE,
    TRAIN_STATE_FILE,
    WEIGHTS_FILE,
    read_checkpoint_info,
    save_checkpoint,
)
from gptmini.errors import UserError
from gptmini.evaluate import EvalResult
from gptmini.plotting import METRICS_FILE

BEST_DIR = "best"
STAGING_DIR = ".saving"
COMPLETE_MARK = "COMPLETE"


# ---- checkpoints ----------------------------------------------------------------------------------------------


def default_out(paths: Sequence[str | Path]) -> Path:
    first = Path(paths[0]) if paths else Path("run")
    return Path("runs") / (first.stem or first.name or "run")


def recover_staged(directory: Path) -> None:
    """Finish or discard a save that was interrupted (see `commit_checkpoint`)."""
    staging = directory / STAGING_DIR
    if not staging.is_dir():
        return
    if (staging / COMPLETE_MARK).exists():
        for name in (WEIGHTS_FILE, TRAIN_STATE_FILE, CONFIG_FILE):
            if (staging / name).exists():
                os.replace(staging / name, directory / name)
    shutil.rmtree(staging, ignore_errors=True)


def commit_checkpoint(
    model: nn.Module,
    directory: str | Path,
    *,
    train_state: dict | None,
    meta: dict,
    save_dtype: torch.dtype | None = None,
) -> None:
    """Save a checkpoint so that a kill at any moment leaves a whole one: the previous or the new.

    Each file is written atomically by `save_checkpoint` into a staging directory; a marker then says the set is
    complete, and only then do the files move into place (a few renames). A save killed before the marker is
    discarded on resume; one killed after it is rolled forward.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)
    save_checkpoint(model, staging, train_state=train_state, meta=meta, save_dtype=save_dtype)
    (staging / COMPLETE_MARK).touch()
    recover_staged(directory)


# ---- the directory --------------------------------------------------------------------------------------------


def run_in(directory: Path) -> dict[str, Any] | None:
    """The `run` record of the training run saved in `directory`, or None if it holds none."""
    if not (directory / CONFIG_FILE).exists():
        return None
    try:
        info = read_checkpoint_info(directory)
    except UserError:
        return None
    return info.get("run")


def check_out_dir(out: Path, *, resume: bool, force: bool) -> dict[str, Any] | None:
    """Refuse to clobber: an --out holding another run needs --resume or --force. Returns the run to resume."""
    if resume and force:
        raise UserError("--resume and --force contradict each other; pass one")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory")
    run = run_in(out) if out.is_dir() else None
    if resume:
        if run is None or not (out / TRAIN_STATE_FILE).exists():
            raise UserError(
                f"nothing to resume in {out} (no training run saved there); start without --resume"
            )
        return run
    if run is not None and not force:
        raise UserError(
            f"{out} already holds a training run (step {run.get('step', '?')}); "
            "pass --resume to continue it or --force to start over"
        )
    if run is None and out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} is not empty and holds no gptmini run; choose another --out or pass --force")
    return None


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to --out {out} ({e.strerror or e})") from None


def open_run_dir(out: Path, *, resumed_at: int | None) -> None:
    """Create `out` for writing. A new run starts a fresh metrics.jsonl and best/; a resumed one keeps the lines
    logged up to its checkpoint's step `resumed_at` (those after it are about to be redone)."""
    check_writable(out)
    if resumed_at is None:
        (out / METRICS_FILE).unlink(missing_ok=True)
        shutil.rmtree(out / BEST_DIR, ignore_errors=True)
    else:
        truncate_metrics(out / METRICS_FILE, resumed_at)


# ---- metrics.jsonl --------------------------------------------------------------------------------------------


def append_metrics(out: Path, record: dict[str, Any]) -> None:
    with open(out / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def eval_record(
    step: int,
    elapsed: float,
    tokens_seen: int,
    train_loss: float | None,
    lr: float | None,
    result: EvalResult,
) -> dict[str, Any]:
    return {
        "step": step,
        "elapsed_s": round(elapsed, 3),
        "tokens_seen": tokens_seen,
        "train_loss": train_loss,
        "val_loss": result.loss,
        "val_ppl": result.ppl,
        "val_bpb": result.bpb,
        "lr": lr,
        "tokens_per_s": None,
    }


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint (those steps are about to be redone)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
