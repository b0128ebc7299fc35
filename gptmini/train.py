"""The training loop: text in, checkpoint directory out.

    batches (BatchSource) ─▶ GPT hidden states ─▶ chunked LM-head cross-entropy ─▶ backward ─▶ clip ─▶ AdamW

The loop never prints: it reports `TrainEvent`s to a callback (the CLI renders them with rich). Everything a run
needs to continue exactly — weights, optimizer moments, step, elapsed time, RNG state — is saved together, and a
step's batches depend only on (seed, step), so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from gptmini.checkpoint import (
    CONFIG_FILE,
    TRAIN_STATE_FILE,
    WEIGHTS_FILE,
    load_checkpoint,
    load_state_into,
    load_train_state,
    read_checkpoint_info,
    read_model_config,
    read_safetensors,
    save_checkpoint,
)
from gptmini.config import PRESETS, GPTConfig, TrainConfig
from gptmini.data import BatchSource, RandomWindows, check_split, load_corpus, token_byte_lengths
from gptmini.devices import (
    autocast,
    dtype_name,
    keep_freed_memory_on_cpu,
    resolve_device,
    resolve_train_dtype,
    synchronize,
)
from gptmini.errors import UserError
from gptmini.evaluate import EvalResult, eval_windows, evaluate_tokens, evenly_spaced, window_batch
from gptmini.loss import IGNORE_INDEX, linear_cross_entropy
from gptmini.model import GPT
from gptmini.optim import make_optimizer
from gptmini.plotting import METRICS_FILE
from gptmini.tokenizer import Tokenizer

BEST_DIR = "best"
STAGING_DIR = ".saving"
COMPLETE_MARK = "COMPLETE"
DEFAULT_PRESET = "small"
# Model fields that --init-from / --resume may not change (they fix the weights' shapes).
SHAPE_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "pos_embedding")
# A collective that waits longer than this fails instead of hanging (e.g. a rank lost on another node).
DIST_TIMEOUT = timedelta(minutes=10)
# Rank 0 alone tokenises a new corpus while the others wait: that may take hours for a large one.
DATA_TIMEOUT = timedelta(hours=24)
# How gloo's collectives fail when another rank has died: that rank shows its own error, this one stops quietly.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


@dataclass
class TrainEvent:
    """One report from the loop. kind: data | start | log | eval | save | end."""

    kind: str
    step: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    out: Path
    step: int
    reason: str  # done | time | interrupted | diverged
    elapsed_s: float
    tokens_seen: int
    train_loss: float | None
    final: EvalResult | None  # full validation split at the end (None if interrupted/diverged)
    best_val_loss: float | None
    message: str = ""


Callback = Callable[[TrainEvent], Any]


# ---- schedule -------------------------------------------------------------------------------------------------


def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over `warmup_iters` steps, then cosine from lr down to lr·min_lr_ratio as progress → 1.

    `progress` is the fraction of the run done (of max_iters, or of the time budget), so the same formula serves
    step-bounded and time-bounded runs.
    """
    if step < config.warmup_iters:
        return config.lr * (step + 1) / config.warmup_iters
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


class LossModel(nn.Module):
    """GPT + chunked LM-head cross-entropy in one module, so DDP and torch.compile see the whole step.

    Named `module` so `checkpoint.unwrap` finds the GPT inside. Returns (summed loss, number of scored positions).
    """

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.module = gpt

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.module.hidden_states(x)
        loss_sum = linear_cross_entropy(
            hidden, self.module.lm_head.weight, y, vocab_size=self.module.config.vocab_size
        )
        return loss_sum, (y != IGNORE_INDEX).sum()


# ---- run directory --------------------------------------------------------------------------------------------


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


# ---- model config ---------------------------------------------------------------------------------------------


