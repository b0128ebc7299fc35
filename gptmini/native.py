"""The CPU kernels of `native.c`, built on first use with the machine's C compiler and loaded through ctypes.

Decoding reads every weight once per token. PyTorch's own few-row products (`F.linear`, oneDNN's packed linear,
fbgemm's int8, ATen's int4) read them well below the memory's speed on one or two rows; `native.c` streams them, in
fp32, bf16 (fp32 sums against fp32 activations), int8 and int4 (exact integer sums against 16-bit activations), and
runs a whole decode step in one call (`gm_decode`, bound by `gptmini.decode_step.DecodeStep`).

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
