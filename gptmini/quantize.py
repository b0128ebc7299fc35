"""Faster CPU decoding: int8 weights (`--quantize int8`), int4 weights (`--quantize int4`) and native linears.

Decoding one token multiplies one activation row by every weight matrix, so on a CPU its speed is the number of
weight bytes read per token divided by the memory bandwidth. Ways to read fewer bytes, faster:

* `pack_linears` (the default for fp32 / bf16 on a CPU): every linear becomes a `NativeLinear`, whose few-row
  products run on `gptmini.native`'s streaming kernels (`F.linear` on a single row reads an fp32 matrix at 10–11
  GB/s here, the native loop at ~30, about a reduction's speed). Where the kernels cannot be built (no C compiler),
  oneDNN-prepacked `PackedLinear`s instead (~23 GB/s fp32, ~17 bf16).
* `quantize_int8`: every linear layer and the LM head keep their weights as int8 with one fp32 scale per output
  row (symmetric, `scale = max|w| / 127`), ¼ of the fp32 bytes. With the native kernels the product is
  weight-only: int8 rows widened to fp32 against fp32 activations, for every row count (a token decoded alone gets
  the bits it gets in a prefill). Without them it is fbgemm's dynamic int8 kernel: the activations are quantised
  on the fly (per tensor, 8 bits), multiplied in int8 with int32 sums and rescaled to fp32. Embeddings, norms and
  attention stay in floating point.
* `quantize_int4`: every linear and the LM head as 4-bit codes with an asymmetric scale and zero per group of
  G inputs (`w ≈ (q − 8)·scale + zero`, q ∈ 0…15, as gpt-fast's int4 and llama.cpp's Q4_1), ⅛ of the fp32 bytes
  plus 4 bytes of bf16 scale and zero per group. `--quantize int4` is G = 128 (gpt-fast's and torchao's default,
  0.53 bytes a weight); `int4-64` and `int4-32` (llama.cpp's block, 0.625 bytes a weight) read more bytes for
  less error. A linear whose inputs are no multiple of G takes the largest of G/2, G/4… (down to 32) that divides
  them. With the native kernels the activations are rounded to int8 per 32 inputs (llama.cpp's Q8_0) and
  multiplied exactly (u8 × s8 VNNI products), for every row count. Without them it is ATen's CPU int4 kernel
  (`_weight_int4pack_mm_for_cpu`, gpt-fast's and torchao's CPU path), vectorised for bf16 activations only (fp32
  ones take a scalar loop, ~25× slower), so each linear rounds its input to bf16 and returns fp32. A linear
  neither takes (outputs not a multiple of 16, inputs not a multiple of 32) stays int8.

All swap `nn.Linear` modules in place for inference only (the model can no longer be trained or saved); the tied
LM head keeps pointing at the embedding matrix as `.weight`, so code that asks for the model's dtype still works.
With fp32, bf16, int8 or int4 linears a batch-1 decode step runs as one native call (`gptmini.decode_step.DecodeStep`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptmini import native
from gptmini.config import INT4_DEFAULT_GROUP, check_quantize_name, int4_group
from gptmini.errors import UserError


def check_quantize(name: str | None, device: torch.device) -> str | None:
    """Validate a `--quantize` value (see `gptmini.config.QUANTIZE_CHOICES`); None / "none" mean none."""
    name = check_quantize_name(name)
    if name is None:
        return None
    if device.type != "cpu":
        raise UserError(
            f"--quantize {name} is for CPU decoding; add --device cpu (or use --dtype bfloat16 on a GPU)"
        )
    if name.startswith("int4") and not (native.available() or int4_supported()):
        raise UserError(
            "--quantize int4 needs PyTorch's CPU int4 kernel (torch >= 2.5), which this build lacks"
        )
    if not native.available() and "fbgemm" not in torch.backends.quantized.supported_engines:
        raise UserError(f"--quantize {name} needs PyTorch's fbgemm kernels (x86-64), which this build lacks")
    return name


class Int8Linear(nn.Module):
    """`y = x·Wᵀ + b` with W stored as per-row int8, multiplied by the native kernel (16-bit activations) or, where
    it cannot be built, fbgemm's dynamic int8 kernel (8-bit activations)."""

    def __init__(self, linear: nn.Linear, *, keep_weight: bool = False) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        w = linear.weight.detach().float()
        # max |w| per row from its min and max, and the codes rounded in place: the same bits as |w| and two more
        # temporaries, in half the time (start-up of `serve --quantize int8`: 0.44 -> 0.23 s for GPT-2 small)
        lo, hi = torch.aminmax(w, dim=1)
        scale = (torch.maximum(hi, -lo) / 127).clamp(min=1e-12)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.scale = scale
        self._native = native.available()
        if self._native:  # the int8 rows themselves
            self.qweight = (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
            self.bias = bias
        else:
            # Quantized tensors are deprecated in favour of torchao, but still shipped: the fastest PyTorch int8.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qweight = torch.quantize_per_channel(
                    w, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8
                )
                self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        # Without VNNI, fbgemm multiplies u8 × s8 pairs with an int16 sum that saturates (255·127·2 > 32767): the
        # activations must then be quantised to 7 bits (PyTorch's `reduce_range`), or the logits go visibly wrong.
        self.reduce_range = not _has_vnni()
        if keep_weight:  # the tied LM head: the embedding still needs this matrix, and callers read its dtype
            self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        if self._native:  # every row count: a token decoded alone gets the bits it gets in a prefill
            y = native.linear(
                rows,
                self.qweight,
                wtype=native.INT8,
                out_features=self.out_features,
                scale=self.scale,
                bias=self.bias,
            )
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        y = torch.ops.quantized.linear_dynamic(rows, self._packed, self.reduce_range)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row"


