"""The per-token rules every decode follows, whatever runs the passes: where a full window slides, how a lookup draft
is verified, where a stop string cuts the text, and what a generation reports (`GenerationStats`, `AttentionStep`).
The engine (`gptmini.engine`) applies them to each of its rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from gptmini.config import SamplingConfig
from gptmini.sampling import draw, next_token_probs, sample_next

FINISHED = -1  # placeholder id `generate_tokens` yields for a sample that already hit <|endoftext|>


def window_shift(block_size: int) -> int:
    """How many of the oldest tokens a full window drops: a quarter (at least one)."""
    return max(1, block_size // 4)


@dataclass
class AttentionStep:
    """What one step's forward pass attended to when it produced the next token (see `generate_tokens`)."""

    weights: list[torch.Tensor]  # per layer `[num_samples, n_head, n_keys]`: the newest query's weights
    keys: torch.Tensor  # `[num_samples, n_keys]`: the window's token ids, the keys attended over
    key_start: int  # index of the window's first token in prompt + generated tokens (moves when it slides)
    tokens: torch.Tensor  # `[num_samples]`: the tokens sampled from this step's logits


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_truncated: int = 0
    prompt_cached: int = 0  # prompt tokens whose keys and values were already cached (not computed again)
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    window_slides: int = 0
    stop_reason: str = ""
    step_times: list[float] = field(default_factory=list)
    # prompt-lookup decoding (`lookup=N`): verify passes run, draft tokens proposed, draft tokens accepted
    lookup_passes: int = 0
    lookup_drafted: int = 0
    lookup_accepted: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        # the first new token comes from the prefill; the rest from decode steps
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else float("nan")


def accept_draft(
    logits: torch.Tensor,
    draft: list[int],
    sampling: SamplingConfig,
    generator: torch.Generator,
    seen: torch.Tensor | None,
    counts: torch.Tensor | None = None,
) -> list[int]:
    """The tokens a verify pass decides: the accepted prefix of `draft`, then one token drawn by the model.

    `logits` `[k+1, V]`: row j scores the token after the fed token and draft[:j]. Speculative sampling with a
    draft that puts all its mass on one token: draft[j] is kept with probability p_j(draft[j]), p_j being exactly
    the distribution plain decoding would sample from there (`next_token_probs`: penalty, temperature, top-k/p,
    min-p); at the first refusal the token is drawn from p_j without draft[j], renormalised; if all are kept, a
    bonus token is drawn from the last row. Each token is then distributed as plain sampling's; greedy keeps
    draft tokens while they are the argmax.
    """
    k = len(draft)
    if seen is not None:
        # Row j's penalty also counts draft[:j], the tokens before it (the bonus row k: the whole draft). Drafts are
        # copied from the text, so their tokens are normally seen already; this keeps the rule exact regardless.
        seen = seen.expand(k + 1, -1).clone()
        for j, tok in enumerate(draft, start=1):
            seen[j:, tok] = True
    if counts is not None:  # likewise the frequency and presence penalties' counts
        counts = counts.expand(k + 1, -1).clone()
        for j, tok in enumerate(draft, start=1):
            counts[j:, tok] += 1
    if sampling.greedy:
        best = sample_next(logits, sampling, None, seen, counts).tolist()
        kept = next((j for j in range(k) if best[j] != draft[j]), k)
        return best[: kept + 1]
    probs = next_token_probs(logits, sampling, seen, counts)
    rows = torch.arange(k, device=probs.device)
    proposed = torch.tensor(draft, device=probs.device)
    keep = torch.rand(k, generator=generator, device=probs.device) < probs[rows, proposed]
    kept = next((j for j, ok in enumerate(keep.tolist()) if not ok), k)
    # Only the row after the kept prefix is drawn from (a pass costs little more than a step's sampling).
    last = probs[kept : kept + 1]
    if kept < k:
        residual = last.clone()
        residual[0, draft[kept]] = 0.0
        # Refused means p < 1, so the rest has mass; should rounding leave none, draw from the row itself.
        last = residual if float(residual.sum()) > 0 else last
    return draft[:kept] + draw(last, generator).tolist()


class StopMatcher:
    """Cuts text at the first stop string, holding back any tail that might still become one.

    `feed(piece)` returns the text that is now safe to show; `done` turns True once a stop string appeared
    (its text and everything after it are never returned). `flush()` releases what was held at the end.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.done = False

    def feed(self, piece: str) -> str:
        if self.done:
            return ""
        self.pending += piece
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.done = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = max(_longest_prefix_suffix(self.pending, s) for s in self.stops)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.done else self.pending), ""
        return out


def _longest_prefix_suffix(text: str, stop: str) -> int:
    """Length of the longest proper prefix of `stop` that `text` ends with."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0
