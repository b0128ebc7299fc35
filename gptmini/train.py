"""The training loop: text in, checkpoint directory out.

    batches (BatchSource) ─▶ GPT hidden states ─▶ chunked LM-head cross-entropy ─▶ backward ─▶ clip ─▶ optimizer

The loop never prints: it reports `TrainEvent`s to a callback (the CLI renders them with rich). Everything a run
needs to continue exactly — weights, optimizer moments, step, elapsed time, RNG state — is saved together, and a
step's batches depend only on (seed, step), so a resumed run repeats the uninterrupted one.

A run goes in named steps (`_train`): check the settings and load the data (`_check_settings`, `_load_data`), build
the model and optimizer (`_Loop`), open the run directory (`gptmini.rundir`), train (`_Loop.run`, one `train_step`
per iteration) and finish (`_Loop.finish`). Ranks under torchrun are `gptmini.distributed`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from gptmini.checkpoint import WEIGHTS_FILE, load_state_into, load_train_state, read_safetensors
from gptmini.config import PRESETS, GPTConfig, TrainConfig
from gptmini.data import (
    BatchSource,
    Corpus,
    RandomWindows,
    check_split,
    count_tokens,
    load_corpus,
    remap_splits,
    token_byte_lengths,
)
from gptmini.devices import (
    autocast,
    dtype_name,
    keep_freed_memory_on_cpu,
    release_freed_memory,
    resolve_device,
    resolve_train_dtype,
    synchronize,
)
from gptmini.distributed import (
    PEER_GONE,
    Distributed,
    RankFailed,
    evaluate_sharded,
    full_state,
    gradient_sync,
    load_optimizer_state,
    shard,
)
from gptmini.errors import UserError
from gptmini.evaluate import EvalResult, evaluate_tokens
from gptmini.loading import load_checkpoint, read_model_config
from gptmini.loss import IGNORE_INDEX, linear_cross_entropy
from gptmini.model import GPT
from gptmini.optim import WeightEMA, choose_optimizer, make_optimizer, restore_live_weights
from gptmini.rundir import (
    BEST_DIR,
    append_metrics,
    check_out_dir,
    commit_checkpoint,
    default_out,
    eval_record,
    open_run_dir,
    recover_staged,
    run_in,
)
from gptmini.tokenizer import Tokenizer

# Re-exported: importers of gptmini.train (tests, scripts) keep working.
__all__ = [
    "BEST_DIR",
    "Distributed",
    "LossModel",
    "RankFailed",
    "TrainEvent",
    "TrainResult",
    "build_model_config",
    "check_out_dir",
    "commit_checkpoint",
    "default_out",
    "learning_rate",
    "progress_before_warmup",
    "recover_staged",
    "run_in",
    "train",
    "train_step",
]

DEFAULT_PRESET = "small"
# Model fields that --init-from / --resume may not change (they fix the weights' shapes).
SHAPE_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "pos_embedding", "arch")


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


def progress_before_warmup(config: TrainConfig, step: int, progress: float) -> float:
    """Progress through the cosine part: 0 at the end of warm-up, 1 at the end of the run."""
    if config.max_iters is not None and config.time_budget_s is None:
        span = max(config.max_iters - config.warmup_iters, 1)
        return (step - config.warmup_iters) / span
    return progress


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


# ---- the loop's helpers ---------------------------------------------------------------------------------------


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


# ---- one run, in named steps ----------------------------------------------------------------------------------


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
        run, tcfg, mcfg, paths = _check_settings(
            dist, paths, overrides, model, preset, out, resume, force, init_from, train_data, evaluator
        )
        report(TrainEvent("data", 0, {"files": [str(p) for p in paths]}))
        # With an evaluator, the text's val split is not used for validation: it may be short.
        fresh_vocab = run is None and init_from is None
        data = _load_data(paths, run, tcfg, mcfg, out, fresh_vocab=fresh_vocab, check_val=evaluator is None)
        device = dist.device(resolve_device(tcfg.device))
        dtype = resolve_train_dtype(tcfg.dtype, device)
        state = load_train_state(out) if run is not None else None
    tcfg, chosen = _resolve_optimizer(tcfg, data.mcfg, dist.world_size)
    plan = _Plan(tcfg, data, device, dtype, state, chosen)
    # 2. The model, its optimizer and the batches (restored from the checkpoint when resuming).
    loop = _Loop(
        dist, plan, out, init_from=init_from, train_data=train_data, evaluator=evaluator, report=report
    )
    # 3. Now the directory: create it, start or continue metrics.jsonl.
    if dist.is_main:
        open_run_dir(out, resumed_at=None if run is None else loop.step)
    loop.report_start(resumed=run is not None)
    # 4. Train until done, out of time, interrupted or diverged; 5. the final eval and save.
    reason, message = loop.run()
    return loop.finish(reason, message)


@dataclass
class _Data:
    """The tokenised corpus, mapped onto the model's vocabulary."""

    corpus: Corpus
    mcfg: GPTConfig  # the model config, with the vocabulary chosen for this corpus
    train_tokens: np.ndarray  # the model's token ids
    val_tokens: np.ndarray
    token_bytes: np.ndarray  # UTF-8 bytes per token id, for bits per byte


