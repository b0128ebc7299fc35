"""Prompt-lookup decoding's draft: guess the next tokens by finding the latest n-gram earlier in the text.

Text that quotes, copies or repeats itself (code, a passage being continued, a chorus) continues the way it went
the last time its latest few tokens appeared. `NgramIndex` keeps, for n = 3, 2, 1, where each n-gram last ended,
so a draft costs a few dictionary look-ups per token rather than a scan of the context. The generation loop
(`gptmini.generation.generate_tokens`) verifies the draft in one forward pass; this module only guesses and imports
no torch (the CLI checks `--lookup` before loading anything).
"""

from __future__ import annotations

from collections.abc import Iterable

from gptmini.errors import UserError

MAX_LOOKUP = 64  # past this a verify pass costs more than the tokens it could save
NGRAM_SIZES = (3, 2, 1)  # longest first: a longer match predicts better; shorter ones keep drafts coming


class LookupValueError(UserError, ValueError):
    """A bad `lookup` value: a `ValueError` to Python callers, a one-line message and exit code 2 in the CLI."""


def check_lookup(n: int, num_samples: int = 1) -> None:
    """`n` draft tokens per verify pass: 0 (off) .. MAX_LOOKUP, for one sample (drafts differ per sample)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_LOOKUP:
        raise LookupValueError(f"lookup must be an integer in 0..{MAX_LOOKUP} (0 = off), got {n!r}")
    if n and num_samples != 1:
        raise LookupValueError("lookup drafts for one sample at a time; drop num-samples or lookup")


class NgramIndex:
    """The text so far, and for each n-gram size where the latest n-gram occurred before (its end index)."""

    def __init__(self, tokens: Iterable[int] = ()) -> None:
        self.tokens: list[int] = []
        self._last_end: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in NGRAM_SIZES}
        self._previous: dict[int, int | None] = dict.fromkeys(NGRAM_SIZES)
        for t in tokens:
            self.append(t)

    def append(self, token: int) -> None:
        self.tokens.append(token)
        end = len(self.tokens) - 1
        for n, last_end in self._last_end.items():
            if end + 1 < n:
                continue
            key = tuple(self.tokens[end + 1 - n :])
            self._previous[n] = last_end.get(key)
            last_end[key] = end

    def draft(self, k: int) -> list[int]:
        """Up to `k` tokens that followed the most recent earlier occurrence of the latest n-gram (longest n first).

        A match that ends just before the end of the text overlaps its own continuation (a text repeating with
        period p = distance between the two occurrences), so the draft goes on repeating that period.
        """
        if k <= 0:
            return []
        end = len(self.tokens) - 1
        for n in self._last_end:  # NGRAM_SIZES when this index was made
            prev = self._previous[n]
            if prev is not None:
                period = end - prev
                return [self.tokens[prev + 1 + m % period] for m in range(k)]
        return []


MAX_PAUSE = 64  # steps without drafting after passes that lost time
MAX_CREDIT = 4.0  # plain steps' worth of saved time that may pay for later passes that lose
UNTIMED_PASS_STEPS = 2.5  # what a pass costs, in plain steps, where the caller does not time them


class Drafter:
    """One sequence's drafts: up to `k` tokens from its `NgramIndex`, shortened and held back when passes fail.

    A verify pass of 1 + d tokens costs more than one plain step — on a small model whose weights sit in the
    cache, about as much as 1 + d steps' arithmetic (and the sampler's work on every row); on a large one, about
    one step's weight reads — so drafts must earn their length. After a pass the next draft may be as long as the
    tokens it kept plus one (twice as long after a pass that kept its whole draft, up to `k`).

    Each pass is booked in plain steps: + the kept + 1 tokens it decided, − its time over a plain step's (timed by
    the caller: `stepped`, and `verified`'s `seconds`; untimed, 2.5 steps). While the balance is below zero
    drafting pauses for 1, 2, 4 .. 64 steps, pass after pass; a balance back at zero or above ends the pause, and
    the balance keeps at most 4 steps of credit. So text that does not repeat pays for few, short passes, and a
    pass that barely pays cannot buy a run of longer ones that lose. Drafts may depend on the past in any way:
    verifying keeps the output exact.
    """

    def __init__(self, tokens: Iterable[int], k: int) -> None:
        self.index = NgramIndex(tokens)
        self.k = k
        self._length = k  # the next draft's longest
        self._backoff = self._skip = 0
        self._drafted = 0
        self._step_s: float | None = None  # a plain step's time, smoothed
        self._balance = 0.0  # plain steps saved by the passes so far, at most MAX_CREDIT

    def append(self, token: int) -> None:
        self.index.append(token)

    def draft(self, room: int) -> list[int]:
        """A draft of at most min(k, room) tokens, or [] while held back (each call counts as a step)."""
        if self._skip:
            self._skip -= 1
            return []
        draft = self.index.draft(min(self._length, room))
        self._drafted = len(draft)
        return draft

    def stepped(self, seconds: float) -> None:
        """A plain step (one token, no pass) took `seconds`."""
        self._step_s = seconds if self._step_s is None else 0.8 * self._step_s + 0.2 * seconds

    def pass_net(self, kept: int, seconds: float | None = None) -> float:
        """What a pass that kept `kept` tokens (in `seconds`, where timed) is booked: plain steps saved, or lost."""
        timed = seconds is not None and self._step_s
        cost = seconds / self._step_s if timed else UNTIMED_PASS_STEPS
        return kept + 1 - cost

    def verified(self, kept: int, seconds: float | None = None) -> None:
        """A verify pass kept `kept` of the draft's tokens (and took `seconds`, where timed)."""
        if kept and kept == self._drafted:
            self._length = min(self.k, 2 * self._length)
        else:
            self._length = max(1, kept + 1)
        self._balance = min(self._balance + self.pass_net(kept, seconds), MAX_CREDIT)
        self._backoff = 0 if self._balance >= 0 else min(2 * self._backoff or 1, MAX_PAUSE)
        self._skip = self._backoff
