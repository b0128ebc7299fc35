"""Loss, perplexity and bits per byte of a model on a token sequence.

The text is cut into `block_size` windows (non-overlapping by default; `stride` < block_size overlaps them so each
scored token sees more context). Every token but the first is scored exactly once. Bits per byte divides the summed
loss by the UTF-8 bytes of the scored tokens: loss_nats · tokens / (bytes · ln 2), a figure that compares across
tokenizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gptmini.config import check_encoding_errors
from gptmini.devices import autocast
from gptmini.errors import UserError
from gptmini.loss import IGNORE_INDEX, linear_cross_entropy
from gptmini.model import GPT


@dataclass
class EvalResult:
    loss: float  # mean nats per scored token
    ppl: float
    bpb: float  # bits per UTF-8 byte of the scored text
    tokens: int
    bytes: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def from_sums(cls, loss_sum: float, n_scored: int, n_bytes: int) -> EvalResult:
        """From summed nats, scored tokens and their UTF-8 bytes: bits per byte = nats / (bytes · ln 2)."""
        loss = loss_sum / max(n_scored, 1)
        bpb = loss_sum / (max(n_bytes, 1) * math.log(2))
        return cls(
            loss=loss, ppl=math.exp(min(loss, 700.0)), bpb=bpb, tokens=int(n_scored), bytes=int(n_bytes)
        )


def window_batch(tokens: np.ndarray, group: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets of a batch of windows `(begin, length, skip)`; unscored targets are IGNORE_INDEX."""
    width = max(length for _, length, _ in group)
    x = np.zeros((len(group), width), dtype=np.int64)
    y = np.full((len(group), width), IGNORE_INDEX, dtype=np.int64)
    for row, (begin, length, skip) in enumerate(group):
        x[row, :length] = tokens[begin : begin + length]
        y[row, skip:length] = tokens[begin + 1 + skip : begin + 1 + length]
    return x, y


def eval_windows(n_tokens: int, block_size: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """Windows `(begin, length, skip)`: inputs tokens[begin : begin+length], targets shifted by one, the first
    `skip` targets already scored by an earlier window. Together they score targets 1 … n_tokens−1 exactly once."""
    stride = stride or block_size
    if not 0 < stride <= block_size:
        raise UserError(f"stride must be in [1, block_size={block_size}], got {stride}")
    last = n_tokens - 1  # index of the last target
    windows = []
    scored_to = 0  # targets 1..scored_to are done
    begin = 0
    while scored_to < last:
        end = min(begin + block_size, last)  # targets begin+1 .. end
        windows.append((begin, end - begin, scored_to - begin))
        scored_to = end
        begin += stride
    return windows


def evenly_spaced(windows: list, count: int | None) -> list:
    """`count` windows spread over the whole list (all of them when count is None or large)."""
    if count is None or count >= len(windows):
        return windows
    picks = np.unique(np.linspace(0, len(windows) - 1, count).round().astype(np.int64))
    return [windows[i] for i in picks]


@torch.no_grad()
def evaluate_tokens(
    model: GPT,
    tokens: np.ndarray,
    token_bytes: np.ndarray,
    *,
    stride: int | None = None,
    batch_size: int = 8,
    max_windows: int | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Score `tokens` with `model` (see the module docstring); `max_windows` scores an evenly spaced subset."""
    block = model.config.block_size
    if len(tokens) < 2:
        raise UserError("need at least two tokens to evaluate")
    device = model.lm_head.weight.device
    windows = evenly_spaced(eval_windows(len(tokens), block, stride), max_windows)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    n_scored = n_bytes = 0
    try:
        for first in range(0, len(windows), batch_size):
            x, y = window_batch(tokens, windows[first : first + batch_size])
            scored = y[y != IGNORE_INDEX]
            n_scored += scored.size
            n_bytes += int(token_bytes[scored].sum())
            xt = torch.from_numpy(x).to(device)
            yt = torch.from_numpy(y).to(device)
            with autocast(device, dtype):
                hidden = model.hidden_states(xt)
                total += head_loss_sum(model, hidden, yt).double().cpu()
            if progress:
                progress(min(first + batch_size, len(windows)), len(windows))
    finally:
        model.train(was_training)
    return EvalResult.from_sums(float(total), n_scored, n_bytes)


def head_loss_sum(model: GPT, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the LM head over `hidden` [B, T, C]: chunked from the head's weight when it is a
    plain linear, else (an int8 / int4 head) from its logits, one sequence at a time."""
    vocab = model.config.vocab_size
    head = model.lm_head
    if type(head) is torch.nn.Linear:
        return linear_cross_entropy(hidden, head.weight, targets, vocab_size=vocab)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for h, y in zip(hidden, targets, strict=True):
        logits = head(h)[:, :vocab].float()
        total += F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum").double()
    return total


SPLITS = ("all", "val")


def evaluate_checkpoint(
    checkpoint: str | Path,
    files: Sequence[str | Path] = (),
    *,
    split: str = "all",
    stride: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "float32",
    encoding_errors: str = "strict",
    quantize: str | None = None,
) -> EvalResult:
    """Loss, perplexity and bits per byte of a checkpoint on `files` (or on the val split its run held out).

    `split="val"` scores the last `val_fraction` of the tokens, the part training never saw; without files it uses
    the files recorded in the checkpoint's run. `quantize` ("int8" / "int4", CPU) scores the weights `generate
    --quantize` decodes with.
    """
    from gptmini.data import load_corpus, remap_splits, token_byte_lengths
    from gptmini.devices import resolve_device, resolve_train_dtype
    from gptmini.loading import load_checkpoint, read_model_config
    from gptmini.quantize import check_quantize, prepare_for_decoding
    from gptmini.tokenizer import Tokenizer

    if split not in SPLITS:
        raise UserError(f"split must be all or val, got {split!r}")
    check_encoding_errors(encoding_errors)
    if batch_size <= 0:
        raise UserError(f"batch-size must be a positive integer, got {batch_size}")
    config, info = read_model_config(checkpoint)
    if stride is not None and not 0 < stride <= config.block_size:
        raise UserError(f"stride must be in [1, {config.block_size}] (the block size), got {stride}")
    run = info.get("run") or {}
    if not files:
        if split != "val" or not run.get("data"):
            raise UserError(
                "no text given; pass FILES (or --split val for a checkpoint written by gptmini train)"
            )
        files = run["data"]["files"]
    dev = resolve_device(device)
    compute = resolve_train_dtype(dtype, dev)
    quantize = check_quantize(quantize, dev)
    tokenizer = Tokenizer(config.vocabulary)
    corpus = load_corpus(files, encoding_errors=encoding_errors)
    # Mapped onto the model's vocabulary in chunks, into the cache (a corpus may not fit in memory).
    if split == "val":
        tokens = remap_splits(corpus, tokenizer, run.get("train", {}).get("val_fraction", 0.1))[1]
    else:
        tokens = remap_splits(corpus, tokenizer, 0.0)[0]  # the whole text: a split with nothing held out
    if len(tokens) < 2:
        raise UserError(f"the text has {len(tokens)} tokens; need at least 2 to score one")
    model, _ = load_checkpoint(checkpoint, device=dev)
    if quantize is not None:
        model = prepare_for_decoding(model, quantize=quantize)
    return evaluate_tokens(
        model,
        tokens,
        token_byte_lengths(tokenizer, config.vocab_size),
        stride=stride,
        batch_size=batch_size,
        dtype=compute,
    )