@dataclass
class _Plan:
    """Everything a run needs, checked (and the corpus tokenised) before anything is written."""

    tcfg: TrainConfig
    data: _Data
    device: torch.device
    dtype: torch.dtype
    state: dict[str, Any] | None  # the train state to resume from
    optimizer_choice: str = ""  # why `--optimizer auto` chose the optimizer it did ("" when it was given)


def _resolve_optimizer(tcfg: TrainConfig, mcfg: GPTConfig, world_size: int) -> tuple[TrainConfig, str]:
    """`--optimizer auto` made concrete from the model's shapes and the tokens a step (AdamW under FSDP, which
    Muon cannot run), with the reason the run's first line gives."""
    if tcfg.optimizer != "auto":
        return tcfg, ""
    if tcfg.fsdp:
        return dataclasses.replace(tcfg, optimizer="adamw"), "auto: AdamW, as --fsdp needs"
    tokens = tcfg.batch_size * tcfg.grad_accum * world_size * mcfg.block_size
    name, cost = choose_optimizer(GPT.skeleton(mcfg, device="meta"), tokens)
    reason = f"auto: Newton–Schulz costs {cost:.2f}× a step's forward and backward"
    return dataclasses.replace(tcfg, optimizer=name), reason


def _check_settings(
    dist: Distributed,
    paths: Sequence[str | Path],
    overrides: dict[str, Any],
    model: dict[str, Any] | None,
    preset: str | None,
    out: Path,
    resume: bool,
    force: bool,
    init_from: str | Path | None,
    train_data: BatchSource | None,
    evaluator: Callable[[GPT, bool], EvalResult] | None,
) -> tuple[dict[str, Any] | None, TrainConfig, GPTConfig, Sequence[str | Path]]:
    """(the run to resume, the training config, the model config, the corpus files), or a UserError."""
    run = check_out_dir(out, resume=resume, force=force)
    if run is not None:
        tcfg = TrainConfig.from_dict(
            {**run["train"], **{k: v for k, v in overrides.items() if v is not None}}
        )
        saved_optimizer = TrainConfig.from_dict(run["train"]).optimizer
        if tcfg.optimizer == "auto":  # (what auto chose then, whatever it would choose now)
            tcfg = dataclasses.replace(tcfg, optimizer=saved_optimizer)
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
    if tcfg.fsdp and tcfg.ema:
        if overrides.get("ema"):
            raise UserError(
                "--ema keeps a whole copy of the weights, which --fsdp shards; drop one of the two"
            )
        tcfg = dataclasses.replace(tcfg, ema=0.0)  # the default average is off where the weights are sharded
    if tcfg.fsdp and (train_data is not None or evaluator is not None):
        raise UserError("--fsdp is for `gptmini train` only; fine-tuning runs data parallel without it")
    return run, tcfg, mcfg, paths


