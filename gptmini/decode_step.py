"""The whole decode step in one C call (`DecodeStep`, `gm_decode` in `native.c`): the model's weights — fp32,
bf16, or `gptmini.quantize`'s int8 / int4 linears — and its KV cache handed to the kernels once, then each call
decodes tokens of any cache rows at their own positions. Above both `gptmini.native` (the kernels) and
`gptmini.quantize` (the formats), so neither imports the other's classes.
"""

from __future__ import annotations

import ctypes
import time

import torch

from gptmini import native
from gptmini.native import INT4, INT8, WEIGHT_TYPES, ThreadChooser, packed_int4_group
from gptmini.quantize import Int4Linear, Int8Linear, NativeLinear

# ---- the whole decode step ------------------------------------------------------------------------------------


class _Linear(ctypes.Structure):
    _fields_ = [
        ("w", ctypes.c_void_p),
        ("wtype", ctypes.c_int64),
        ("n_out", ctypes.c_int64),
        ("n_in", ctypes.c_int64),
        ("group", ctypes.c_int64),
        ("scale", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("ln1_w", "ln1_b", "ln2_w", "ln2_b", "q_norm", "k_norm")),
        *((name, _Linear) for name in ("attn", "attn_proj", "fc", "proj")),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        *(
            (name, ctypes.c_int64)
            for name in ("n_layer", "n_head", "n_embd", "max_len", "cache_bf16", "relu2")
        ),
        ("wte_bf16", ctypes.c_int64),
        ("eps", ctypes.c_double),
        *((name, ctypes.c_void_p) for name in ("wte", "pos_add", "rope", "lnf_w", "lnf_b")),
        ("head", _Linear),
        ("layers", ctypes.POINTER(_Layer)),
    ]


def _weights_of(
    module: torch.nn.Module,
) -> tuple[torch.Tensor, int, torch.Tensor | None] | None:
    """(weight, format, scales: int8's per row, int4's (scale, zero) pairs) of a linear the C step can run, else
    None."""
    if isinstance(module, Int8Linear):
        return (module.qweight, INT8, module.scale) if module._native else None
    if isinstance(module, Int4Linear):
        return (module.codes, INT4, module.scale_zero) if module._native else None
    if isinstance(module, (NativeLinear, torch.nn.Linear)) and module.weight.dtype in WEIGHT_TYPES:
        return module.weight, WEIGHT_TYPES[module.weight.dtype], None
    return None