def int4_supported() -> bool:
    return all(
        hasattr(torch, op) for op in ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu")
    )


def int4_quantize(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes `q` (uint8 in 0…15, `[N, K]`) and a scale and zero per group of inputs (`[N, K/group]`, fp32 holding
    bf16 values: what the kernel stores) with `w ≈ (q − 8)·scale + zero`; each group's min/max span 0…15."""
    n, k = w.shape
    groups = w.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    # Rounded to bf16 before the codes are chosen, so the codes fit the scale and zero the kernel will read.
    scale = ((hi - lo) / 15).clamp(min=1e-10).bfloat16().float()
    zero = (lo + 8 * scale).bfloat16().float()
    q = ((groups - zero[..., None]) / scale[..., None]).round() + 8
    return q.clamp(0, 15).to(torch.uint8).reshape(n, k), scale, zero


def int4_packable(linear: nn.Linear, group_size: int = INT4_DEFAULT_GROUP) -> bool:
    """Whether the CPU int4 kernel takes this linear: outputs a multiple of 16, inputs a multiple of the group."""
    return linear.out_features % 16 == 0 and linear.in_features % group_size == 0


class Int4Linear(nn.Module):
    """`y = x·Wᵀ + b` with W as group-wise int4 codes (see `int4_quantize`), multiplied by ATen's CPU int4 kernel.

    `activations` is the dtype the kernel computes in: bf16 (its vectorised path; the default) or fp32 (a scalar
    loop, exact to fp32 rounding: for checking).
    """

    def __init__(
        self,
        linear: nn.Linear,
        *,
        keep_weight: bool = False,
        group_size: int = INT4_DEFAULT_GROUP,
        activations: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        if not int4_packable(linear, group_size):
            raise ValueError(
                f"int4 needs out_features % 16 == 0 and in_features % {group_size} == 0, "
                f"got {linear.out_features} x {linear.in_features}"
            )
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.group_size = group_size
        self.activations = activations
        q, scale, zero = int4_quantize(linear.weight, group_size)
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        # The native kernel (groups of 32-128, activations as int8 per 32) takes every row count, so a token
        # decoded alone gets the bits it gets in a prefill; `activations=torch.float32` asks for ATen's exact loop.
        self._native = (
            native.available() and group_size in native.INT4_GROUPS and activations == torch.bfloat16
        )
        if self._native:
            self.codes, self.scale_zero = native.pack_int4(q, scale, zero)
        else:
            self._packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            # The kernel's layout: [K/group, N, (scale, zero)].
            self.scale_zero = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(activations)
        if keep_weight:  # the tied LM head: the embedding lookup keeps the exact matrix
            self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._native:
            y = native.linear(
                x.float(),
                self.codes,
                wtype=native.INT4,
                out_features=self.out_features,
                scale=self.scale_zero,
                bias=self.bias,
            )
            return y.to(x.dtype)
        rows = x.reshape(-1, self.in_features).to(self.activations)
        y = torch._weight_int4pack_mm_for_cpu(rows, self._packed, self.group_size, self.scale_zero)
        # bf16 product + fp32 bias -> fp32 in one op (type promotion)
        y = y.float() if self.bias is None else torch.add(self.bias, y)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group_size}"


def _has_vnni() -> bool:
    try:
        return bool(torch.cpu._is_vnni_supported())
    except AttributeError:  # an older torch: assume the worst, 7-bit activations are always correct
        return False


class PackedLinear(nn.Module):
    """An fp32 / bf16 linear whose weight oneDNN reordered once into its blocked layout (fast few-row products).

    `batch_size` is the number of rows the layout is chosen for. 16 suits 1 to 16 rows: on GPT-2 small (2 AVX-512
    cores) its blocked layout makes 8 rows 1.6× faster than the 1-row layout and costs a lone row nothing.
    """

    def __init__(self, linear: nn.Linear, *, keep_weight: bool = False, batch_size: int = 16) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self._packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_size)
        self.bias = linear.bias
        if keep_weight:
            self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")


