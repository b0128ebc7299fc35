"""The engine's forward passes: one choice of step, made once per engine, for every row it decodes.

A row is one sequence in one row ("slot") of the KV cache. The engine asks for three kinds of pass:
  * `prefill(slot, ids)`: a prompt's keys and values into the slot, and its logits;
  * `slide(slot, window)`: the same for a window that slid (the oldest quarter dropped), logits unused;
  * `forward(batch)`: for each row, the tokens it feeds (its next token, maybe a lookup draft after it) at the
    positions after its window, and their logits.

Kinds:
  * `native`: the CPU kernels (`gptmini.decode_step.DecodeStep`): every row of a `forward` in one C call that reads the
    weights once, any slot at any position; a row's bits do not depend on the others. Prompts and slid windows go
    through the same kernels (a 512-token prompt of GPT-2 small: as fast as PyTorch's BLAS in fp32, faster in
    int8 and int4), so a row's keys and values are the same bits however its text reached the cache.
  * `torch`: PyTorch. On an accelerator the rows feeding one token step as one batch over slots 0..n-1 (`packed`:
    the engine keeps its rows there); on the CPU each row steps alone, since PyTorch's batched kernels may round a
    row differently in another batch. `compile=True` runs the batch through `compiled_decode_step` over every slot
    (static shapes: one graph, a CUDA graph on a GPU).
  * `recompute`: no cache: every pass recomputes the row's whole window. The reference the others are tested
    against (`use_cache=False`).
With `capture`, each pass keeps its attention probabilities (`attention(slot)`), for `--show-attention`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gptmini.decode_step import DecodeStep
from gptmini.kv_cache import KVCache
from gptmini.model import GPT

KINDS = ("auto", "native", "torch", "recompute")


@dataclass
class Fed:
    """A row's part of a `forward`: the tokens it feeds after its `window` (the tokens in its cache)."""

    slot: int
    window: Sequence[int]
    tokens: Sequence[int]


