"""Generation as callers want it, each a client of the one engine (`gptmini.engine.Engine`):

  * `generate_tokens`: token ids, one list per step (one id per sample, `FINISHED` once a sample ended);
  * `stream_text`: one completion's text, piece by piece as each is certain (stop strings, EOS, UTF-8 safe);
  * `generate_texts`: several completions of one prompt, decoded together from one prefill (sample i draws with
    seed + i).

Window policy (the engine's, past the context length `block_size`): a prompt longer than `block_size` keeps its
last `block_size` tokens (`GenerationStats.prompt_truncated` says how many were dropped, so the caller can warn);
when the window is full and another token must be written, the oldest quarter of the window is dropped, the rest
is re-prefilled at positions 0.., and decoding goes on. Generation never stops or crashes because of the context
length. `use_cache=False` follows the same windows but recomputes the whole window at every step: the reference
the cached paths are tested and benchmarked against. Nothing here prints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

from gptmini.config import SamplingConfig
from gptmini.decoding import FINISHED, AttentionStep, GenerationStats
from gptmini.engine import Engine
from gptmini.lookup import check_lookup
from gptmini.model import GPT
from gptmini.rows import Request
from gptmini.sampling import choice_seed
from gptmini.tokenizer import Tokenizer

__all__ = ["FINISHED", "generate_texts", "generate_tokens", "make_engine", "stream_text"]


def make_engine(
    model: GPT,
    tokenizer: Tokenizer | None,
    rows: int = 1,
    *,
    use_cache: bool = True,
    compile: bool = False,
    capture: bool = False,
) -> Engine:
    """An engine for `rows` sequences that the calling thread drives (`tokenizer` None: ids only, no text).
    `use_cache=False` recomputes every step; `compile` compiles the cached PyTorch step; `capture` keeps each
    pass's attention for `on_attention`."""
    device = model.transformer.wte.weight.device
    lm = SimpleNamespace(model=model, tokenizer=tokenizer, config=model.config, device=device)
    step = "auto" if use_cache else "recompute"
    return Engine(lm, parallel=rows, max_queue=0, step=step, compile=compile and use_cache, capture=capture)


def _requests(
    engine: Engine,
    prompt_ids: Sequence[int],
    *,
    num_samples: int,
    sampling: SamplingConfig,
    max_new_tokens: int,
    eos_id: int | None,
    lookup: int,
    stats: GenerationStats,
    on_attention: Callable[[AttentionStep], None] | None = None,
    record_step_times: bool = False,
    grammar: str | None = None,
) -> list[Request]:
    """The engine's requests for `num_samples` continuations of one prompt (its last `block_size` tokens)."""
    if len(prompt_ids) == 0:
        raise ValueError("the prompt must hold at least one token (use <|endoftext|> for unconditional text)")
    check_lookup(lookup, num_samples)
    stats.prompt_tokens = len(prompt_ids)
    stats.prompt_truncated = dropped = max(0, len(prompt_ids) - engine.block)
    attention = None
    if on_attention is not None:

        def attention(step: AttentionStep) -> None:  # key_start counts from the prompt's first token
            step.key_start += dropped
            on_attention(step)

    return [
        Request(
            prompt_ids=list(prompt_ids[-engine.block :]),
            sampling=dataclasses.replace(sampling, seed=choice_seed(sampling.seed, i)),
            max_new_tokens=max_new_tokens,
            ignore_eos=eos_id is None,
            eos_id=eos_id,
            lookup=lookup,
            on_attention=attention if i == 0 else None,  # what the first sample attended to
            record_step_times=record_step_times,
            grammar=grammar,
        )
        for i in range(num_samples)
    ]


def _start(
    model: GPT,
    tokenizer: Tokenizer | None,
    prompt_ids: Sequence[int],
    num_samples: int,
    engine: Engine | None,
    use_cache: bool,
    compile: bool,
    on_attention: Callable[[AttentionStep], None] | None,
    **request_fields: Any,
) -> tuple[Engine, list[Request]]:
    """The engine a generation decodes on (the caller's, else a new one) and its requests."""
    capture = on_attention is not None
    engine = engine or make_engine(
        model, tokenizer, num_samples, use_cache=use_cache, compile=compile, capture=capture
    )
    requests = _requests(
        engine, prompt_ids, num_samples=num_samples, on_attention=on_attention, **request_fields
    )
    return engine, requests


def _merge_stats(stats: GenerationStats, rows: list[GenerationStats]) -> None:
    """The first sample's numbers in `stats` (the prompt's counts kept), with the longest sample's length, decode
    time and window slides."""
    if not rows:
        return
    kept = stats.prompt_tokens, stats.prompt_truncated
    stats.__dict__.update(dataclasses.replace(rows[0]).__dict__)
    stats.prompt_tokens, stats.prompt_truncated = kept
    stats.new_tokens = max(s.new_tokens for s in rows)
    stats.decode_s = max(s.decode_s for s in rows)
    stats.window_slides = max(s.window_slides for s in rows)


