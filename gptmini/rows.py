"""What the engine takes and gives, and the state of a request's row: `Request` in, `Output`s out (text, logprobs,
ids, and on the last one the finish reason and `GenerationStats`), a `Handle` to cancel it, `Row` while it decodes.
Nothing here runs the model: `gptmini.engine.Engine` does.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from gptmini.config import SamplingConfig
from gptmini.decoding import AttentionStep, GenerationStats, StopMatcher
from gptmini.grammar import Constraint
from gptmini.lookup import Drafter
from gptmini.sampling import make_generator
from gptmini.tokenizer import StreamDecoder

if TYPE_CHECKING:
    from gptmini.engine import Engine

MAX_LOGPROBS = 5  # alternatives per token, as OpenAI's API allows


class QueueFull(Exception):
    """The waiting queue holds `max_queue` requests already."""


class ContextLengthExceeded(ValueError):
    def __init__(self, prompt_tokens: int, context: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.context = context
        super().__init__(
            f"the prompt has {prompt_tokens} tokens but this model's context window is {context} tokens; "
            "shorten the prompt"
        )


@dataclass
class Request:
    """One completion to generate. `logprobs`: None for none, else how many alternatives (0–5) per token."""

    prompt_ids: list[int]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_new_tokens: int = 16
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: bool = False  # also score the prompt's tokens (OpenAI's `echo` with `logprobs`)
    strip_leading_space: bool = (
        False  # drop the reply's leading whitespace (the plain chat template's "Assistant: ")
    )
    lookup: int = 0  # prompt-lookup decoding: up to this many draft tokens verified per pass (0: off)
    eos_id: int | None = None  # the token that ends the text (None: the tokenizer's <|endoftext|>)
    # called with what each new token's pass attended to (an engine made with `capture=True`)
    on_attention: Callable[[AttentionStep], None] | None = None
    record_step_times: bool = False  # each step's seconds in the last output's `stats.step_times`
    grammar: str | None = None  # structured output: a `gptmini.grammar` grammar every token must keep


@dataclass
class TokenLogprob:
    """A token with its log-probability under the model (raw logits, before any sampling setting)."""

    id: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Output:
    """What a request receives, step after step: new text (maybe empty), the tokens released with it (when
    logprobs were asked for), the ids decided since the last output (at once, whatever the text holds back), and
    on the last one `finish_reason` ("stop", "length", "cancelled" or "error")."""

    text: str = ""
    tokens: list[TokenLogprob] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # on the first output, when asked for
    stats: GenerationStats | None = None  # on the last output: timings, window slides, lookup counts


class EngineMetrics:
    """Hooks the engine calls from its thread; the defaults do nothing (the HTTP server records them)."""

    def admitted(self, prompt_tokens: int, waited_s: float) -> None: ...
    def token(self, first: bool, seconds: float) -> None: ...
    def step(self, batch_size: int, seconds: float) -> None: ...
    def finished(self, reason: str) -> None: ...
    def lookup(self, drafted: int, accepted: int) -> None: ...


class Handle:
    """A submitted request: `cancel()` from any thread frees its row within one step."""

    def __init__(self, request: Request, emit: Callable[[Output], None]) -> None:
        self.request = request
        self.emit = emit
        self.cancelled = False
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled = True


class Row:
    """An active request's decoding state."""

    def __init__(self, handle: Handle, slot: int, engine: Engine) -> None:
        req = handle.request
        self.handle = handle
        self.req = req
        self.slot = slot  # its row of the KV cache
        self.prompt_scores: tuple[int, list[TokenLogprob]] | None = (
            None  # its prompt's logprobs, when asked for
        )
        self.stats = GenerationStats(prompt_tokens=len(req.prompt_ids))
        self.decode_from = 0.0  # when its first token was sampled (the decode time runs from there)
        self.window: list[int] = []  # tokens whose keys/values are in the cache, positions 0..len-1
        self.key_start = (
            0  # tokens the window dropped when it slid (index of its first in prompt + generated)
        )
        self.next_tok = -1  # sampled, not yet in the cache
        self.generator = make_generator(req.sampling.seed, engine.device)
        self.seen: torch.Tensor | None = None
        if req.sampling.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, engine.vocab_size, dtype=torch.bool, device=engine.device)
            self.seen[0, torch.tensor(sorted(set(req.prompt_ids)), device=engine.device)] = True
        self.counts: torch.Tensor | None = (
            None  # times each token was generated (frequency / presence penalty)
        )
        if req.sampling.frequency_penalty or req.sampling.presence_penalty:
            self.counts = torch.zeros(1, engine.vocab_size, device=engine.device)
        tokenizer = engine.tokenizer
        self.decoder: StreamDecoder | None = tokenizer.stream_decoder() if tokenizer is not None else None
        self.eos_id = req.eos_id if req.eos_id is not None else getattr(tokenizer, "eot_id", None)
        # Stop strings that are a control token's whole text (a chat model's <|end|>, which the completions
        # endpoint stops at): that token ends the text as <|endoftext|> does.
        special = getattr(tokenizer, "special_ids", {})
        self.stop_ids = {special[s] for s in req.sampling.stop if s in special}
        cached = engine.passes.cache is not None  # drafts save passes only where there is a cache
        # A grammar's row decodes plainly: a draft would need the grammar's mask at every drafted position.
        self.drafter = (
            Drafter(req.prompt_ids, req.lookup) if req.lookup and cached and not req.grammar else None
        )
        self.constraint: Constraint | None = None
        if req.grammar is not None:
            self.constraint = Constraint(req.grammar, tokenizer, engine.vocab_size, engine.device)
        self.matcher = StopMatcher(req.sampling.stop)
        self.generated = 0
        self.new_ids: list[int] = []  # decided since the last output
        self.shown = ""  # for strip_leading_space: nothing shown yet
        self.started = False
        self.last_token_at = 0.0
        # Logprobs travel with the text they produced: (start, end, token) in decoded characters; a token is
        # released once the text up to its end is.
        self.pending: collections.deque[tuple[int, int, TokenLogprob]] = collections.deque()
        self.text_len = 0  # characters decoded so far
        self.released_len = 0  # decoded characters passed on (shown, or stripped as leading space)
