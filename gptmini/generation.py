"""The generation loop: prefill the prompt once, then one token per step from the static KV cache.

Window policy (what happens past the context length `block_size`):
  * a prompt longer than `block_size` keeps its last `block_size` tokens (`GenerationStats.prompt_truncated`
    says how many were dropped, so the caller can warn);
  * when the window is full and another token must be written, the oldest quarter of the window is dropped, the
    rest is re-prefilled at positions 0.. in one pass, and decoding goes on. Generation never stops or crashes
    because of the context length.
`use_cache=False` follows exactly the same windows but recomputes the whole window at every step: it is the
reference the cached path is tested and benchmarked against.

`generate_tokens` yields token ids; `stream_text` turns them into text for one sample (stop strings, EOS, UTF-8
safe); `generate_texts` does it for several samples drawn from one prefill. Nothing here prints.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from gptmini.config import SamplingConfig
from gptmini.devices import synchronize
from gptmini.kv_cache import KVCache
from gptmini.lookup import Drafter, check_lookup
from gptmini.model import GPT
from gptmini.native import DecodeStep
from gptmini.sampling import draw, make_generator, next_token_probs, sample_next
from gptmini.tokenizer import Tokenizer

FINISHED = -1  # placeholder id yielded for a sample that already hit <|endoftext|>


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


def _attention_step(
    model: GPT, window: torch.Tensor, length: int, key_start: int, tokens: torch.Tensor, query: int = -1
):
    # Each layer kept `[1 or B, H, queries, keys]` (the decode step's keys span the whole cache): the newest query
    # (or a lookup verify pass's query `query`) over the window's `length` keys; a prefill shared by several
    # samples is repeated for each.
    rows = [b.attn.attention[:, :, query, :length].expand(len(tokens), -1, -1) for b in model.transformer.h]
    return AttentionStep(rows, window[:, :length].clone(), key_start, tokens)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_truncated: int = 0
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


@torch.inference_mode()
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
) -> Iterator[list[int]]:
    """Yield, per step, one new token id per sample (`FINISHED` for samples that already emitted `eos_id`).

    Stops after `max_new_tokens` steps or when every sample has emitted `eos_id` (pass None to ignore EOS).
    `compile` runs each cached step through `compiled_decode_step` (ignored without the cache: that path is the
    plain reference). `on_attention`, if given, is called with an `AttentionStep` for every yielded step, before it
    is yielded: the attention of the forward pass that produced it (prefill, decode step or window re-prefill).

    `lookup=N` (one sample, with the cache) is prompt-lookup decoding: up to N draft tokens copied from where the
    latest n-gram last occurred (`gptmini.lookup.NgramIndex`) are checked in one forward pass with the token being
    fed (`accept_draft`). The tokens yielded are the same as without it when greedy, and drawn from the same
    distribution when sampling (not the same draws for a seed); windows slide at the same tokens.
    """
    config = model.config
    device = model.transformer.wte.weight.device
    stats = stats if stats is not None else GenerationStats()
    block = config.block_size
    if len(prompt_ids) == 0:
        raise ValueError("the prompt must hold at least one token (use <|endoftext|> for unconditional text)")
    check_lookup(lookup, num_samples)
    stats.prompt_tokens = len(prompt_ids)
    stats.prompt_truncated = max(0, len(prompt_ids) - block)
    kept = list(prompt_ids[-block:])
    if max_new_tokens <= 0:
        return

    generator = make_generator(sampling.seed, device)
    # The current window of tokens per sample; positions 0..length-1 are in the cache (when there is one).
    window = torch.zeros(num_samples, block, dtype=torch.long, device=device)
    window[:, : len(kept)] = torch.tensor(kept, dtype=torch.long, device=device)
    length = len(kept)
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros(num_samples, config.vocab_size, dtype=torch.bool, device=device)
        seen[:, torch.tensor(sorted(set(prompt_ids)), device=device)] = True

    cache = KVCache.for_model(model, batch_size=1) if use_cache else None
    drafter = Drafter(prompt_ids, lookup) if lookup and cache is not None else None
    queued: list[int] = []  # tokens a verify pass already decided, yielded one per step
    verify_start = 0  # window position of the token the last verify pass fed
    step_fn = None
    # One token of one sample: the whole step in one native call, where the kernels are built (gptmini.native).
    native_step = None
    if cache is not None and num_samples == 1 and on_attention is None and not compile:
        native_step = DecodeStep.for_model(model, cache)
    if compile and use_cache:
        # A compiled graph cannot hand out its attention: capturing runs the same static decode step eagerly.
        step_fn = model.decode_step if on_attention is not None else compiled_decode_step(model)
    capture = contextlib.ExitStack()  # closed in the `finally` below
    if on_attention is not None:
        capture.enter_context(model.keeping_attention())
    key_start = stats.prompt_truncated  # where the window starts in prompt + generated tokens
    t_decode = None
    try:
        t0 = time.perf_counter()
        logits = model(window[:1, :length], cache=cache, start_pos=0, last_only=True)[0][:, -1]
        if cache is not None and num_samples > 1:
            cache = cache.expand(num_samples)  # one prefill serves every sample
        if step_fn is not None:
            # The compiled step's inputs live at fixed addresses (CUDA graphs replay from them); refilled each step.
            step_tok = torch.zeros(num_samples, 1, dtype=torch.long, device=device)
            step_pos = torch.zeros((), dtype=torch.long, device=device)
            _mark_static(*cache.k_layers, *cache.v_layers, step_tok, step_pos)
        next_tok = sample_next(logits.expand(num_samples, -1), sampling, generator, seen)
        ids = next_tok.tolist()
        synchronize(device)
        stats.prefill_s = time.perf_counter() - t0
        if on_attention is not None:
            on_attention(_attention_step(model, window, length, key_start, next_tok))

        finished = [False] * num_samples
        t_decode = time.perf_counter()
        for step in range(max_new_tokens):
            out = []
            for i, tok in enumerate(ids):
                out.append(FINISHED if finished[i] else tok)
                if eos_id is not None and tok == eos_id:
                    finished[i] = True
            stats.new_tokens = step + 1
            yield out
            if all(finished) or step == max_new_tokens - 1:
                break
            t_step = time.perf_counter()
            if seen is not None:
                seen.scatter_(1, next_tok[:, None], True)
            draft: list[int] = []
            if drafter is not None:
                drafter.append(ids[0])
                # A pass writes the fed token and the draft at length.., all inside the window (so windows slide
                # where plain decoding slides them), and decides no more tokens than are still to come.
                if not queued:
                    draft = drafter.draft(min(block - 1 - length, max_new_tokens - step - 2))
            if queued or draft:
                if queued:
                    # Decided by the last verify pass: already in the cache and the window, and in `seen` now.
                    query = length - verify_start
                    decided, queued = queued[:1], queued[1:]
                else:
                    window[0, length] = next_tok[0]
                    window[0, length + 1 : length + 1 + len(draft)] = torch.tensor(draft, device=device)
                    if native_step is not None:  # the fed token and the draft in one native call
                        rows = native_step.forward([ids[0], *draft], length)
                    else:
                        fed = window[:, length : length + 1 + len(draft)]
                        rows = model(fed, cache=cache, start_pos=length)[0][0]
                    decided = accept_draft(rows, draft, sampling, generator, seen)
                    stats.lookup_passes += 1
                    stats.lookup_drafted += len(draft)
                    stats.lookup_accepted += len(decided) - 1
                    drafter.verified(len(decided) - 1, time.perf_counter() - t_step)
                    verify_start, query = length, 0
                    decided, queued = decided[:1], decided[1:]
                length += 1
                ids = decided
                next_tok = torch.tensor(ids, device=device)
                if on_attention is not None:
                    on_attention(_attention_step(model, window, length, key_start, next_tok, query))
                if record_step_times:
                    stats.step_times.append(time.perf_counter() - t_step)
                continue
            slid = length == block
            if slid:
                # Window full: drop the oldest quarter, re-prefill the rest (+ the new token) at positions 0..
                keep = block - window_shift(block)
                window[:, : keep - 1] = window[:, length - keep + 1 : length].clone()
                window[:, keep - 1] = next_tok
                key_start += length - keep + 1
                length = keep
                logits = model(window[:, :length], cache=cache, start_pos=0, last_only=True)[0][:, -1]
                stats.window_slides += 1
            else:
                window[:, length] = next_tok
                length += 1
                if step_fn is not None:
                    step_tok.copy_(next_tok[:, None])
                    step_pos.fill_(length - 1)
                    logits = step_fn(step_tok, step_pos, cache)
                elif native_step is not None:
                    logits = native_step(ids[0], length - 1)
                elif cache is not None:
                    logits = model(next_tok[:, None], cache=cache, start_pos=length - 1)[0][:, -1]
                else:
                    logits = model(window[:, :length], last_only=True)[0][:, -1]
            next_tok = sample_next(logits, sampling, generator, seen)
            ids = next_tok.tolist()  # the one host sync per step: the caller needs the token
            if drafter is not None and not slid:
                drafter.stepped(time.perf_counter() - t_step)  # what a pass must beat, per token it decides
            if on_attention is not None:
                on_attention(_attention_step(model, window, length, key_start, next_tok))
            if record_step_times:
                stats.step_times.append(time.perf_counter() - t_step)
    finally:
        capture.close()
        if t_decode is not None:
            stats.decode_s = time.perf_counter() - t_decode


def accept_draft(
    logits: torch.Tensor,
    draft: list[int],
    sampling: SamplingConfig,
    generator: torch.Generator,
    seen: torch.Tensor | None,
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
    if sampling.temperature == 0:
        best = sample_next(logits, sampling, None, seen).tolist()
        kept = next((j for j in range(k) if best[j] != draft[j]), k)
        return best[: kept + 1]
    probs = next_token_probs(logits, sampling, seen)
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


def compiled_decode_step(model: GPT) -> Callable[[torch.Tensor, torch.Tensor, KVCache], torch.Tensor]:
    """`model.decode_step` compiled once per model (static shapes; on CUDA also captured as a CUDA graph).

    On CPU, inductor's freezing folds the weights into the graph as constants and prepacks them for oneDNN.
    The first call compiles (seconds to tens of seconds); later calls, at any position, reuse the graph.
    """
    step = model.__dict__.get("_compiled_decode_step")
    if step is None:
        device = model.transformer.wte.weight.device
        mode = "reduce-overhead" if device.type == "cuda" else None  # reduce-overhead = CUDA graphs
        compiled = torch.compile(model.decode_step, mode=mode, dynamic=False)
        if device.type == "cpu":
            import torch._inductor.config as inductor_config

            def step(idx: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
                # Freezing is read when a graph is compiled, lazily at a call; `options=` does not reach it.
                with inductor_config.patch(freezing=True):
                    return compiled(idx, pos, cache)
        else:
            step = compiled
        model.__dict__["_compiled_decode_step"] = step  # not a submodule: keep it out of state_dict
    return step


def _mark_static(*tensors: torch.Tensor) -> None:
    """Tell CUDA-graph capture these inputs keep their address, so replays read them without a copy."""
    if tensors[0].device.type == "cuda":
        for t in tensors:
            torch._dynamo.mark_static_address(t)


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
) -> Iterator[str]:
    """Yield the completion of one sample as text pieces, as soon as each is certain (`on_attention`, `lookup`:
    as for `generate_tokens`)."""
    stats = stats if stats is not None else GenerationStats()
    decoder = tokenizer.stream_decoder()
    matcher = StopMatcher(sampling.stop)
    stats.stop_reason = "max_new_tokens"
    tokens = generate_tokens(
        model,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_id=None if ignore_eos else tokenizer.eot_id,
        use_cache=use_cache,
        compile=compile,
        stats=stats,
        on_attention=on_attention,
        lookup=lookup,
    )
    try:
        for (tok,) in tokens:
            if not ignore_eos and tok == tokenizer.eot_id:
                stats.stop_reason = "eos"
                break
            piece = matcher.feed(decoder.push(tok))
            if piece:
                yield piece
            if matcher.done:
                stats.stop_reason = "stop"
                break
        tail = matcher.feed(decoder.flush()) + matcher.flush()
        if tail:
            yield tail
    finally:
        tokens.close()


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
) -> list[str]:
    """`num_samples` completions of one prompt, drawn in one batch from a single prefill."""
    eos_id = None if ignore_eos else tokenizer.eot_id
    decoders = [tokenizer.stream_decoder() for _ in range(num_samples)]
    matchers = [StopMatcher(sampling.stop) for _ in range(num_samples)]
    texts = [""] * num_samples
    done = [False] * num_samples
    tokens = generate_tokens(
        model,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        num_samples=num_samples,
        eos_id=eos_id,
        use_cache=use_cache,
        compile=compile,
        stats=stats,
        on_attention=on_attention,
        lookup=lookup,
    )
    try:
        for step_ids in tokens:
            for i, tok in enumerate(step_ids):
                if done[i]:
                    continue
                if tok in (FINISHED, eos_id):
                    done[i] = True
                    continue
                texts[i] += matchers[i].feed(decoders[i].push(tok))
                done[i] = matchers[i].done
            if all(done):
                break
    finally:
        tokens.close()
    return [t + m.feed(d.flush()) + m.flush() for t, m, d in zip(texts, matchers, decoders, strict=True)]
