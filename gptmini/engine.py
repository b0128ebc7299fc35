"""The decoding engine: every generation in gptmini — `generate`, `chat`, the Python API, `serve` — runs here.

A request is one prompt to continue; the engine decodes many at once, each in its own row ("slot") of one KV cache.
Requests wait in a bounded queue; up to `parallel` are *active*. Every step:

  1. cancelled requests leave (their row is free at once);
  2. waiting requests are admitted into free rows: their prompt is prefilled in one pass (a prompt equal to the one
     admitted just before copies its cached rows instead: `n` choices, samples of one prompt) and their first token
     sampled, so they join the batch at this very step;
  3. rows whose window is full slide it: the oldest quarter leaves, the rest is re-prefilled at positions 0..;
  4. one forward pass runs over the active rows (`gptmini.steps.Passes`: on the CPU one native call that reads the
     weights once for every row), each row feeding its next token at its own position — and a row with prompt
     lookup its draft after it, verified in the same pass (`accept_draft`), which may decide several tokens;
  5. each row samples with its own settings and its own seeded `torch.Generator`; its text goes through its own
     streaming decoder (no split UTF-8 character) and stop matcher (no stop text, even split over tokens); finished
     rows leave at once.

On the native step a row's arithmetic never depends on its neighbours (its sums run in a fixed order, its integer
activations are quantised on their own), so at temperature 0 a request gets the same tokens and logprobs alone or
in any batch. `start()` runs the steps on an engine thread (the server); without it, the thread that iterates
`generate` / `generate_many` runs them (`gptmini generate`, `chat`, `LM.stream`): a lone generation is a batch of
one. Nothing here knows about HTTP: a consumer submits a `Request` with a callback and receives `Output`s.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from gptmini.decoding import AttentionStep, GenerationStats, accept_draft, window_shift
from gptmini.rows import (
    MAX_LOGPROBS,
    ContextLengthExceeded,
    EngineMetrics,
    Handle,
    Output,
    QueueFull,
    Request,
    Row,
    TokenLogprob,
)
from gptmini.sampling import sample_next
from gptmini.steps import Fed, Passes

log = logging.getLogger("gptmini.engine")


class Engine:
    """Continuous batching for one loaded model (see the module docstring).

    `lm` is a `gptmini.LM` (or anything with `model`, `tokenizer` — None for ids without text — `config` and
    `device`). `step` picks the forward passes (`gptmini.steps`: auto, native, torch, recompute), `compile` the
    compiled PyTorch step, `capture` the attention a request's `on_attention` receives. `submit(request, emit)`
    queues a request; `emit` is called with each `Output`, the last one carrying `finish_reason`.
    `generate(request)` is the same as a blocking iterator.
    """

    def __init__(
        self,
        lm: Any,
        *,
        parallel: int = 4,
        max_queue: int = 64,
        metrics: EngineMetrics | None = None,
        step: str = "auto",
        compile: bool = False,
        capture: bool = False,
    ) -> None:
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        if max_queue < 0:
            raise ValueError(f"max-queue must be >= 0, got {max_queue}")
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.block = lm.config.block_size
        self.vocab_size = lm.config.vocab_size
        self.device = lm.device
        self.parallel = parallel
        self.max_queue = max_queue
        self.metrics = metrics or EngineMetrics()
        self.passes = Passes(self.model, parallel, kind=step, compile=compile, capture=capture)
        self._waiting: collections.deque[Handle] = collections.deque()
        self._rows: list[Row] = []
        self._shared_prefill: tuple[list[int], int, torch.Tensor] | None = None
        # The prefix cache: free slot -> the tokens its keys and values hold, when it was left, and the prompt's
        # scores (the `logprobs` count they were asked with, and one per prompt token) where they were asked for
        self._cached: dict[int, list[int]] = {}
        self._cached_at: dict[int, float] = {}
        self._cached_scores: dict[int, tuple[int, list[TokenLogprob]]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- the consumer side (any thread) ----

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def cache_bytes_per_slot(self) -> int:
        cache = self.passes.cache
        return 0 if cache is None else cache.nbytes() // self.parallel

    def check(self, request: Request) -> None:
        """Raise ContextLengthExceeded / ValueError for a request the engine cannot take."""
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("the prompt must hold at least one token")
        if n > self.block:
            raise ContextLengthExceeded(n, self.block)
        bad = [t for t in request.prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        if request.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {request.max_new_tokens}")
        bad = [t for t in request.sampling.logit_bias if t >= self.vocab_size]
        if bad:
            raise ValueError(
                f"logit_bias: token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})"
            )
        if request.on_attention is not None and not self.passes.capture:
            raise ValueError("on_attention needs an engine made with capture=True")
        request.sampling.validate()

    def submit_many(self, requests: Sequence[tuple[Request, Callable[[Output], None]]]) -> list[Handle]:
        """Queue several requests at once (all or none: QueueFull if they do not all fit)."""
        for request, _ in requests:
            self.check(request)
        handles = [Handle(request, emit) for request, emit in requests]
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            free_rows = self.parallel - len(self._rows)
            if len(self._waiting) + len(handles) > self.max_queue + max(free_rows, 0):
                raise QueueFull(
                    f"{len(self._waiting)} requests are already waiting (--max-queue {self.max_queue})"
                )
            self._waiting.extend(handles)
            self._wake.notify()
        return handles

    def submit(self, request: Request, emit: Callable[[Output], None]) -> Handle:
        return self.submit_many([(request, emit)])[0]

    def generate(self, request: Request) -> Iterator[Output]:
        """Submit and yield the outputs as they come (closing the iterator cancels the request)."""
        for _, out in self.generate_many([request]):
            yield out

    def generate_many(self, requests: Sequence[Request]) -> Iterator[tuple[int, Output]]:
        """Submit `requests` together and yield (index, output) as they come, until all have finished (closing the
        iterator cancels the rest). Without a started engine thread, the caller's thread runs the engine's steps:
        `gptmini generate`, `chat` and `LM.stream` decode this way, a lone request as a batch of one."""
        import queue

        driven = self._thread is None  # the steps run here, between what they emit
        outputs: collections.deque | queue.Queue = collections.deque() if driven else queue.Queue()
        put = outputs.append if driven else outputs.put
        handles = self.submit_many([(r, lambda out, i=i: put((i, out))) for i, r in enumerate(requests)])
        running = len(handles)
        try:
            while running:
                while driven and not outputs:
                    self.run_step()
                i, out = outputs.popleft() if driven else outputs.get()
                running -= out.finish_reason is not None
                yield i, out
        finally:
            for handle in handles:
                handle.cancel()
            if driven:
                self.drop_cancelled()

    def run_step(self) -> None:
        """One engine step in the calling thread (an engine without a thread of its own)."""
        with torch.inference_mode():
            self._run_once()

    def drop_cancelled(self) -> None:
        """End the cancelled requests now (an engine without a thread of its own)."""
        self._drop_cancelled()

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._run, name="gptmini-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued and running, then end the thread (requests left after `timeout` are cancelled)."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                for row in list(self._rows):
                    row.handle.cancel()
                for handle in list(self._waiting):
                    handle.cancel()
                self._thread.join(5)

    # ---- the engine thread ----

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._rows and not self._waiting and not self._stopping:
                        self._wake.wait()
                    if self._stopping and not self._rows and not self._waiting:
                        return
                self._run_once()

    def _run_once(self) -> None:
        try:
            self._drop_cancelled()
            self._admit()
            if self._rows:
                self._step()
        except Exception as e:  # a failed step ends the requests in it, never the server
            log.error("engine step failed:\n%s", traceback.format_exc())
            self._fail_all(f"generation failed: {type(e).__name__}: {e}")

    def _drop_cancelled(self) -> None:
        cancelled = []
        if self._waiting:  # (read without the lock: a request queued just now is seen next step)
            with self._lock:
                cancelled = [h for h in self._waiting if h.cancelled]
                for h in cancelled:
                    self._waiting.remove(h)
        for h in cancelled:
            self._finish_handle(h, "cancelled", prompt_tokens=len(h.request.prompt_ids))
        for i in reversed([i for i, r in enumerate(self._rows) if r.handle.cancelled]):
            row = self._rows[i]
            self._remove_row(i)
            self._done(row, "cancelled", "cancelled")

    def _admit(self) -> None:
        self._shared_prefill = None
        while self._waiting and len(self._rows) < self.parallel:
            with self._lock:
                if not self._waiting:
                    return
                handle = self._waiting.popleft()
            if handle.cancelled:
                self._finish_handle(handle, "cancelled", prompt_tokens=len(handle.request.prompt_ids))
                continue
            try:
                self._prefill(handle)
            except Exception as e:
                log.error("prefill failed:\n%s", traceback.format_exc())
                if self._rows and self._rows[-1].handle is handle:
                    self._rows.pop()
                self._finish_handle(
                    handle, "error", len(handle.request.prompt_ids), error=f"{type(e).__name__}: {e}"
                )

    def _free_slot(self, prompt: list[int]) -> tuple[int, int, tuple[int, list[TokenLogprob]] | None]:
        """A free slot for `prompt`, how many of its first tokens that slot holds already, and the scores of the
        prompt it held (if asked for): the free slot whose cached tokens (what its last request left) share the
        longest prefix with it, else one never used, else the one left longest ago (the prefix cache's
        eviction)."""
        used = {r.slot for r in self._rows}
        free = [i for i in range(self.parallel) if i not in used]
        best, common = None, 0
        if self.passes.prefix_cache:
            for slot in free:
                n = _common_prefix(self._cached.get(slot, ()), prompt)
                if n > common:
                    best, common = slot, n
        if best is None:
            cold = [i for i in free if i not in self._cached]
            best = cold[0] if cold else min(free, key=lambda i: self._cached_at.get(i, 0))
        self._cached.pop(best, None)
        return best, common, self._cached_scores.pop(best, None)

    def _prefill(self, handle: Handle) -> None:
        t0 = time.perf_counter()
        req = handle.request
        scored = req.prompt_logprobs and req.logprobs is not None
        slot, common, scores = self._free_slot(req.prompt_ids)
        cached = min(common, len(req.prompt_ids) - 1)  # the last token is fed again: its logits are needed
        if (
            scored
        ):  # token i's score comes from position i - 1: the cached ones are taken from the last scoring
            usable = scores is not None and scores[0] == req.logprobs
            cached = max(0, min(common - 1, len(req.prompt_ids) - 1, len(scores[1]) - 1)) if usable else 0
        row = Row(handle, slot, self)
        self.metrics.admitted(len(req.prompt_ids), t0 - handle.submitted)
        self._rows.append(row)
        row.window = list(req.prompt_ids)
        shared = self._shared_prefill
        if shared is not None and not any(r.slot == shared[1] for r in self._rows[:-1]):
            shared = None  # that request already left: its slot was released
        if shared is not None and shared[0] == req.prompt_ids and not scored and not self.passes.capture:
            # The same prompt as the request admitted just before (`n` choices, samples of one prompt): its
            # cached keys and values are copied, not computed again.
            self.passes.copy(shared[1], row.slot, len(row.window))
            logits = shared[2]
        else:
            logits = self.passes.prefill(row.slot, row.window, every_position=scored, start=cached)
            row.stats.prompt_cached = cached
            self._shared_prefill = (req.prompt_ids, row.slot, logits[-1:])
        first = Output(prompt_tokens=len(req.prompt_ids))
        if scored:
            head = scores[1][: cached + 1] if cached else [TokenLogprob(req.prompt_ids[0], None)]
            first.prompt_logprobs = head + self._logprobs(
                logits[:-1], req.prompt_ids[cached + 1 :], req.logprobs
            )
            row.prompt_scores = (req.logprobs, first.prompt_logprobs)
        row.decode_from = time.perf_counter()
        row.stats.prefill_s = row.decode_from - t0
        if req.max_new_tokens == 0:
            self._remove_row(len(self._rows) - 1)  # (its prompt stays cached, as any row's)
            first.finish_reason = "length"
            first.stats = row.stats
            self._emit(handle, first)
            self.metrics.finished("length")
            return
        if first.prompt_logprobs is not None:
            self._emit(handle, first)
        self._sample_rows([row], logits[-1:])

    def _step(self) -> None:
        t0 = time.perf_counter()
        for row in self._rows:
            if len(row.window) == self.block:
                # Window full: the oldest quarter leaves and the rest is re-prefilled, so the token about to be
                # decoded lands at position block - shift - 1.
                keep = self.block - window_shift(self.block)
                row.key_start += len(row.window) - keep + 1
                row.window = row.window[len(row.window) - keep + 1 :]
                self.passes.slide(row.slot, row.window)
                row.stats.window_slides += 1
        # Rows with a prompt-lookup draft feed it after their next token, in the same pass (one that fits the
        # window, and decides no more tokens than are still to come).
        fed = []
        for row in self._rows:
            draft = []
            if row.drafter is not None:
                room = min(self.block - 1 - len(row.window), row.req.max_new_tokens - row.generated - 1)
                draft = row.drafter.draft(room)
            fed.append(Fed(row.slot, row.window, [row.next_tok, *draft]))
        rows = list(self._rows)
        t_pass = time.perf_counter()
        logits = self.passes.forward(fed)
        pass_s = time.perf_counter() - t_pass
        finished, plain, plain_logits, drafted = [], [], [], False
        for row, f, out in zip(rows, fed, logits, strict=True):
            if len(f.tokens) > 1:
                drafted = True
                if self._take_verified(row, out, f.tokens[1:], pass_s):
                    finished.append(row)
            else:
                row.window.append(row.next_tok)
                plain.append(row)
                plain_logits.append(out)
        if plain:
            logits = plain_logits[0] if len(plain) == 1 else torch.cat(plain_logits)
            finished += self._sample_rows(plain, logits, remove=False)
        step_s = time.perf_counter() - t0
        for row in rows:
            if row.drafter is not None and not drafted:
                row.drafter.stepped(pass_s)  # a plain step: what a pass must beat, per token it decides
            if row.req.record_step_times:
                row.stats.step_times.append(step_s)
        for row in finished:
            self._remove_row(self._rows.index(row))
        self.metrics.step(len(rows), step_s)

    def _take_verified(self, row: Row, logits: torch.Tensor, draft: list[int], seconds: float) -> bool:
        """Take the tokens a verify pass decides (the kept draft prefix and one token drawn by the model, as
        `gptmini.decoding.accept_draft` rules). True when the row is done."""
        decided = accept_draft(logits, draft, row.req.sampling, row.generator, row.seen, row.counts)
        row.drafter.verified(len(decided) - 1, seconds)
        self.metrics.lookup(len(draft), len(decided) - 1)
        row.stats.lookup_passes += 1
        row.stats.lookup_drafted += len(draft)
        row.stats.lookup_accepted += len(decided) - 1
        row.window.append(row.next_tok)
        for j, tok in enumerate(decided):
            info = None
            if row.req.logprobs is not None:
                info = self._logprobs(logits[j : j + 1], [tok], row.req.logprobs)[0]
            if self._accept(row, tok, info):
                return True
            if j < len(decided) - 1:
                row.window.append(tok)  # a kept draft token: its keys and values are in the cache
        return False

    def _sample_rows(self, rows: list[Row], logits: torch.Tensor, remove: bool = True) -> list[Row]:
        """Sample each row's next token from its logits row, then hand the tokens to the rows' text; returns the
        rows that finished (removed already unless `remove` is False)."""
        each = [logits] if len(rows) == 1 else list(logits.split(1))  # `[1, V]` a row, no copies
        picks = [
            sample_next(
                row_logits,
                row.req.sampling,
                row.generator,
                row.seen,
                row.counts,
                row.constraint.allowed(row_logits.shape[-1]) if row.constraint is not None else None,
            )
            for row, row_logits in zip(rows, each, strict=True)
        ]
        next_ids = (picks[0] if len(picks) == 1 else torch.cat(picks)).tolist()  # the one host sync per step
        finished = []
        for row, row_logits, tok in zip(rows, each, next_ids, strict=True):
            info = None
            if row.req.logprobs is not None:
                info = self._logprobs(row_logits, [tok], row.req.logprobs)[0]
            if self._accept(row, tok, info):
                finished.append(row)
        if remove:
            for row in finished:
                self._remove_row(self._rows.index(row))
        return finished

    def _report_attention(self, row: Row, tok: int) -> None:
        """What the pass that decided `tok` attended to: its query over the window (the keys), per layer."""
        layers, first_query = self.passes.attention(row.slot)
        keys = len(row.window)
        query = keys - 1 - first_query
        weights = [a[:, :, query, :keys] for a in layers]
        window = torch.tensor([row.window], dtype=torch.long)
        row.req.on_attention(AttentionStep(weights, window, row.key_start, torch.tensor([tok])))

    def _accept(self, row: Row, tok: int, info: TokenLogprob | None) -> bool:
        """Take one sampled token into the row's text; True when the request is done."""
        now = time.perf_counter()
        self.metrics.token(
            not row.started, now - (row.last_token_at if row.started else row.handle.submitted)
        )
        row.started = True
        row.last_token_at = now
        row.generated += 1
        row.next_tok = tok
        row.new_ids.append(tok)
        if row.req.on_attention is not None:
            self._report_attention(row, tok)
        if row.drafter is not None:
            row.drafter.append(tok)
        if row.seen is not None:
            row.seen[0, tok] = True
        if row.counts is not None:
            row.counts[0, tok] += 1
        eos = not row.req.ignore_eos and tok == row.eos_id
        if eos or tok in row.stop_ids:
            # The token that ends the text is no part of it, but it was generated: its logprob is listed (as
            # vLLM's, and as lm-eval reads `echo` with `max_tokens: 1`: the prompt's tokens, then one more).
            if info is not None:
                row.pending.append((row.text_len, row.text_len, info))
            self._release_rest(row)
            return self._done(row, "stop", "eos" if eos else "stop")
        if row.constraint is not None:
            row.constraint.take(tok)
        piece = row.decoder.push(tok) if row.decoder is not None else ""
        if info is not None:
            row.pending.append((row.text_len, row.text_len + len(piece), info))
        row.text_len += len(piece)
        text = row.matcher.feed(piece)
        if row.matcher.done:
            self._release(row, text, final=True)
            return self._done(row, "stop", "stop")
        if row.constraint is not None and (row.constraint.done or row.constraint.error):
            self._release_rest(row, text)
            if row.constraint.error:  # no allowed token was left: a grammar llguidance could not follow
                self._finish_handle(
                    row.handle, "error", len(row.req.prompt_ids), row.generated, error=row.constraint.error
                )
                return True
            return self._done(row, "stop", "grammar")
        if row.generated >= row.req.max_new_tokens:
            self._release_rest(row, text)
            return self._done(row, "length", "max_new_tokens")
        self._release(row, text)
        return False

    def _release(self, row: Row, text: str, *, final: bool = False) -> None:
        """Send `text` (and the logprobs of the tokens it completes) to the client."""
        row.released_len += len(text)
        if row.req.strip_leading_space and not row.shown:
            text = text.lstrip()
        row.shown += text[:1]
        tokens = []
        while row.pending:
            start, end, info = row.pending[0]
            if end <= row.released_len or (final and not row.matcher.done):
                tokens.append(info)
            elif final and start < row.released_len:
                tokens.append(info)  # the token where a stop string began: part of it was shown
            else:
                break
            row.pending.popleft()
        if text or tokens or row.new_ids:
            self._emit(row.handle, Output(text=text, tokens=tokens, ids=row.new_ids))
            row.new_ids = []

    def _release_rest(self, row: Row, text: str = "") -> None:
        """The row's last output: `text`, then what its decoder and stop matcher still hold."""
        flushed = row.decoder.flush() if row.decoder is not None else ""
        self._release(row, text + row.matcher.feed(flushed) + row.matcher.flush(), final=True)

    def _done(self, row: Row, reason: str, stop_reason: str) -> bool:
        row.stats.stop_reason = stop_reason
        row.stats.new_tokens = row.generated
        row.stats.decode_s = time.perf_counter() - row.decode_from
        self._finish_handle(row.handle, reason, len(row.req.prompt_ids), row.generated, stats=row.stats)
        return True

    def _finish_handle(
        self,
        handle: Handle,
        reason: str,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        error: str | None = None,
        stats: GenerationStats | None = None,
    ) -> None:
        self.metrics.finished(reason)
        self._emit(
            handle,
            Output(
                finish_reason=reason,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                error=error,
                stats=stats,
            ),
        )

    def _emit(self, handle: Handle, out: Output) -> None:
        try:
            handle.emit(out)
        except Exception:  # a consumer that went away must not stop the others
            handle.cancel()

    def _remove_row(self, index: int) -> None:
        """Free row `index`. Where the passes batch slots 0..n-1, the last row moves into its place."""
        row = self._rows.pop(index)
        freed = row.slot
        if self.passes.packed and self._rows:
            last = max(self._rows, key=lambda r: r.slot)
            if last.slot > row.slot:
                self.passes.copy(last.slot, row.slot, len(last.window))
                freed, last.slot = last.slot, row.slot
        if self.passes.prefix_cache:  # its tokens stay cached for a request that starts the same way
            self._cached[freed], self._cached_at[freed] = row.window, time.perf_counter()
            if row.prompt_scores is not None and not row.stats.window_slides:
                self._cached_scores[freed] = row.prompt_scores
        else:
            self.passes.release(freed)

    def _fail_all(self, message: str) -> None:
        rows, self._rows = self._rows, []
        for row in rows:
            self._finish_handle(row.handle, "error", len(row.req.prompt_ids), row.generated, error=message)

    def _logprobs(self, logits: torch.Tensor, chosen: Sequence[int], top: int) -> list[TokenLogprob]:
        """Each row's log-probability of `chosen[i]` and its `top` most likely tokens."""
        logp = torch.log_softmax(logits[..., : self.vocab_size].float(), dim=-1)
        picked = logp.gather(-1, torch.tensor(chosen, device=logp.device)[:, None])[:, 0].tolist()
        if top > 0:
            values, ids = logp.topk(min(top, MAX_LOGPROBS), dim=-1)
            tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        else:
            tops = [[] for _ in chosen]
        return [
            TokenLogprob(t, lp if math.isfinite(lp) else -9999.0, tp)
            for t, lp, tp in zip(chosen, picked, tops, strict=True)
        ]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many first tokens `a` and `b` share."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)