class DecodeStep:
    """`GPT.forward` for a few tokens in one C call (`gm_decode`): embeddings, every block, the final norm and the
    head, each token in its own row of `cache` at its own position, its keys and values written there as the
    PyTorch path writes them. One call serves a batch of rows decoding one token each (the weights read once for
    all of them), a prefill or lookup-verify pass of one row, or both at once.

    Python and ~30 ATen calls per layer cost more than a small model's arithmetic (the default model's step was 2 ms
    for 6 MFLOP); here a step is the weight reads and a few loops. Everything is in fp32 (bf16 weights and caches
    are widened), so a bf16 model's step rounds less often than its PyTorch twin. A token's logits do not depend on
    the other tokens of the call (the kernels sum in a fixed order and quantise each row on its own). Build one with
    `DecodeStep.for_model`, which returns None where the step does not apply (no kernels, a GPU, a linear in
    another format).
    """

    def __init__(self, model: torch.nn.Module, cache) -> None:
        c = model.config
        self._keep: list[torch.Tensor] = []  # every tensor a pointer refers to
        f32 = lambda t: None if t is None else self._hold(t.detach().float().contiguous())  # noqa: E731

        def lin(module: torch.nn.Module) -> _Linear:
            w, wtype, scale = _weights_of(module)
            bias = getattr(module, "bias", None)
            hold = lambda t: None if t is None else self._hold(t)  # noqa: E731
            return _Linear(
                self._hold(w),
                wtype,
                module.out_features,
                module.in_features,
                packed_int4_group(w, scale) if wtype == INT4 else 0,
                hold(scale),
                f32(bias),
            )

        layers = (_Layer * c.n_layer)()
        for i, block in enumerate(model.transformer.h):
            attn = block.attn
            layers[i] = _Layer(
                f32(block.ln_1.weight),
                f32(block.ln_1.bias),
                f32(block.ln_2.weight),
                f32(block.ln_2.bias),
                f32(attn.q_norm.weight) if attn.qk_norm else None,
                f32(attn.k_norm.weight) if attn.qk_norm else None,
                lin(attn.c_attn),
                lin(attn.c_proj),
                lin(block.mlp.c_fc),
                lin(block.mlp.c_proj),
                self._hold(cache.k_layers[i]),
                self._hold(cache.v_layers[i]),
            )
        self._layers = layers
        wte = model.transformer.wte.weight
        if c.pos_embedding == "learned":
            pos_add, rope = f32(model.transformer.wpe.weight), None
        elif c.pos_embedding == "rotary":
            pos_add, rope = None, f32(model.pos_table)
        else:
            pos_add, rope = f32(model.pos_table), None
        self._sizes = (10 * c.n_embd, cache.max_len, model.lm_head.out_features)
        self.batch_size = cache.batch_size
        self.max_len = cache.max_len
        self._buffers(1, 1, 1)
        self.vocab_size = c.vocab_size
        self._model = _Model(
            c.n_layer,
            c.n_head,
            c.n_embd,
            cache.max_len,
            cache.k.dtype == torch.bfloat16,
            c.arch == "modern",
            wte.dtype == torch.bfloat16,
            c.layer_norm_eps,
            self._hold(wte),
            pos_add,
            rope,
            f32(model.transformer.ln_f.weight),
            f32(model.transformer.ln_f.bias),
            lin(model.lm_head),
            layers,
        )
        self._lib = native.library()
        self._model_ref = ctypes.byref(self._model)
        self.threads = ThreadChooser(torch.get_num_threads())

    def _hold(self, t: torch.Tensor) -> int:
        assert t.is_contiguous()
        self._keep.append(t)
        return t.data_ptr()

    @classmethod
    def for_model(cls, model: torch.nn.Module, cache) -> DecodeStep | None:
        weight = model.transformer.wte.weight
        if native.library() is None or weight.device.type != "cpu":
            return None
        if weight.dtype not in (torch.float32, torch.bfloat16) or cache.k.dtype not in (
            torch.float32,
            torch.bfloat16,
        ):
            return None
        linears = [model.lm_head] + [
            m for b in model.transformer.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)
        ]
        if any(_weights_of(m) is None for m in linears) or not cache.k_layers[0].is_contiguous():
            return None
        return cls(model, cache)

    def _buffers(self, rows: int, threads: int, logit_rows: int) -> None:
        per_row, per_thread, vocab = self._sizes
        self._rows, self._threads, self._logit_rows = rows, threads, logit_rows
        self._work = torch.empty(rows * per_row + threads * per_thread)
        self._logits = torch.empty(logit_rows, vocab)
        self._views: dict[int, torch.Tensor] = {}  # the first k rows of the logits, as a view, by k
        self._tokens = (ctypes.c_int64 * (3 * rows))()  # tokens, then their cache rows, then their positions

    def rows(
        self, tokens: list[int], rows: list[int], positions: list[int], keep: list[bool] | None = None
    ) -> torch.Tensor:
        """Logits `[len(tokens), vocab]` (fp32; a view of a buffer the next call overwrites): token j at position
        `positions[j]` of cache row `rows[j]`, seeing that row's cached positions before it and the tokens of the
        call before it in the same row (which must come in increasing positions). `keep` (one flag a token): only
        those tokens' logits, in order (a prefill needs its last one's)."""
        n, threads = len(tokens), self.threads.pick()
        if not len(rows) == len(positions) == n:
            raise ValueError("tokens, rows and positions must have one entry each per token")
        if n and (
            min(rows) < 0
            or max(rows) >= self.batch_size
            or min(positions) < 0
            or max(positions) >= self.max_len
        ):
            raise ValueError(
                f"a row outside 0..{self.batch_size - 1} or a position outside 0..{self.max_len - 1}"
            )
        kept = n if keep is None else sum(map(bool, keep))
        if n > self._rows or threads > self._threads or kept > self._logit_rows:
            self._buffers(max(n, self._rows), max(threads, self._threads), max(kept, self._logit_rows))
        self._tokens[: 3 * n] = [*tokens, *rows, *positions]
        at = ctypes.addressof(self._tokens)
        flags = None if keep is None else (ctypes.c_uint8 * n)(*map(bool, keep))
        start = time.perf_counter()
        self._lib.gm_decode(
            self._model_ref,
            at,
            at + 8 * n,
            at + 16 * n,
            n,
            flags,
            self._logits.data_ptr(),
            self._work.data_ptr(),
            threads,
        )
        if keep is None:  # a prompt's pass (logits of a few tokens) is no step: its times would mislead
            self.threads.record(threads, time.perf_counter() - start, n)
        view = self._views.get(kept)
        if view is None:
            view = self._views[kept] = self._logits[:kept, : self.vocab_size]
        return view

    def forward(self, tokens: list[int], pos: int, row: int = 0) -> torch.Tensor:
        """Logits of `tokens` of one cache row at positions pos..: `GPT.forward(..., start_pos=pos)` (see `rows`)."""
        return self.rows(tokens, [row] * len(tokens), list(range(pos, pos + len(tokens))))

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        """Logits `[1, vocab]` of one `token` at position `pos` of row 0 (see `rows`)."""
        return self.forward([token], pos)
