"""Chat fine-tuning: OpenAI-style JSONL conversations → masked batches → the ordinary training loop.

Each line of the data file is one conversation, ``{"messages": [{"role": "system"|"user"|"assistant", "content":
"..."}, ...]}``. It is laid out with the chat-token template (`gptmini.chat.TokenTemplate`) and the loss is taken
only on what the assistant wrote (its text and closing ``<|end|>``): the model learns to answer, not to imitate the
user. The loop, its progress, metrics, checkpoints, resume and time budget are `gptmini.train.train`'s; this module
only supplies the batches and the validation score (masked loss on held-out conversations).

A base model is turned into a chat model by raising its `vocab_size` to cover the chat tokens: their rows usually
exist already in the padded embedding (else it grows by one padding step); they start from the mean token embedding.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptmini.api import default_checkpoint
from gptmini.chat import Message, TokenTemplate, check_messages
from gptmini.checkpoint import load_state_into, save_checkpoint, weights_for_saving
from gptmini.config import TrainConfig
from gptmini.errors import UserError
from gptmini.evaluate import EvalResult
from gptmini.loading import load_checkpoint, read_model_config
from gptmini.loss import IGNORE_INDEX, linear_cross_entropy
from gptmini.model import GPT
from gptmini.rundir import check_out_dir, run_in
from gptmini.tokenizer import Tokenizer
from gptmini.train import TrainEvent, TrainResult, train

# Fine-tuning starts from a trained model: a gentler peak lr and a short warm-up than pretraining's defaults.
FINETUNE_DEFAULTS: dict[str, Any] = {
    "lr": 5e-4,
    "optimizer": "adamw",  # the gentle choice for adapting a trained model (Muon is the pretraining default)
    "warmup_iters": 20,
    "weight_decay": 0.1,
    "eval_interval": 100,
    "val_fraction": 0.1,
    "ema": 0.0,  # the weight average was measured on pretraining only; fine-tunes (and the shipped chat model) keep none
}
MAX_REPORTED = 5  # malformed lines named in the error message


# ---- reading ----------------------------------------------------------------------------------------------------


def read_conversations(path: str | Path) -> list[list[Message]]:
    """Every conversation of a JSONL file; any malformed line is an error that names its line number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"conversations file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory; pass a .jsonl file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); pass a .jsonl file") from None
    conversations, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines separate nothing and hold nothing
        try:
            conversations.append(_parse_line(line))
        except (UserError, json.JSONDecodeError) as e:
            reason = f"not valid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
            problems.append(f"line {number}: {reason}")
    if problems:
        shown = "; ".join(problems[:MAX_REPORTED]) + (" …" if len(problems) > MAX_REPORTED else "")
        raise UserError(f"{path}: {len(problems)} malformed line(s), nothing was trained — {shown}")
    if not conversations:
        raise UserError(f"{path} holds no conversations (one JSON object per line)")
    return conversations


def _parse_line(line: str) -> list[Message]:
    data = json.loads(line)
    if not isinstance(data, dict) or "messages" not in data:
        raise UserError('expected an object with a "messages" list')
    messages = check_messages(data["messages"])
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise UserError("no assistant message to learn from")
    return messages


# ---- examples and batches -------------------------------------------------------------------------------------


def encode_examples(
    conversations: Sequence[Sequence[Message]], tokenizer: Tokenizer, block_size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) per conversation; targets are -1 except on assistant tokens.

    A conversation longer than the context is cut into consecutive `block_size` windows; windows with no
    assistant token teach nothing and are left out.
    """
    template = TokenTemplate()
    examples = []
    for messages in conversations:
        ids, mask = template.encode_with_mask(tokenizer, messages)
        ids_a = np.asarray(ids, dtype=np.int64)
        x = ids_a[:-1]
        y = np.where(np.asarray(mask[1:]), ids_a[1:], IGNORE_INDEX)
        for start in range(0, len(x), block_size):
            xs, ys = x[start : start + block_size], y[start : start + block_size]
            if (ys != IGNORE_INDEX).any():
                examples.append((xs, ys))
    return examples


def pad_batch(
    examples: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest example; padded targets are ignored by the loss."""
    width = max(len(x) for x, _ in examples)
    xb = np.full((len(examples), width), pad_id, dtype=np.int64)
    yb = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
    for row, (x, y) in enumerate(examples):
        xb[row, : len(x)] = x
        yb[row, : len(y)] = y
    return xb, yb