def generate_tokens(
    model: GPT,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig,
    num_samples: int = 1,
    eos_id: int | None = None,
    use_cache: bool = True,
    compile: bool = False,
    stats: GenerationStats | None = None,
    record_step_times: bool = False,
    on_attention: Callable[[AttentionStep], None] | None = None,
    lookup: int = 0,
    engine: Engine | None = None,
) -> Iterator[list[int]]:
    """Yield, per step, one new token id per sample (`FINISHED` for samples that already emitted `eos_id`).

    Stops after `max_new_tokens` tokens or when every sample has emitted `eos_id` (None: EOS is an ordinary token).
    `on_attention`, if given, is called with an `AttentionStep` for every token of the first sample, before it is
    yielded: the attention of the pass that produced it (prefill, decode step, window re-prefill or verify pass).

    `lookup=N` (one sample, with the cache) is prompt-lookup decoding: up to N draft tokens copied from where the
    latest n-gram last occurred (`gptmini.lookup`) are checked in the pass that feeds the next token
    (`gptmini.decoding.accept_draft`). The tokens are the same as without it when greedy, and drawn from the same
    distribution when sampling (not the same draws for a seed); windows slide at the same tokens.
    """
    stats = stats if stats is not None else GenerationStats()
    engine, requests = _start(
        model,
        None,
        prompt_ids,
        num_samples,
        engine,
        use_cache,
        compile,
        on_attention,
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        eos_id=eos_id,
        lookup=lookup,
        stats=stats,
        record_step_times=record_step_times,
    )
    if max_new_tokens <= 0:
        return
    outputs: list[list] = [[] for _ in requests]
    handles = engine.submit_many([(r, got.append) for r, got in zip(requests, outputs, strict=True)])
    finals: list = [None] * len(requests)
    steps = 0
    try:
        while any(f is None for f in finals):
            engine.run_step()
            new: list[list[int]] = [[] for _ in requests]
            for i, got in enumerate(outputs):
                for out in got:
                    new[i] += out.ids
                    if out.finish_reason == "error":
                        raise RuntimeError(out.error)
                    if out.finish_reason is not None:
                        finals[i] = out
                got.clear()
            for j in range(max(len(ids) for ids in new)):  # a verify pass may decide several tokens
                steps += 1
                stats.new_tokens = steps
                yield [ids[j] if j < len(ids) else FINISHED for ids in new]
    finally:
        for handle in handles:
            handle.cancel()
        engine.drop_cancelled()
        outputs_stats = [f.stats for f in finals if f is not None and f.stats is not None]
        _merge_stats(stats, outputs_stats)
        stats.new_tokens = steps


def stream_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig,
    ignore_eos: bool = False,
    use_cache: bool = True,
    compile: bool = False,
    stats: GenerationStats | None = None,
    on_attention: Callable[[AttentionStep], None] | None = None,
    lookup: int = 0,
    grammar: str | None = None,
    engine: Engine | None = None,
) -> Iterator[str]:
    """Yield the completion of one sample as text pieces, as soon as each is certain (`on_attention`, `lookup`:
    as for `generate_tokens`; `engine`: one to decode on, else a new one; `grammar`: structured output, a
    `gptmini.grammar` grammar every token keeps)."""
    stats = stats if stats is not None else GenerationStats()
    engine, requests = _start(
        model,
        tokenizer,
        prompt_ids,
        1,
        engine,
        use_cache,
        compile,
        on_attention,
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        eos_id=None if ignore_eos else tokenizer.eot_id,
        lookup=lookup,
        stats=stats,
        grammar=grammar,
    )
    stats.stop_reason = "max_new_tokens"
    finals: list[GenerationStats] = []
    try:
        for _, out in engine.generate_many(requests):
            if out.finish_reason == "error":
                raise RuntimeError(out.error)
            if out.text:
                yield out.text
            if out.stats is not None:
                finals.append(out.stats)
    finally:
        _merge_stats(stats, finals)


def generate_texts(
    model: GPT,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig,
    num_samples: int,
    ignore_eos: bool = False,
    use_cache: bool = True,
    compile: bool = False,
    stats: GenerationStats | None = None,
    on_attention: Callable[[AttentionStep], None] | None = None,
    lookup: int = 0,
    grammar: str | None = None,
    engine: Engine | None = None,
) -> list[str]:
    """`num_samples` completions of one prompt, decoded together from a single prefill (sample i: seed + i)."""
    stats = stats if stats is not None else GenerationStats()
    engine, requests = _start(
        model,
        tokenizer,
        prompt_ids,
        num_samples,
        engine,
        use_cache,
        compile,
        on_attention,
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        eos_id=None if ignore_eos else tokenizer.eot_id,
        lookup=lookup,
        stats=stats,
        grammar=grammar,
    )
    texts = [""] * num_samples
    finals: list[GenerationStats] = [GenerationStats() for _ in requests]
    if max_new_tokens <= 0:
        return texts
    for i, out in engine.generate_many(requests):
        if out.finish_reason == "error":
            raise RuntimeError(out.error)
        texts[i] += out.text
        if out.stats is not None:
            finals[i] = out.stats
    _merge_stats(stats, finals)
    return texts