class NativeLinear(nn.Module):
    """An fp32 / bf16 linear whose few-row products (decoding) run on `gptmini.native`'s streaming kernels.

    Up to `native.MAX_ROWS` rows the weight is read once per call at close to memory speed, widened to fp32 and
    summed in fp32 (a bf16 model's activations are widened too; the result is rounded back). More rows — a
    prompt's prefill — are matmul-bound and go to `F.linear` (MKL / oneDNN), which differs only in rounding.
    """

    def __init__(self, linear: nn.Linear, *, keep_weight: bool = False) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._wtype = native.WEIGHT_TYPES[linear.weight.dtype]
        self._bias32 = None if linear.bias is None else linear.bias.detach().float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > native.MAX_ROWS * self.in_features:
            return F.linear(x, self.weight, self.bias)
        y = native.linear(
            x.float(), self.weight, wtype=self._wtype, out_features=self.out_features, bias=self._bias32
        )
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, native {self.weight.dtype}"


def packing_supported(dtype: torch.dtype) -> bool:
    try:
        if dtype == torch.bfloat16:
            return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return dtype == torch.float32 and torch.backends.mkldnn.is_available()
    except (AttributeError, RuntimeError):
        return False


def _swap_linears(model: nn.Module, make: Callable[..., nn.Module]) -> nn.Module:
    head = model.lm_head
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make(child, keep_weight=child is head))
    return model


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Swap every linear (LM head included) for an `Int8Linear`, in place; its KV cache will be bf16.

    With ¼ of the weight bytes, an fp32 cache would be a third of what a token reads at 900 positions of GPT-2
    small; bf16 halves that (attention still computes in fp32, see `model.attend`).
    """
    model.kv_cache_dtype = torch.bfloat16
    return _swap_linears(model, Int8Linear)


@torch.no_grad()
def quantize_int4(model: nn.Module, *, group_size: int = INT4_DEFAULT_GROUP) -> nn.Module:
    """Swap every linear (LM head included) for an `Int4Linear` with groups of `group_size` inputs (or the largest
    of its halves down to 32 that divides the linear's inputs), in place; one the kernel cannot take (see
    `int4_packable`) becomes an `Int8Linear`. The KV cache is bf16, as for int8."""
    model.kv_cache_dtype = torch.bfloat16

    def make(linear: nn.Linear, *, keep_weight: bool = False) -> nn.Module:
        group = group_size
        while linear.in_features % group and group > 32:
            group //= 2
        if int4_packable(linear, group):
            return Int4Linear(linear, keep_weight=keep_weight, group_size=group)
        return Int8Linear(linear, keep_weight=keep_weight)

    return _swap_linears(model, make)


@torch.no_grad()
def pack_linears(model: nn.Module) -> nn.Module:
    """Swap the fp32 / bf16 linears of a CPU model for native-kernel ones (`NativeLinear`) or, where those cannot
    be built, oneDNN-prepacked ones, in place (a no-op elsewhere)."""
    weight = model.transformer.wte.weight
    if weight.device.type != "cpu" or weight.dtype not in native.WEIGHT_TYPES:
        return model
    if native.available():
        return _swap_linears(model, NativeLinear)
    if not packing_supported(weight.dtype):
        return model
    return _swap_linears(model, PackedLinear)


def prepare_for_decoding(
    model: nn.Module, *, quantize: str | None = None, compile: bool = False
) -> nn.Module:
    """The fastest inference form of a loaded model on its device: int8 / int4 if asked, else packed linears on CPU.

    With `compile`, weights stay plain: inductor's freezing packs them itself and cannot trace opaque ones.
    """
    model.eval()
    if quantize == "int8":
        return quantize_int8(model)
    if quantize is not None and quantize.startswith("int4"):
        return quantize_int4(model, group_size=int4_group(quantize))
    return model if compile else pack_linears(model)