class Passes:
    def __init__(
        self, model: GPT, rows: int, *, kind: str = "auto", compile: bool = False, capture: bool = False
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"step kind must be one of {KINDS}, got {kind!r}")
        self.model = model
        self.device = model.transformer.wte.weight.device
        self.capture = capture
        self.cache = None if kind == "recompute" else KVCache.for_model(model, batch_size=rows)
        self.native = None
        if kind in ("auto", "native") and not (compile or capture):
            self.native = DecodeStep.for_model(model, self.cache)
        if kind == "native" and self.native is None:
            raise ValueError(
                "the native step does not apply to this model here (no compiler, a GPU, a format)"
            )
        self.kind = "native" if self.native is not None else "recompute" if self.cache is None else "torch"
        self.compiled = None
        if compile and self.kind == "torch":
            self.compiled = compiled_decode_step(model)
            # The compiled step's inputs live at fixed addresses (CUDA graphs replay from them); refilled each step.
            self._tokens = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
            self._pos = torch.zeros(rows, dtype=torch.long, device=self.device)
            mark_static(*self.cache.k_layers, *self.cache.v_layers, self._tokens, self._pos)
        self.packed = self.kind == "torch"  # its batches are slots 0..n-1
        # A slot's cached tokens serve a later prompt that starts the same way: exact where a token's keys and
        # values are the same bits whichever pass computed them (the native one), and the slots stay put.
        self.prefix_cache = self.kind == "native"
        self._attention: dict[int, tuple[list[torch.Tensor], int]] = {}

    # ---- the passes -----------------------------------------------------------------------------------------

    def prefill(
        self, slot: int, ids: Sequence[int], every_position: bool = False, start: int = 0
    ) -> torch.Tensor:
        """Logits `[1, V]` of the prompt's last token (`[len(ids) - start, V]` with `every_position`), its first
        `start` tokens already in the slot (a cached prefix: native passes only)."""
        if self.native is not None:
            n = len(ids) - start
            keep = None if every_position else [False] * (n - 1) + [True]
            return self.native.rows(list(ids[start:]), [slot] * n, list(range(start, len(ids))), keep).clone()
        assert start == 0, "a cached prefix needs the native passes"
        return self._run(slot, ids, 0, last_only=not every_position)

    def slide(self, slot: int, window: Sequence[int]) -> None:
        """Recompute the slot's keys and values for a window that slid (a cache-less step needs nothing)."""
        if self.native is not None:
            self.native.rows(
                list(window), [slot] * len(window), list(range(len(window))), [False] * len(window)
            )
        elif self.cache is not None:
            x = torch.tensor([list(window)], dtype=torch.long, device=self.device)
            self.model.hidden_states(x, cache=self.cache.view(slot), start_pos=0)

    def forward(self, batch: Sequence[Fed]) -> list[torch.Tensor]:
        """Each row's logits `[len(tokens), V]`, row j's token i seeing its window and its tokens before i."""
        if self.native is not None:
            logits = self.native.rows(
                [t for f in batch for t in f.tokens],
                [f.slot for f in batch for _ in f.tokens],
                [len(f.window) + i for f in batch for i in range(len(f.tokens))],
            )
            return [logits] if len(batch) == 1 else list(logits.split([len(f.tokens) for f in batch]))
        out: dict[int, torch.Tensor] = {}
        if self.cache is not None and not self.capture and (self.compiled or self.device.type != "cpu"):
            out = self._batched(batch)
        for f in batch:
            if f.slot not in out:
                if self.cache is None:  # the whole window again, with the fed tokens
                    out[f.slot] = self._run(f.slot, [*f.window, *f.tokens], 0)[-len(f.tokens) :]
                else:
                    out[f.slot] = self._run(f.slot, f.tokens, len(f.window))
        return [out[f.slot] for f in batch]

    def copy(self, src: int, dst: int, length: int) -> None:
        """Slot `src`'s first `length` cached positions into slot `dst`."""
        if self.cache is not None and src != dst:
            self.cache.copy_row(src, dst, length)

    def release(self, slot: int) -> None:
        """A slot left empty: its cached keys and values give their memory back (see `KVCache.release_row`)."""
        if self.cache is not None:
            self.cache.release_row(slot)

    def attention(self, slot: int) -> tuple[list[torch.Tensor], int]:
        """The slot's last pass with `capture`: per layer `[1, H, queries, keys]`, and the position of its first
        query (the cache-less passes query from position 0)."""
        return self._attention[slot]

    # ---- helpers --------------------------------------------------------------------------------------------

    def _run(self, slot: int, ids: Sequence[int], start: int, last_only: bool = False) -> torch.Tensor:
        """One PyTorch pass of one row: `ids` at positions start.. of its slot (no cache: from 0)."""
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        cache = None if self.cache is None else self.cache.view(slot)
        with self.model.keeping_attention() if self.capture else contextlib.nullcontext() as layers:
            logits = self.model(x, cache=cache, start_pos=start, last_only=last_only)[0][0]
            if layers is not None:
                self._attention[slot] = ([layer.attention for layer in layers], start)
        return logits

    def _batched(self, batch: Sequence[Fed]) -> dict[int, torch.Tensor]:
        """One decode step over slots 0..n-1 (packed; every slot when compiled): the logits of the rows feeding one
        token. A row feeding a draft steps its first token too, and its own pass then rewrites that position."""
        if all(len(f.tokens) > 1 for f in batch):
            return {}
        if self.compiled is not None:
            tokens, pos = self._tokens, self._pos
            pos.zero_()  # free slots decode a stand-in at position 0: a prefill overwrites it
        else:
            n = max(f.slot for f in batch) + 1
            tokens = torch.zeros(n, 1, dtype=torch.long, device=self.device)
            pos = torch.zeros(n, dtype=torch.long, device=self.device)
        for f in batch:
            tokens[f.slot, 0], pos[f.slot] = f.tokens[0], len(f.window)
        if self.compiled is not None:
            logits = self.compiled(tokens, pos, self.cache)
        else:
            logits = self.model.decode_step(tokens, pos, self.cache.view(slice(0, n), int(pos.max()) + 1))
        return {f.slot: logits[f.slot : f.slot + 1] for f in batch if len(f.tokens) == 1}


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


def mark_static(*tensors: torch.Tensor) -> None:
    """Tell CUDA-graph capture these inputs keep their address, so replays read them without a copy."""
    if tensors[0].device.type == "cuda":
        for t in tensors:
            torch._dynamo.mark_static_address(t)