def _load_data(
    paths: Sequence[str | Path],
    run: dict[str, Any] | None,
    tcfg: TrainConfig,
    mcfg: GPTConfig,
    out: Path,
    *,
    fresh_vocab: bool,
    check_val: bool,
) -> _Data:
    """Tokenise the corpus (or reuse the cache), choose the vocabulary and map the splits onto it.

    Each of these streams through the token cache in chunks into memmaps (see gptmini.data): memory stays flat
    however large the corpus.
    """
    corpus = load_corpus(paths, encoding_errors=tcfg.encoding_errors)
    if fresh_vocab and tcfg.vocab != "gpt2":
        # A fresh model gets rows only for the tokens its corpus uses (see gptmini.tokenizer): the whole corpus,
        # val split included, as a full GPT-2 vocabulary also has rows for the val text's tokens. With a limit,
        # the most frequent tokens *of the train split* (what a tokenizer trained on that text would keep).
        limit = tcfg.vocab_limit
        counts = count_tokens(corpus, None if limit is None else corpus.split_index(tcfg.val_fraction))
        tokenizer = Tokenizer.for_token_counts(counts, max_size=limit)
        mcfg = mcfg.replace(vocab_size=tokenizer.n_vocab, vocabulary=tokenizer.vocabulary.tolist())
    else:
        tokenizer = Tokenizer(mcfg.vocabulary)
    train_tokens, val_tokens = remap_splits(corpus, tokenizer, tcfg.val_fraction)
    if check_val:
        check_split(train_tokens, val_tokens, mcfg.block_size, len(corpus.tokens))
    if run is not None and run["data"]["key"] != corpus.key:
        raise UserError(
            f"the corpus differs from the one the run in {out} trained on; resume with the same files"
        )
    return _Data(corpus, mcfg, train_tokens, val_tokens, token_byte_lengths(tokenizer, mcfg.vocab_size))


def _build_model(plan: _Plan, init_from: str | Path | None, out: Path, home: torch.device) -> GPT:
    """A new GPT, or the --init-from checkpoint's with this run's dropout; a resumed run's saved weights."""
    mcfg = plan.data.mcfg
    if init_from is not None:
        gpt, _ = load_checkpoint(init_from, device=home)
        gpt.config.dropout, gpt.config.attention_dropout = mcfg.dropout, mcfg.attention_dropout
        for m in gpt.modules():
            if isinstance(m, nn.Dropout):
                m.p = mcfg.dropout
        for block in gpt.transformer.h:
            block.attn.dropout = mcfg.attention_dropout_p
    else:
        gpt = GPT(mcfg).to(home)
    if plan.state is not None:
        load_state_into(gpt, read_safetensors(out / WEIGHTS_FILE), out / WEIGHTS_FILE)
    gpt.train()
    return gpt


