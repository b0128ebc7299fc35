"""Choose the device and dtype once; every other line of the library stays device-agnostic."""

from __future__ import annotations

import contextlib
import time

import torch

from gptmini.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda > mps > cpu; asking for an absent accelerator is a user error, not a crash."""
    base = name.split(":")[0]
    if base not in DEVICES:
        raise UserError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if base == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if base == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if base == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    return torch.device(name)


def set_threads(n: int) -> None:
    """Run on exactly `n` CPU threads: PyTorch's, and every native decode step's (which otherwise picks between all
    cores and fewer by what is faster at the moment, see `gptmini.native.ThreadChooser`)."""
    from gptmini import native

    torch.set_num_threads(n)
    native.fix_threads(n)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` = bf16 on CUDA GPUs that support it, fp32 elsewhere (exact parity with the reference by default)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose auto, float32, bfloat16 or float16")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision where it applies (bf16/fp16 compute with fp32 master weights); a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so timings measure work rather than launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak accelerator memory allocated by torch, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except ImportError:  # pragma: no cover - Windows
        return None


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matmul instructions (AVX512-BF16 / AMX), where bf16 autocast pays."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_train_dtype(name: str, device: torch.device) -> torch.dtype:
    """Training compute dtype: `auto` = bf16 autocast on bf16-capable GPUs and CPUs, fp32 elsewhere.

    Weights and optimizer state stay fp32 either way; bf16 only applies to the matmuls (autocast).
    """
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    dtype = resolve_dtype(name, device)
    if dtype == torch.float16:
        raise UserError(
            "training in float16 is not supported (it needs loss scaling); use bfloat16 or float32"
        )
    return dtype


def keep_freed_memory_on_cpu() -> None:
    """Stop glibc from returning big freed blocks to the OS, so each training step reuses the last one's pages.

    By default glibc serves large allocations with mmap and unmaps them on free; a training step allocates and frees
    the same large activations every time, and faulting those pages back in cost about half of a small model's
    step. Raising the mmap and trim thresholds keeps them in the heap. A no-op off glibc.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        pass


def release_freed_memory() -> None:
    """Hand the memory glibc holds as freed back to the OS (malloc_trim): after tokenising a corpus, its scratch
    memory would otherwise stay in this process's heap and add to its peak. A no-op off glibc."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def measure_matmul_flops(
    device: torch.device,
    dtype: torch.dtype,
    shape: tuple[int, int, int] = (2048, 1024, 1024),
    seconds: float = 0.5,
) -> float:
    """Measured matmul throughput (FLOP/s) of an (m×k)·(k×n) product: the peak MFU is quoted against."""
    m, k, n = shape
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    c = torch.empty(
        m, n, device=device, dtype=dtype
    )  # reused: time the product, not page faults of its output
    torch.matmul(a, b, out=c)  # warm-up: kernel selection
    synchronize(device)
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.matmul(a, b, out=c)
        synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return 2 * m * k * n / times[len(times) // 2]