def build_model_config(
    preset: str | None, overrides: dict[str, Any], base: GPTConfig | None = None, what: str = ""
) -> GPTConfig:
    """The model shape: a base (resumed run / init checkpoint) or a preset, then the flags given on top."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if base is not None:
        if preset is not None:
            raise UserError(
                f"--preset cannot be combined with {what}: the model shape comes from the checkpoint"
            )
        changed = {k: v for k, v in overrides.items() if k in SHAPE_FIELDS and getattr(base, k) != v}
        if changed:
            diffs = ", ".join(f"{k} {getattr(base, k)} → {v}" for k, v in changed.items())
            raise UserError(
                f"{what} has a different model config ({diffs}); drop those flags or use a new --out"
            )
        return base.replace(**overrides)
    name = preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


# ---- the loop -------------------------------------------------------------------------------------------------


class _StopFlag:
    """Ctrl-C sets a flag the loop checks between steps (a second Ctrl-C aborts at once).

    Under torchrun the terminal's Ctrl-C reaches the launcher, which forwards one SIGINT to each worker (they run in
    sessions of their own); the loop's all-reduce of the flag then stops every rank at the same step.
    """

    def __init__(self) -> None:
        self.stop = False
        # A second SIGINT aborts; a stop set another way (another rank's Ctrl-C, the callback) does not count.
        self._signalled = False
        self._previous: Any = None

    def __enter__(self) -> _StopFlag:
        with contextlib.suppress(ValueError):  # not the main thread: no signal handling
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self._signalled:
            raise KeyboardInterrupt
        self._signalled = self.stop = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


_started_group = False  # gptmini started the default process group (once per process)


def _end_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class RankFailed(UserError):
    """Under torchrun: another rank failed first and printed why; this one stops without repeating it."""

    already_reported = True

    def __init__(self) -> None:
        super().__init__("another rank failed (its error is shown by that rank)")


@dataclass
class Distributed:
    """Data parallelism under torchrun: each rank trains on its slice of every global batch (see RandomWindows),
    DDP (or FSDP) averages the gradients, and only rank 0 writes files or reports.

    The process group comes from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR…): NCCL on CUDA, gloo on
    CPU. Started here, it ends at once on an error (the other ranks' collectives fail instead of waiting) and
    otherwise when the process exits: it cannot be started again in the same process (torchrun's store already
    holds its keys), and another `train()` in this process reuses it.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # gptmini started the default process group (a caller's own group is left alone)
    data_group: Any = None  # gloo, long timeout: the others wait here while rank 0 tokenises

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_name: str) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local)
        global _started_group
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=DIST_TIMEOUT)
            _started_group = True
            atexit.register(_end_process_group)
        data_group = dist.new_group(backend="gloo", timeout=DATA_TIMEOUT)
        return cls(rank, local, world, _started_group, data_group)

    def close(self, *, failed: bool = False) -> None:
        """End this run's data group and, after a failure, the process group gptmini started."""
        if not self.enabled:
            return
        import torch.distributed as dist

        if failed and self.owns_group:
            _end_process_group()
        elif dist.is_initialized():
            dist.destroy_process_group(self.data_group)

    def device(self, device: torch.device) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.enabled and device.type == "cuda" else device

    def reduce(self, values: list[float], device: torch.device, op: str = "mean") -> list[float]:
        """The mean, sum or max of `values` over all ranks, so every rank takes the same decisions."""
        if not self.enabled:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            t /= self.world_size
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on rank 0 first (checks, tokenising into the cache), then on the others (which find the
        cache filled). If a rank fails, the others stop too, quietly (`RankFailed`): the error is shown once."""
        if not self.enabled:
            yield
            return
        if not self.is_main and self._any_failed(False):  # rank 0 failed
            raise RankFailed()
        try:
            yield
        except BaseException:
            self._any_failed(True)
            raise
        if self.is_main:
            self._any_failed(False)  # the others are waiting for rank 0
        if self._any_failed(False):  # all ranks are through: did any of them fail?
            raise RankFailed()

    def _any_failed(self, failed: bool) -> bool:
        import torch.distributed as dist

        t = torch.tensor([float(failed)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.data_group)
        return bool(t.item())


def train(
    paths: Sequence[str | Path] = (),
    *,
    config: TrainConfig | dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    preset: str | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    init_from: str | Path | None = None,
    callback: Callback | None = None,
    train_data: BatchSource | None = None,
    evaluator: Callable[[GPT, bool], EvalResult] | None = None,
) -> TrainResult:
    """Train a GPT on text files and save it to `out` (see the module docstring and `gptmini train --help`).

    `config` is a TrainConfig, or a dict of the settings to change (on --resume, the saved run's settings are the
    base). `model` holds GPTConfig fields to change from the preset. `train_data` replaces the text windows by any
    BatchSource (e.g. chat fine-tuning); validation then still uses the val split of `paths`, unless
    `evaluator(model, final)` is given to score the model instead (chat fine-tuning: held-out conversations).
    The callback may return True to stop the run gracefully, exactly as Ctrl-C does.

    Under torchrun every rank calls this: it joins the process group (see `Distributed`), trains on its slice of
    each batch, and only rank 0 reports and writes files.
    """
    out = Path(out) if out is not None else default_out(paths)
    overrides = config.to_dict() if isinstance(config, TrainConfig) else dict(config or {})
    dist = Distributed.from_env(_device_flag(overrides, out, resume))
    try:
        result = _train(
            dist,
            paths,
            overrides=overrides,
            model=model,
            preset=preset,
            out=out,
            resume=resume,
            force=force,
            init_from=init_from,
            callback=callback,
            train_data=train_data,
            evaluator=evaluator,
        )
    except BaseException as e:
        dist.close(failed=True)
        if isinstance(e, Exception) and dist.enabled and any(words in str(e) for words in PEER_GONE):
            raise RankFailed() from e
        raise
    dist.close()
    return result


def _device_flag(overrides: dict[str, Any], out: Path, resume: bool) -> str:
    """--device, else the resumed run's: the process group (NCCL or gloo) starts before the rest is checked."""
    if overrides.get("device"):
        return str(overrides["device"])
    run = run_in(out) if resume and out.is_dir() else None
    return str(((run or {}).get("train") or {}).get("device") or "auto")