class _Loop:
    """One training run's state and the steps of its loop: train, log, evaluate, save."""

    def __init__(
        self,
        dist: Distributed,
        plan: _Plan,
        out: Path,
        *,
        init_from: str | Path | None,
        train_data: BatchSource | None,
        evaluator: Callable[[GPT, bool], EvalResult] | None,
        report: Callback,
    ) -> None:
        tcfg, mcfg, device = plan.tcfg, plan.data.mcfg, plan.device
        self.dist, self.plan, self.out, self.report, self.evaluator = dist, plan, out, report, evaluator
        self.tcfg, self.device, self.dtype = tcfg, device, plan.dtype
        release_freed_memory()  # the data's scratch memory (tokenising, remapping) goes before the model comes
        if device.type == "cpu":
            keep_freed_memory_on_cpu()
        torch.manual_seed(tcfg.seed)
        # FSDP builds the model in host memory; fully_shard then moves only this rank's shard to the device.
        self.gpt = _build_model(plan, init_from, out, torch.device("cpu") if tcfg.fsdp else device)
        loss_model: nn.Module = LossModel(self.gpt)
        self.eval_model = loss_model  # evaluation runs it eagerly: never compiled, never through DDP
        if tcfg.fsdp:
            shard(loss_model, device, dist.world_size)
        self.optimizer = make_optimizer(self.gpt, tcfg, device, dtype=plan.dtype)
        self.step, self.elapsed_before, self.tokens_seen = 0, 0.0, 0
        self.best_val: float | None = None
        # The weights' moving average: evaluation, best/ and the run's saved model are it; the live weights that
        # training continues from are saved in train_state. Built from the loaded weights: a resumed run's average.
        self.ema = WeightEMA(self.gpt, tcfg.ema) if tcfg.ema else None
        if plan.state is not None:
            state = plan.state
            if self.ema is not None and "ema" in state:
                self.ema.load_state_dict(state["ema"])
            elif "ema" in state:  # saved with --ema, resumed without: continue from the live weights
                restore_live_weights(dict(self.gpt.named_parameters()), state["ema"])
            load_optimizer_state(self.gpt, self.optimizer, state["optimizer"], fsdp=tcfg.fsdp)
            self.step = int(state["step"])
            self.elapsed_before = float(state["elapsed_s"])
            self.tokens_seen = int(state["tokens_seen"])
            self.best_val = state.get("best_val_loss")
            _set_rng_state(state["rng"], device)
        self.source = train_data or RandomWindows(
            plan.data.train_tokens,
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
        self.loss_model = loss_model
        self.flops_per_token = self.gpt.flops_per_token(training=True)
        self.tokens_per_step = tcfg.batch_size * tcfg.grad_accum * dist.world_size * mcfg.block_size
        corpus = plan.data.corpus
        self.run_meta = {
            "train": tcfg.to_dict(),
            "data": {
                "files": [str(p) for p in corpus.files],
                "key": corpus.key,
                "n_tokens": len(corpus.tokens),
            },
        }
        self.last_loss: float | None = None
        self.t0 = time.perf_counter()  # restarted by run()

    # ---- clocks

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def progress(self, now: float | None = None) -> float:
        now = self.elapsed() if now is None else now
        fractions = [0.0]
        if self.tcfg.max_iters:
            fractions.append(self.step / self.tcfg.max_iters)
        if self.tcfg.time_budget_s:
            fractions.append(now / self.tcfg.time_budget_s)
        return max(fractions)

    # ---- the loop

    def report_start(self, *, resumed: bool) -> None:
        plan, tcfg = self.plan, self.tcfg
        info = {
            "out": str(self.out),
            "resumed": resumed,
            "device": str(self.device),
            "dtype": dtype_name(self.dtype),
            "world_size": self.dist.world_size,
            "params": self.gpt.num_params()["total"],
            "model": plan.data.mcfg.to_dict(),
            "train": tcfg.to_dict(),
            "train_tokens": len(plan.data.train_tokens),
            "val_tokens": len(plan.data.val_tokens),
            "flops_per_token": self.flops_per_token,
            "max_iters": tcfg.max_iters,
            "time_budget_s": tcfg.time_budget_s,
            "optimizer_choice": plan.optimizer_choice,
        }
        self.report(TrainEvent("start", self.step, info))

    def run(self) -> tuple[str, str]:
        """Step until the run ends; returns (reason, message): done | time | interrupted | diverged."""
        tcfg = self.tcfg
        self.t0 = time.perf_counter()  # the clock starts here (elapsed_before: the resumed run's time)
        window_tokens, window_time = 0, 0.0  # tokens/s over the steps since the last log line
        with _StopFlag() as flag:
            while True:
                clock, reason = self._clock_and_stop(flag)
                if reason is not None:
                    return reason, ""
                step_start = time.perf_counter()
                lr = self._set_lr(clock)
                loss_value, grad_norm = train_step(
                    self.loss_model,
                    self.optimizer,
                    self.source,
                    self.step,
                    device=self.device,
                    dtype=self.dtype,
                    config=tcfg,
                    dist=self.dist,
                )
                if not math.isfinite(loss_value):
                    return "diverged", (
                        f"the loss became {loss_value} at step {self.step + 1}; stopped and kept the last good "
                        f"checkpoint in {self.out}. Lower --lr (now {tcfg.lr:g}) or raise --warmup-iters"
                    )
                if self.ema is not None:
                    self.ema.update()
                synchronize(self.device)
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                self.last_loss = loss_value
                window_tokens += self.tokens_per_step
                window_time += time.perf_counter() - step_start
                # The callback may ask to stop (True), exactly as Ctrl-C does.
                if self.step % tcfg.log_interval == 0 or self.step == tcfg.max_iters:
                    flag.stop |= self._log(lr, loss_value, grad_norm, window_tokens, window_time)
                    window_tokens, window_time = 0, 0.0
                if self.step % tcfg.eval_interval == 0 and not self._at_max_iters():
                    flag.stop |= self._evaluate_and_save(lr, loss_value)

    def _at_max_iters(self) -> bool:
        return self.tcfg.max_iters is not None and self.step >= self.tcfg.max_iters

    def _clock_and_stop(self, flag: _StopFlag) -> tuple[float, str | None]:
        """The run's clock, and why it ends before the next step (None: it goes on)."""
        if self._at_max_iters():
            return 0.0, "done"
        clock = self.elapsed()
        if self.dist.enabled:  # one clock and one Ctrl-C for all ranks: the slowest one's time, anyone's stop
            clock, stop = self.dist.reduce([clock, float(flag.stop)], self.device, op="max")
            flag.stop = bool(stop)
        if self.tcfg.time_budget_s is not None and clock >= self.tcfg.time_budget_s:
            return clock, "time"
        if flag.stop:
            return clock, "interrupted"
        return clock, None

    def _set_lr(self, clock: float) -> float:
        lr = learning_rate(
            self.tcfg, self.step, progress_before_warmup(self.tcfg, self.step, self.progress(clock))
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _log(
        self, lr: float, loss_value: float, grad_norm: float | None, window_tokens: int, window_time: float
    ) -> bool:
        """A log line to metrics.jsonl and the callback; True if the callback asks to stop."""
        tps = window_tokens / window_time if window_time else 0.0
        record = {
            "step": self.step,
            "elapsed_s": round(self.elapsed(), 3),
            "tokens_seen": self.tokens_seen,
            "train_loss": loss_value,
            "val_loss": None,
            "val_bpb": None,
            "lr": lr,
            "tokens_per_s": round(tps, 1),
            "grad_norm": grad_norm,
            "flops_per_s": tps * self.flops_per_token,
        }
        self._write_metrics(record)
        return bool(self.report(TrainEvent("log", self.step, {**record, "progress": self.progress()})))

    def _evaluate_and_save(self, lr: float, loss_value: float) -> bool:
        """The periodic eval: save the resumable checkpoint, and best/ if the val loss improved; True if the
        callback asks to stop."""
        with self.averaged():
            result = self.evaluate(final=False)
        improved = self.best_val is None or result.loss < self.best_val
        if improved:
            self.best_val = result.loss
        self.save(self.out, result.loss)
        if improved:
            self.save(self.out / BEST_DIR, result.loss, with_state=False)
        record = eval_record(self.step, self.elapsed(), self.tokens_seen, loss_value, lr, result)
        self._write_metrics(record)
        event = TrainEvent("eval", self.step, {**record, "best": improved, "progress": self.progress()})
        return bool(self.report(event))

    def finish(self, reason: str, message: str) -> TrainResult:
        """The final eval on the full val split (unless stopped early by divergence or Ctrl-C) and the last save."""
        out, final = self.out, None
        if reason != "diverged":
            if reason in ("done", "time"):
                with self.averaged():
                    final = self.evaluate(final=True)
                    # The evals before scored a fixed subset of the val windows: "best" compares on that subset.
                    comparable = final if self.best_val is None else self.evaluate(final=False)
                improved = self.best_val is None or comparable.loss < self.best_val
                if improved:
                    self.best_val = comparable.loss
                    self.save(out / BEST_DIR, final.loss, with_state=False)
                record = eval_record(self.step, self.elapsed(), self.tokens_seen, self.last_loss, None, final)
                self._write_metrics({**record, "final": True})
                self.report(TrainEvent("eval", self.step, {**record, "best": improved, "final": True}))
            self.save(out, final.loss if final else None)
            self.report(TrainEvent("save", self.step, {"out": str(out)}))
            if reason == "interrupted":
                message = f"interrupted at step {self.step}; saved to {out} (continue with --resume)"
        result = TrainResult(
            out=out,
            step=self.step,
            reason=reason,
            elapsed_s=self.elapsed(),
            tokens_seen=self.tokens_seen,
            train_loss=self.last_loss,
            final=final,
            best_val_loss=self.best_val,
            message=message,
        )
        self.dist.barrier()  # rank 0's last save is complete before any rank returns
        self.report(TrainEvent("end", self.step, {"reason": reason, "message": message}))
        return result

    # ---- evaluation, checkpoints, metrics

    def averaged(self) -> contextlib.AbstractContextManager[None]:
        """Within: the model holds the weights' moving average (with --ema), as evaluation and best/ use it."""
        return self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()

    def evaluate(self, final: bool) -> EvalResult:
        dist, tcfg, plan = self.dist, self.tcfg, self.plan
        if self.evaluator is not None:
            result = self.evaluator(self.gpt, final)
            if dist.enabled:  # every rank scores the same set: the mean makes their decisions agree exactly
                loss, ppl, bpb = dist.reduce([result.loss, result.ppl, result.bpb], self.device)
                result = EvalResult(loss=loss, ppl=ppl, bpb=bpb, tokens=result.tokens, bytes=result.bytes)
            return result
        if dist.enabled:  # the windows of one process with batch N·B, each rank scoring its share
            return evaluate_sharded(
                self.eval_model,
                plan.data.val_tokens,
                plan.data.token_bytes,
                block_size=plan.data.mcfg.block_size,
                batch_size=tcfg.batch_size,
                max_windows=None if final else tcfg.eval_iters * tcfg.batch_size * dist.world_size,
                device=self.device,
                dtype=self.dtype,
                dist=dist,
                lockstep=tcfg.fsdp,
            )
        return evaluate_tokens(
            self.gpt,
            plan.data.val_tokens,
            plan.data.token_bytes,
            batch_size=tcfg.batch_size,
            max_windows=None if final else tcfg.eval_iters * tcfg.batch_size,
            dtype=self.dtype,
        )

    def save(self, directory: Path, val_loss: float | None, with_state: bool = True) -> None:
        gpt, tcfg = self.gpt, self.tcfg
        saved: nn.Module = gpt
        optimizer_state = None
        if tcfg.fsdp:  # every rank takes part: rank 0 receives the whole tensors, in host memory
            weights, optimizer_state = full_state(gpt, self.optimizer if with_state else None)
        if not self.dist.is_main:
            return
        if tcfg.fsdp:  # written as one ordinary model.safetensors, like any other run's
            saved = load_state_into(GPT.skeleton(gpt.config), weights, directory / WEIGHTS_FILE)
        elif with_state:
            optimizer_state = self.optimizer.state_dict()
        meta = {
            "run": {**self.run_meta, "step": self.step, "val_loss": val_loss, "elapsed_s": self.elapsed()}
        }
        train_state = None
        if with_state:
            train_state = {
                "step": self.step,
                "elapsed_s": self.elapsed(),
                "tokens_seen": self.tokens_seen,
                "best_val_loss": self.best_val,
                "optimizer": optimizer_state,
                "rng": _rng_state(self.device),
            }
            if self.ema is not None:
                train_state["ema"] = self.ema.state_dict()
        # best/ is for inference: it may be stored in bf16/fp16; the resumable checkpoint keeps fp32 weights.
        save_dtype = None if with_state else getattr(torch, tcfg.save_dtype)
        # With --ema the saved model is the average; the live weights are in train_state.
        with self.averaged():
            commit_checkpoint(saved, directory, train_state=train_state, meta=meta, save_dtype=save_dtype)

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            append_metrics(self.out, record)


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
        with gradient_sync(loss_model, micro == config.grad_accum - 1):
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


class _CallableModule(types.ModuleType):
    """`gptmini.train` is both this module and the API function `gptmini.train(...)`: importing the module
    replaces the package attribute, so the module itself forwards calls to `train`."""

    def __call__(self, *args: Any, **kwargs: Any) -> TrainResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