class ChatBatches:
    """A `BatchSource` over conversations: epoch after epoch, each in an order seeded by (seed, epoch).

    A step's global batch is the next `batch_size × grad_accum × world_size` conversations of that order; rank r
    takes micro-batches r·grad_accum … r·grad_accum + grad_accum − 1 of it (as `data.RandomWindows` does). Each
    micro-batch depends only on (seed, step, micro, rank), so a resumed run sees the same batches.
    """

    def __init__(
        self,
        examples: Sequence[tuple[np.ndarray, np.ndarray]],
        batch_size: int,
        *,
        seed: int = 0,
        grad_accum: int = 1,
        rank: int = 0,
        world_size: int = 1,
        pad_id: int = 50256,
    ) -> None:
        if not examples:
            raise UserError("no training conversations with an assistant reply")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pad_id = pad_id
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))}
        return self._orders[epoch]

    def batch(self, step: int, micro: int = 0) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.examples)
        per_step = self.batch_size * self.grad_accum * self.world_size
        first = step * per_step + (self.rank * self.grad_accum + micro) * self.batch_size
        picked = [
            self.examples[self._order(pos // n)[pos % n]] for pos in range(first, first + self.batch_size)
        ]
        return pad_batch(picked, self.pad_id)


def masked_evaluator(
    examples: Sequence[tuple[np.ndarray, np.ndarray]], tokenizer: Tokenizer, batch_size: int, eval_iters: int
) -> Callable[[GPT, bool], EvalResult]:
    """Scores a model on held-out conversations: loss on assistant tokens only (what training optimises).

    Periodic evals use the first `eval_iters` batches; the final one uses them all. Bits per byte count the UTF-8
    bytes of the scored text (<|end|> has none).
    """

    def token_bytes(token_id: int) -> int:
        return len(tokenizer.token_bytes(token_id)) if token_id < tokenizer.eot_id else 0

    @torch.no_grad()
    def evaluate(model: GPT, final: bool) -> EvalResult:
        device = model.lm_head.weight.device
        chosen = examples if final else examples[: batch_size * eval_iters]
        was_training = model.training
        model.eval()
        total, n_scored, n_bytes = 0.0, 0, 0
        try:
            for first in range(0, len(chosen), batch_size):
                x, y = pad_batch(chosen[first : first + batch_size], tokenizer.eot_id)
                scored = y[y != IGNORE_INDEX]
                n_scored += scored.size
                n_bytes += sum(token_bytes(int(t)) for t in scored)
                hidden = model.hidden_states(torch.from_numpy(x).to(device))
                total += float(
                    linear_cross_entropy(
                        hidden,
                        model.lm_head.weight,
                        torch.from_numpy(y).to(device),
                        vocab_size=model.config.vocab_size,
                    )
                )
        finally:
            model.train(was_training)
        return EvalResult.from_sums(total, n_scored, n_bytes)

    return evaluate


def split_conversations(
    conversations: list[list[Message]], val_fraction: float
) -> tuple[list[list[Message]], list[list[Message]]]:
    """The last `val_fraction` of the conversations (at least one) are held out; a single conversation is used
    for both, so a tiny dataset still trains and reports a (training) score."""
    if len(conversations) == 1:
        return conversations, conversations
    n_val = min(max(1, round(len(conversations) * val_fraction)), len(conversations) - 1)
    return conversations[:-n_val], conversations[-n_val:]


# ---- the model ------------------------------------------------------------------------------------------------


def with_chat_tokens(checkpoint: str | Path) -> GPT:
    """The model of `checkpoint` (on the CPU) with a vocab that covers the chat tokens."""
    model, _ = load_checkpoint(checkpoint)
    config = model.config
    chat_vocab_size = Tokenizer(config.vocabulary).chat_vocab_size
    if config.vocab_size >= chat_vocab_size:
        return model
    chat_config = config.replace(vocab_size=chat_vocab_size)
    if chat_config.padded_vocab_size != config.padded_vocab_size:  # no spare rows: grow the embedding
        state = weights_for_saving(model)
        wte = state["transformer.wte.weight"]
        state["transformer.wte.weight"] = torch.cat(
            [wte, wte.new_zeros(chat_config.padded_vocab_size - wte.shape[0], wte.shape[1])]
        )
        model = load_state_into(GPT.skeleton(chat_config), state, Path(checkpoint)).eval()
    with torch.no_grad():
        wte = model.transformer.wte.weight
        # New tokens start at the average embedding: plausible inputs, and no logit that dwarfs the others.
        wte[config.vocab_size : chat_vocab_size] = wte[: config.vocab_size].mean(dim=0)
    model.config.vocab_size = chat_vocab_size
    return model


# ---- the entry point ------------------------------------------------------------------------------------------


def finetune(
    data: str | Path,
    *,
    checkpoint: str | Path | None = None,
    out: str | Path | None = None,
    config: dict[str, Any] | None = None,
    resume: bool = False,
    force: bool = False,
    callback: Callable[[TrainEvent], Any] | None = None,
) -> TrainResult:
    """Fine-tune `checkpoint` on the conversations in `data` (JSONL) and save a chat model to `out`.

    `config` holds TrainConfig fields to change (None values are ignored); on `resume`, the saved run's settings
    are the base. Returns the loop's `TrainResult`.
    """
    data = Path(data)
    out = Path(out) if out is not None else Path("runs") / f"{data.stem}-chat"
    changes = {k: v for k, v in (config or {}).items() if v is not None}
    conversations = read_conversations(data)  # before anything heavy: bad data answers at once
    run = run_in(out) if resume and out.is_dir() else None
    if resume and run is None:  # say so now, before copying the model
        raise UserError(
            f"nothing to resume in {out} (no fine-tuning run saved there); start without --resume"
        )
    if run is not None:
        tcfg = TrainConfig.from_dict({**run["train"], **changes})
        model_config = read_model_config(out)[0]
    else:
        tcfg = TrainConfig(**{**FINETUNE_DEFAULTS, **changes})
        checkpoint = Path(checkpoint) if checkpoint is not None else default_checkpoint()
        model_config = read_model_config(checkpoint)[0]
    block_size = model_config.block_size
    tokenizer = Tokenizer(model_config.vocabulary)
    # Under torchrun every rank runs this; each takes its slice of the batches, rank 0 alone reports.
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    train_convs, val_convs = split_conversations(conversations, tcfg.val_fraction)
    source = ChatBatches(
        encode_examples(train_convs, tokenizer, block_size),
        tcfg.batch_size,
        seed=tcfg.seed,
        grad_accum=tcfg.grad_accum,
        rank=rank,
        world_size=world_size,
        pad_id=tokenizer.eot_id,
    )
    val_examples = encode_examples(val_convs, tokenizer, block_size) or source.examples
    evaluator = masked_evaluator(val_examples, tokenizer, tcfg.batch_size, tcfg.eval_iters)
    check_out_dir(out, resume=resume, force=force)  # before the model is copied and scored
    sizes = {
        "train_tokens": sum(len(x) for x, _ in source.examples),
        "val_tokens": sum(len(x) for x, _ in val_examples),
    }

    def report(event: Any) -> Any:
        # The loop counts the JSONL file as text; the conversations are what is trained on.
        if event.kind == "start":
            event.info.update(sizes)
        return callback(event) if callback is not None else None

    with tempfile.TemporaryDirectory(prefix="gptmini-finetune-") as tmp:
        init = None
        if run is None:
            # The loop starts from a copy whose vocab covers the chat tokens; its score is the baseline.
            model = with_chat_tokens(checkpoint)
            if callback is not None and rank == 0:
                before = evaluator(model, False)
                callback(TrainEvent("eval", 0, {**_eval_info(before), "before": True}))
            init = save_checkpoint(model, Path(tmp))
            del model
        return train(
            [data],
            config=tcfg.to_dict() if run is None else changes,
            out=out,
            resume=resume,
            force=force,
            init_from=init,
            callback=report,
            train_data=source,
            evaluator=evaluator,
        )


def _eval_info(result: EvalResult) -> dict[str, Any]:
    """An eval event's fields, as the loop reports them."""
    return {"val_loss": result.loss, "val_ppl": result.ppl, "val_bpb": result.bpb, "best": False}
