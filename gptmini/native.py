"""The CPU kernels of `native.c`, built on first use with the machine's C compiler and loaded through ctypes.

Decoding reads every weight once per token. PyTorch's own few-row products (`F.linear`, oneDNN's packed linear,
fbgemm's int8, ATen's int4) read them well below the memory's speed on one or two rows; `native.c` streams them, in
fp32, bf16 (fp32 sums against fp32 activations), int8 and int4 (exact integer sums against 16-bit activations), and
runs a whole batch-1 decode step in one call (`DecodeStep`).

The library is compiled once per source and machine (`cc -O3 -march=native -fopenmp`, about a second) into
`$XDG_CACHE_HOME/gptmini/native/` (default `~/.cache`) and reused. Without a compiler — or with `GPTMINI_NATIVE=0` —
`library()` is None and callers keep PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from gptmini.config import INT4_GROUPS

SOURCE = Path(__file__).with_name("native.c")
WEIGHT_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
INT8, INT4 = 2, 3
# Up to this many activation rows use the kernels; more (a prefill) are matmul-bound: BLAS does them.
MAX_ROWS = 16


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gptmini" / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpuinfo() -> dict[str, str]:
    """The first CPU's fields in /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, sep, value = line.partition(":")
            if not sep:
                if fields:
                    break  # the blank line after the first CPU
                continue
            fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    return fields


def _cpu_signature() -> str:
    """What the build depends on: the CPU's vendor (the streams a thread reads), model and feature flags."""
    info = _cpuinfo()
    if not info:
        return platform.processor() + platform.machine()
    return "\n".join(info.get(k, "") for k in ("vendor_id", "model name", "flags"))


def _cpu_vendor() -> str:
    return _cpuinfo().get("vendor_id", "")