def _train(
    dist: Distributed,
    paths: Sequence[str | Path],
    *,
    overrides: dict[str, Any],
    model: dict[str, Any] | None,
    preset: str | None,
    out: Path,
    resume: bool,
    force: bool,
    init_from: str | Path | None,
    callback: Callback | None,
    train_data: BatchSource | None,
    evaluator: Callable[[GPT, bool], EvalResult] | None,
) -> TrainResult:
    report = (callback or (lambda event: None)) if dist.is_main else (lambda event: None)

    # 1. Validate everything before writing anything. Rank 0 goes first: a mistake is reported once, and a new
    # corpus is tokenised into the cache once, by rank 0; the other ranks then find it there.
    with dist.main_first():
        run = check_out_dir(out, resume=resume, force=force)
        if run is not None:
            tcfg = TrainConfig.from_dict(
                {**run["train"], **{k: v for k, v in overrides.items() if v is not None}}
            )
            saved_optimizer = TrainConfig.from_dict(run["train"]).optimizer
            if tcfg.optimizer != saved_optimizer:
                raise UserError(
                    f"the run in {out} trained with --optimizer {saved_optimizer}; resume it with the same optimizer"
                )
            base_model = read_model_config(out)[0]
            mcfg = build_model_config(preset, model or {}, base_model, f"the run in {out}")
            if init_from is not None:
                raise UserError("--init-from cannot be combined with --resume")
            paths = list(paths) or run["data"]["files"]
        else:
            tcfg = TrainConfig(**{k: v for k, v in overrides.items() if v is not None})
            base_model = read_model_config(init_from)[0] if init_from is not None else None
            mcfg = build_model_config(preset, model or {}, base_model, f"--init-from {init_from}")
        if not paths:
            raise UserError("no corpus given; pass one or more text files or directories")
        if tcfg.fsdp and not dist.enabled:
            raise UserError(
                "--fsdp shards the model over torchrun's processes: launch with "
                "`torchrun --nproc_per_node N -m gptmini train …` (N > 1), or pass --no-fsdp"
            )
        if tcfg.fsdp and tcfg.optimizer == "muon":
            raise UserError("Muon orthogonalises whole matrices, which --fsdp shards; add --optimizer adamw")
        if tcfg.fsdp and (train_data is not None or evaluator is not None):
            raise UserError("--fsdp is for `gptmini train` only; fine-tuning runs data parallel without it")

        report(TrainEvent("data", 0, {"files": [str(p) for p in paths]}))
        corpus = load_corpus(paths, encoding_errors=tcfg.encoding_errors)
        train_tokens, val_tokens = corpus.split(tcfg.val_fraction)  # GPT-2 ids
        if run is None and init_from is None and tcfg.vocab != "gpt2":
            # A fresh model gets rows only for the tokens its corpus uses (see gptmini.tokenizer): the whole corpus,
            # val split included, as a full GPT-2 vocabulary also has rows for the val text's tokens. With a limit,
            # the most frequent tokens *of the train split* (what a tokenizer trained on that text would keep).
            limit = tcfg.vocab_limit
            tokenizer = Tokenizer.for_text_tokens(
                corpus.tokens if limit is None else train_tokens, max_size=limit
            )
            mcfg = mcfg.replace(vocab_size=tokenizer.n_vocab, vocabulary=tokenizer.vocabulary.tolist())
        else:
            tokenizer = Tokenizer(mcfg.vocabulary)
        train_tokens, val_tokens = (
            np.asarray(tokenizer.from_gpt2(t), dtype=np.uint16) for t in (train_tokens, val_tokens)
        )
        if evaluator is None:  # with an evaluator, the text split is not used for validation
            check_split(train_tokens, val_tokens, mcfg.block_size, len(corpus.tokens))
        if run is not None and run["data"]["key"] != corpus.key:
            raise UserError(
                f"the corpus differs from the one the run in {out} trained on; resume with the same files"
            )
        token_bytes = token_byte_lengths(tokenizer, mcfg.vocab_size)

        device = dist.device(resolve_device(tcfg.device))
        dtype = resolve_train_dtype(tcfg.dtype, device)
        state = load_train_state(out) if run is not None else None

    if device.type == "cpu":
        keep_freed_memory_on_cpu()
    torch.manual_seed(tcfg.seed)
    # FSDP builds the model in host memory; fully_shard then moves only this rank's shard to the device.
    home = torch.device("cpu") if tcfg.fsdp else device
    if init_from is not None:
        gpt, _ = load_checkpoint(init_from, device=home)
        gpt.config.dropout = mcfg.dropout
        for m in gpt.modules():
            if isinstance(m, nn.Dropout):
                m.p = mcfg.dropout
        for block in gpt.transformer.h:
            block.attn.dropout = mcfg.dropout
    else:
        gpt = GPT(mcfg).to(home)
    if state is not None:
        load_state_into(gpt, read_safetensors(out / WEIGHTS_FILE), out / WEIGHTS_FILE)
    gpt.train()
    loss_model: nn.Module = LossModel(gpt)
    eval_model = loss_model  # evaluation runs it eagerly: never compiled, never through DDP
    if tcfg.fsdp:
        shard(loss_model, device, dist.world_size)
    optimizer = make_optimizer(gpt, tcfg, device)
    step, elapsed_before, tokens_seen, best_val = 0, 0.0, 0, None
    if state is not None:
        load_optimizer_state(gpt, optimizer, state["optimizer"], fsdp=tcfg.fsdp)
        step = int(state["step"])
        elapsed_before = float(state["elapsed_s"])
        tokens_seen = int(state["tokens_seen"])
        best_val = state.get("best_val_loss")
        _set_rng_state(state["rng"], device)

    source = train_data or RandomWindows(
        train_tokens,
        mcfg.block_size,
        tcfg.batch_size,
        seed=tcfg.seed,
        grad_accum=tcfg.grad_accum,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    if tcfg.compile:
        loss_model = torch.compile(loss_model)
    if dist.enabled and not tcfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        loss_model = DistributedDataParallel(
            loss_model, device_ids=[device.index] if device.type == "cuda" else None
        )

    # 2. Now the directory: create it, start or continue metrics.jsonl.
    metrics_path = out / METRICS_FILE
    if dist.is_main:
        check_writable(out)
        if run is None:
            metrics_path.unlink(missing_ok=True)
            shutil.rmtree(out / BEST_DIR, ignore_errors=True)
        else:
            _truncate_metrics(metrics_path, step)

    flops_per_token = gpt.flops_per_token(training=True)
    tokens_per_step = tcfg.batch_size * tcfg.grad_accum * dist.world_size * mcfg.block_size
    run_meta = {
        "train": tcfg.to_dict(),
        "data": {"files": [str(p) for p in corpus.files], "key": corpus.key, "n_tokens": len(corpus.tokens)},
    }
    n_params = gpt.num_params()["total"]
    report(
        TrainEvent(
            "start",
            step,
            {
                "out": str(out),
                "resumed": run is not None,
                "device": str(device),
                "dtype": dtype_name(dtype),
                "world_size": dist.world_size,
                "params": n_params,
                "model": mcfg.to_dict(),
                "train": tcfg.to_dict(),
                "train_tokens": len(train_tokens),
                "val_tokens": len(val_tokens),
                "flops_per_token": flops_per_token,
                "max_iters": tcfg.max_iters,
                "time_budget_s": tcfg.time_budget_s,
            },
        )
    )

    def save(directory: Path, val_loss: float | None, with_state: bool = True) -> None:
        saved: nn.Module = gpt
        optimizer_state = None
        if tcfg.fsdp:  # every rank takes part: rank 0 receives the whole tensors, in host memory
            weights, optimizer_state = full_state(gpt, optimizer if with_state else None)
        if not dist.is_main:
            return
        if tcfg.fsdp:  # written as one ordinary model.safetensors, like any other run's
            saved = load_state_into(GPT.skeleton(gpt.config), weights, directory / WEIGHTS_FILE)
        elif with_state:
            optimizer_state = optimizer.state_dict()
        meta = {"run": {**run_meta, "step": step, "val_loss": val_loss, "elapsed_s": elapsed()}}
        train_state = None
        if with_state:
            train_state = {
                "step": step,
                "elapsed_s": elapsed(),
                "tokens_seen": tokens_seen,
                "best_val_loss": best_val,
                "optimizer": optimizer_state,
                "rng": _rng_state(device),
            }
        # best/ is for inference: it may be stored in bf16/fp16; the resumable checkpoint keeps fp32 weights.
        save_dtype = None if with_state else getattr(torch, tcfg.save_dtype)
        commit_checkpoint(saved, directory, train_state=train_state, meta=meta, save_dtype=save_dtype)

    def write_metrics(record: dict[str, Any]) -> None:
        if not dist.is_main:
            return
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def progress(now: float | None = None) -> float:
        now = elapsed() if now is None else now
        fractions = [0.0]
        if tcfg.max_iters:
            fractions.append(step / tcfg.max_iters)
        if tcfg.time_budget_s:
            fractions.append(now / tcfg.time_budget_s)
        return max(fractions)

    def evaluate(final: bool) -> EvalResult:
        if evaluator is not None:
            result = evaluator(gpt, final)
            if dist.enabled:  # every rank scores the same set: the mean makes their decisions agree exactly
                loss, ppl, bpb = dist.reduce([result.loss, result.ppl, result.bpb], device)
                result = EvalResult(loss=loss, ppl=ppl, bpb=bpb, tokens=result.tokens, bytes=result.bytes)
            return result
        if dist.enabled:  # the windows of one process with batch N·B, each rank scoring its share
            return evaluate_sharded(
                eval_model,
                val_tokens,
                token_bytes,
                block_size=mcfg.block_size,
                batch_size=tcfg.batch_size,
                max_windows=None if final else tcfg.eval_iters * tcfg.batch_size * dist.world_size,
                device=device,
                dtype=dtype,
                dist=dist,
                lockstep=tcfg.fsdp,
            )
        return evaluate_tokens(
            gpt,
            val_tokens,
            token_bytes,
            batch_size=tcfg.batch_size,
            max_windows=None if final else tcfg.eval_iters * tcfg.batch_size,
            dtype=dtype,
        )

    t0 = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    reason, message = "done", ""
    last_loss: float | None = None
    window_tokens, window_time = 0, 0.0
    with _StopFlag() as flag:
        while True:
            if tcfg.max_iters is not None and step >= tcfg.max_iters:
                reason = "done"
                break
            clock = elapsed()
            if dist.enabled:  # one clock and one Ctrl-C for all ranks: the slowest one's time, anyone's stop
                clock, stop = dist.reduce([clock, float(flag.stop)], device, op="max")
                flag.stop = bool(stop)
            if tcfg.time_budget_s is not None and clock >= tcfg.time_budget_s:
                reason = "time"
                break
            if flag.stop:
                reason = "interrupted"
                break
            step_start = time.perf_counter()
            lr = learning_rate(tcfg, step, progress_before_warmup(tcfg, step, progress(clock)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_value, grad_norm = train_step(
                loss_model, optimizer, source, step, device=device, dtype=dtype, config=tcfg, dist=dist
            )
            if not math.isfinite(loss_value):
                reason = "diverged"
                message = (
                    f"the loss became {loss_value} at step {step + 1}; stopped and kept the last good checkpoint "
                    f"in {out}. Lower --lr (now {tcfg.lr:g}) or raise --warmup-iters"
                )
                break
            synchronize(device)
            step += 1
            tokens_seen += tokens_per_step
            last_loss = loss_value
            window_tokens += tokens_per_step
            window_time += time.perf_counter() - step_start

            if step % tcfg.log_interval == 0 or step == tcfg.max_iters:
                tps = window_tokens / window_time if window_time else 0.0
                record = {
                    "step": step,
                    "elapsed_s": round(elapsed(), 3),
                    "tokens_seen": tokens_seen,
                    "train_loss": loss_value,
                    "val_loss": None,
                    "val_bpb": None,
                    "lr": lr,
                    "tokens_per_s": round(tps, 1),
                    "grad_norm": grad_norm,
                    "flops_per_s": tps * flops_per_token,
                }
                write_metrics(record)
                window_tokens, window_time = 0, 0.0
                if report(TrainEvent("log", step, {**record, "progress": progress()})):
                    flag.stop = True
            if step % tcfg.eval_interval == 0 and not (tcfg.max_iters is not None and step >= tcfg.max_iters):
                result = evaluate(final=False)
                improved = best_val is None or result.loss < best_val
                if improved:
                    best_val = result.loss
                save(out, result.loss)
                if improved:
                    save(out / BEST_DIR, result.loss, with_state=False)
                record = _eval_record(step, elapsed(), tokens_seen, loss_value, lr, result)
                write_metrics(record)
                if report(TrainEvent("eval", step, {**record, "best": improved, "progress": progress()})):
                    flag.stop = True

    final = None
    if reason != "diverged":
        if reason in ("done", "time"):
            final = evaluate(final=True)
            # The evals before scored a fixed subset of the val windows: "best" compares on that same subset.
            comparable = final if best_val is None else evaluate(final=False)
            improved = best_val is None or comparable.loss < best_val
            if improved:
                best_val = comparable.loss
                save(out / BEST_DIR, final.loss, with_state=False)
            record = _eval_record(step, elapsed(), tokens_seen, last_loss, None, final)
            write_metrics({**record, "final": True})
            report(TrainEvent("eval", step, {**record, "best": improved, "final": True}))
        save(out, final.loss if final else None)
        report(TrainEvent("save", step, {"out": str(out)}))
        if reason == "interrupted":
            message = f"interrupted at step {step}; saved to {out} (continue with --resume)"
    result = TrainResult(
        out=out,
        step=step,
        reason=reason,
        elapsed_s=elapsed(),
        tokens_seen=tokens_seen,
        train_loss=last_loss,
        final=final,
        best_val_loss=best_val,
        message=message,
    )
    dist.barrier()  # rank 0's last save is complete before any rank returns
    report(TrainEvent("end", step, {"reason": reason, "message": message}))
    return result


# ---- distributed helpers --------------------------------------------------------------------------------------


def shard(loss_model: LossModel, device: torch.device, world_size: int) -> None:
    """FSDP2 over all ranks: each Block is one unit (its whole weights exist only while it runs); the root holds
    the rest (embeddings, final LayerNorm, the tied LM head). Moves this rank's shards to `device`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    for block in loss_model.module.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(loss_model, mesh=mesh)


def full_state(
    gpt: GPT, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The unsharded weights and optimizer state of an FSDP model, on rank 0's CPU (empty on the others).

    A collective: every rank must call it. The optimizer state is keyed by parameter name.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(gpt, options=options)
    if optimizer is None:
        return weights, None
    return weights, get_optimizer_state_dict(gpt, optimizer, options=options)


def load_optimizer_state(
    gpt: GPT, optimizer: torch.optim.Optimizer, saved: dict[str, Any], *, fsdp: bool
) -> None:
    """Restore a saved optimizer state, whichever way it was saved (`optimizer.state_dict()` keys parameters by
    position, FSDP's full state by name), so a run can resume with or without --fsdp, on any number of ranks."""
    names = {id(p): name for name, p in gpt.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = any(isinstance(p, str) for group in saved["param_groups"] for p in group["params"])
    if not fsdp:
        if by_name:
            index = {name: i for i, name in enumerate(order)}
            saved = _rekey_optimizer_state(saved, index.__getitem__)
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not by_name:
        saved = _rekey_optimizer_state(saved, order.__getitem__)
    # Every rank holds the whole state (read from train_state.pt) and keeps its own shard of it.
    set_optimizer_state_dict(gpt, optimizer, saved, options=StateDictOptions(full_state_dict=True))


def _rekey_optimizer_state(saved: dict[str, Any], key: Callable[[Any], Any]) -> dict[str, Any]:
    return {
        "state": {key(k): v for k, v in saved["state"].items()},
        "param_groups": [{**g, "params": [key(p) for p in g["params"]]} for g in saved["param_groups"]],
    }


@torch.no_grad()
def evaluate_sharded(
    loss_model: nn.Module,
    tokens: np.ndarray,
    token_bytes: np.ndarray,
    *,
    block_size: int,
    batch_size: int,
    max_windows: int | None,
    device: torch.device,
    dtype: torch.dtype,
    dist: Distributed,
    lockstep: bool = False,
) -> EvalResult:
    """`evaluate_tokens` split over the ranks: the same windows in batches of `batch_size`, batch i scored on rank
    i mod N, the sums added up over the ranks, so the figures are one process's (up to float rounding).

    `lockstep` (FSDP: every forward gathers weights from all ranks) makes every rank run the same number of
    forwards, the short ones padding with a batch that scores nothing.
    """
    windows = evenly_spaced(eval_windows(len(tokens), block_size), max_windows)
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    mine = batches[dist.rank :: dist.world_size]
    rounds = -(-len(batches) // dist.world_size) if lockstep else len(mine)
    loss_sum, n_scored, n_bytes = 0.0, 0, 0
    was_training = loss_model.training
    loss_model.eval()
    try:
        for i in range(rounds):
            group = mine[i] if i < len(mine) else [(0, 1, 1)]  # one input token, no target
            x, y = window_batch(tokens, group)
            scored = y[y != IGNORE_INDEX]
            with autocast(device, dtype):
                total, _ = loss_model(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
            loss_sum += float(total)
            n_scored += scored.size
            n_bytes += int(token_bytes[scored].sum())
    finally:
        loss_model.train(was_training)
    return EvalResult.from_sums(*dist.reduce([loss_sum, n_scored, n_bytes], device, op="sum"))


def train_step(
    loss_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    source: BatchSource,
    step: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    config: TrainConfig,
    dist: Distributed | None = None,
) -> tuple[float, float | None]:
    """One optimizer update over `grad_accum` micro-batches; returns (mean loss, grad norm before clipping).

    A non-finite loss leaves the weights untouched (no update) and is returned for the caller to stop on.
    """
    loss_value = 0.0
    for micro in range(config.grad_accum):
        x, y = source.batch(step, micro)
        xt = torch.as_tensor(x, device=device)
        yt = torch.as_tensor(y, device=device)
        # Under DDP/FSDP, gradients are averaged across ranks once per step: not on all but the last micro-batch.
        with _gradient_sync(loss_model, micro == config.grad_accum - 1):
            with autocast(device, dtype):
                loss_sum, count = loss_model(xt, yt)
            loss = loss_sum / count.clamp_min(1) / config.grad_accum
            loss.backward()
        loss_value += float(loss.detach())
    if dist is not None and dist.enabled:
        loss_value = dist.reduce([loss_value], device)[0]
    grad_norm = None
    if math.isfinite(loss_value):
        if config.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(loss_model.parameters(), config.grad_clip))
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, grad_norm


@contextlib.contextmanager
def _gradient_sync(loss_model: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside, backward averages gradients across ranks (DDP, FSDP) only if `enabled`; a no-op in one process."""
    if enabled:
        yield
    elif hasattr(loss_model, "no_sync"):  # DDP
        with loss_model.no_sync():
            yield
    elif hasattr(loss_model, "set_requires_gradient_sync"):  # FSDP2: keeps unsharded gradients until then
        loss_model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            loss_model.set_requires_gradient_sync(True)
    else:
        yield


def progress_before_warmup(config: TrainConfig, step: int, progress: float) -> float:
    """Progress through the cosine part: 0 at the end of warm-up, 1 at the end of the run."""
    if config.max_iters is not None and config.time_budget_s is None:
        span = max(config.max_iters - config.warmup_iters, 1)
        return (step - config.warmup_iters) / span
    return progress


def _eval_record(
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


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint (those steps are about to be redone)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


class _CallableModule(types.ModuleType):
    """`gptmini.train` is both this module and the API function `gptmini.train(...)`: importing the module
    replaces the package attribute, so the module itself forwards calls to `train`."""

    def __call__(self, *args: Any, **kwargs: Any) -> TrainResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