def build(
    compiler: str,
    target: Path,
    march: str = "native",
    streams: int | None = None,
    source: Path = SOURCE,
    ahead: int | None = None,
) -> None:
    """Compile `source` into `target`, atomically (a temporary file renamed into place). `march` other than
    "native" builds for another CPU level (the tests build `x86-64-v2`, without AVX-512, to check the plain loops);
    `streams` sets the weight streams a thread reads side by side (default: 2 on AMD, 4 elsewhere), `ahead` how
    many bytes each stream prefetches ahead of its loads (default: none on AMD, 4096 elsewhere)."""
    amd = _cpu_vendor() == "AuthenticAMD"
    if streams is None:
        # Zen 4 reads 2 spread streams a thread fastest (int4 1.2-1.3x, fp32 1.1x one stream; 4 streams 5-10 %
        # slower than 2); Sapphire Rapids reads 4 fastest (see run_product in native.c).
        streams = 2 if amd else 4
    if ahead is None:
        # Sapphire Rapids' prefetchers fall behind (4 KiB ahead: 1.3x); Zen 4's do better without help.
        ahead = 0 if amd else 4096
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        flags = ["-O3", f"-march={march}", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
        flags += [f"-DSTREAMS={streams}", f"-DAHEAD={ahead}"]
        subprocess.run(
            [compiler, *flags, "-o", tmp, str(source), "-lm"], check=True, capture_output=True, timeout=120
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot be built here (no compiler, not x86 / ARM Linux or macOS)."""
    if os.environ.get("GPTMINI_NATIVE", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None or not SOURCE.exists():
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + compiler.encode() + _cpu_signature().encode()).hexdigest()[:16]
    target = cache_dir() / f"native-{key}.so"
    try:
        if not target.exists():
            build(compiler, target)
        return load(target)
    except (OSError, subprocess.SubprocessError):
        return None


def load(path: Path) -> ctypes.CDLL:
    """A built library with its functions' signatures declared."""
    lib = ctypes.CDLL(str(path))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.gm_linear.argtypes = [p, i64, i64, p, i32, i64, p, i64, p, p, i64, i32]
    lib.gm_linear.restype = None
    lib.gm_decode.argtypes = [p, p, p, p, i64, p, p, p, i32]
    lib.gm_decode.restype = None
    return lib


def available() -> bool:
    return library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    wtype: int,
    out_features: int,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """`x [..., K]` (fp32) times the stored weight: fp32 `[..., out_features]`. All tensors contiguous, on the CPU.

    int8: `scale` holds the fp32 scale of each output row. int4: `weight` and `scale` are `pack_int4`'s codes and
    (scale, zero) pairs (the group size follows from their shapes).
    """
    lib = lib or library()
    rows = x.reshape(-1, x.shape[-1])
    if not rows.is_contiguous():
        rows = rows.contiguous()
    y = torch.empty(rows.shape[0], out_features, dtype=torch.float32)
    lib.gm_linear(
        rows.data_ptr(),
        rows.shape[0],
        rows.shape[1],
        weight.data_ptr(),
        wtype,
        out_features,
        _ptr(scale),
        packed_int4_group(weight, scale) if wtype == INT4 else 0,
        _ptr(bias),
        y.data_ptr(),
        out_features,
        torch.get_num_threads(),
    )
    return y.view(*x.shape[:-1], out_features)


def pack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes `q` (uint8 0…15, `[N, K]`) and the scales and zeros of their groups of G inputs (`[N, K/G]`, G one of
    `INT4_GROUPS`, K a multiple of G) in `native.c`'s int4 layout: rows padded with zeros to a multiple of 256
    inputs, each block of 256 in the block order (its 8 runs of 32 inputs cut into 4-code pieces and transposed,
    piece w of run r at 8·w + r), two codes per byte (byte j of a block's 128 holds codes j and j + 64 of its half),
    and each group's scale and zero as one int32 `[N, Kp/G]`: the bf16 scale in its low half, the zero in its high."""
    n, k = q.shape
    group = k // scale.shape[1]
    if group not in INT4_GROUPS or k % group:
        raise ValueError(f"int4 groups of {group} inputs over {k}: the kernel takes {INT4_GROUPS}")
    kp = -(-k // 256) * 256
    runs = F.pad(q, (0, kp - k)).reshape(n, kp // 256, 8, 8, 4)  # [row, block, run, piece, 4 codes]
    ordered = runs.transpose(2, 3).reshape(n, kp // 256, 2, 2, 64)  # [row, block, half, nibble, 64]
    codes = (ordered[..., 0, :] | (ordered[..., 1, :] << 4)).reshape(n, kp // 2).contiguous()
    pad = (0, (kp - k) // group)
    bits = [F.pad(t.float(), pad).bfloat16().view(torch.int16).int() & 0xFFFF for t in (scale, zero)]
    return codes, (bits[0] | (bits[1] << 16)).contiguous()


def packed_int4_group(codes: torch.Tensor, scale: torch.Tensor) -> int:
    """The group size of `pack_int4`'s packed codes and scales (rows of Kp/2 bytes, Kp/G scales)."""
    return codes.shape[-1] * 2 // scale.shape[-1]


# ---- how many threads a step runs on -------------------------------------------------------------------------

_fixed_threads: int | None = None


def fix_threads(n: int | None) -> None:
    """Run every native step on exactly `n` threads (`--threads`), or (None) let each step choose."""
    global _fixed_threads
    _fixed_threads = n


class ThreadChooser:
    """The thread count of a step's calls: all of `most` (torch's count when the step was made) on a quiet machine,
    fewer while another job holds a core. PyTorch's own ops between the calls (sampling, a prefill) follow it.

    A step's threads meet at a barrier after every product. Beside a busy loop on one of two cores, most steps on
    two threads still take their usual time, but now and then one stalls for a whole scheduler slice per barrier:
    100-250 ms, against 0.13 ms on one thread (the default model), so on average two threads decoded 2-3x slower.
    So: a call on all threads that takes 10x the usual time of a call of as many tokens is a stall, and at a second stall within
    32 calls (one alone can be any hiccup) the chooser drops to fewer threads; it tries all of them again after 1 s, then 2, 4 .. 32 s while stalls recur (a try of 32
    calls ends at its first stall). On a quiet machine it also tries fewer threads now and then (8 calls, after
    32 to 512 calls: < 1 % of the time) and keeps them where they are faster (a model too small to share).
    """

    TRY_ALL, TRY_FEWER = 32, 8  # calls a try runs
    FIRST_WAIT, LONGEST_WAIT = 32, 512  # calls between tries of fewer threads
    FIRST_BACKOFF, LONGEST_BACKOFF = 1.0, 32.0  # seconds before all threads are tried again after a stall
    STALL = 10.0

    def __init__(self, most: int) -> None:
        self.most, self.fewer = most, max(1, most // 2)
        self.current = most
        # seconds of a call by (threads, tokens in it), smoothed, stalls left out: a batch of 8 rows takes longer
        # than one row, a prompt's tokens less each
        self.usual: dict[tuple[int, int], float] = {}
        self.trying = 0  # calls left in a try of the other count
        self.tried: list[float] = []  # the try's times, and the current count's since it began
        self.ours: list[float] = []
        self.wait = self.until_try = self.FIRST_WAIT
        self.backoff = self.FIRST_BACKOFF
        self.retry_at = 0.0  # time.monotonic() from which all threads may be tried again
        self.since_stall = 1 << 30  # calls on all threads since the last stall

    @property
    def other(self) -> int:
        return self.fewer if self.current == self.most else self.most

    def pick(self) -> int:
        """The count for the next call; PyTorch's is set to it too (its ops wait at barriers just the same)."""
        if _fixed_threads is not None:
            return _fixed_threads
        threads = self.other if self.trying else self.current
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return threads

    def record(self, threads: int, seconds: float, tokens: int = 1) -> None:
        """What a call picked by `pick` took, and how many tokens it fed."""
        if _fixed_threads is not None or self.most == 1 or threads not in (self.most, self.fewer):
            return
        stalled = False
        if threads == self.most:
            ours, theirs = self.usual.get((threads, tokens)), self.usual.get((self.fewer, tokens))
            usual = min(ours, theirs) if ours and theirs else ours or theirs
            stalled = bool(usual) and seconds > self.STALL * usual
        if not stalled:
            before = self.usual.get((threads, tokens))
            self.usual[threads, tokens] = seconds if before is None else 0.9 * before + 0.1 * seconds
        seconds_per_token = seconds / tokens
        if threads == self.most:
            previous, self.since_stall = self.since_stall, 0 if stalled else self.since_stall + 1
            if stalled and (self.trying or previous < 32):
                self._stalled()
                return
        if self.trying:
            self.tried.append(seconds_per_token)
            self.trying -= 1
            if not self.trying:
                self._decide()
        else:
            self.ours = [*self.ours[-31:], seconds_per_token]
            self.until_try -= 1
            may_retry = self.current == self.fewer and time.monotonic() >= self.retry_at
            if (self.current == self.most and self.until_try <= 0) or may_retry:
                self.trying = self.TRY_ALL if self.other == self.most else self.TRY_FEWER
                self.tried = []

    def _stalled(self) -> None:
        """A call on all threads waited for a descheduled one: fewer threads, and all of them again later."""
        self.current, self.trying = self.fewer, 0
        self.retry_at = time.monotonic() + self.backoff
        self.backoff = min(2 * self.backoff, self.LONGEST_BACKOFF)
        self.ours = []

    def _decide(self) -> None:
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        if self.ours and mean(self.tried) < 0.9 * mean(self.ours):
            self.current, self.ours = self.other, list(self.tried)
            self.wait = self.FIRST_WAIT
        elif self.current == self.most:
            self.wait = min(2 * self.wait, self.LONGEST_WAIT)
        else:  # all threads did not win: try them again later
            self.retry_at = time.monotonic() + self.backoff
            self.backoff = min(2 * self.backoff, self.LONGEST_BACKOFF)
        self.until_try = self.wait


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
    from gptmini.quantize import Int4Linear, Int8Linear, NativeLinear

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
        self._lib = library()
        self._model_ref = ctypes.byref(self._model)
        self.threads = ThreadChooser(torch.get_num_threads())

    def _hold(self, t: torch.Tensor) -> int:
        assert t.is_contiguous()
        self._keep.append(t)
        return t.data_ptr()

    @classmethod
    def for_model(cls, model: torch.nn.Module, cache) -> DecodeStep | None:
        weight = model.transformer.wte.weight
        if library() is None or weight.device.type != "cpu":
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
