"""Cross-entropy through the LM head without materialising the whole batch's logits.

For a small GPT the LM head (n_embd × 50257) is most of the compute, and the logits of a batch (tokens × 50257 fp32:
400 MB for 8 × 256 tokens) are the biggest tensor of the step: allocating, page-faulting and re-reading it in the
softmax, the loss and their backward costs as much as the matmuls. Here the rows go through in chunks: each chunk's
logits are computed in the matmul dtype (bf16 under autocast), turned in place into the loss and straight into
the gradients (softmax − one-hot), and dropped. The
backward pass then only scales the stored gradients, so the head costs the same three matmuls as before and one
chunk of logits in memory.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -1
CHUNK_BYTES = 512 << 20  # logits of at most this many bytes exist at once


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_size: int | None = None,
    compute_dtype: torch.dtype | None = None,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """Sum over positions of −log softmax(hidden · weight[:vocab_size]ᵀ)[target]; targets of −1 are skipped.

    `hidden` is `[..., C]`, `weight` `[V_padded, C]` and `targets` `hidden.shape[:-1]`. Matmuls run in
    `compute_dtype` (bf16 under mixed precision), the softmax in fp32. Returns a 0-dim fp32 tensor (a sum: divide
    by the number of scored positions for the mean). `chunk_bytes` defaults to `CHUNK_BYTES`, read at each call.
    """
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    vocab_size = vocab_size or weight.shape[0]
    compute_dtype = compute_dtype or _autocast_dtype(hidden)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, vocab_size, compute_dtype, chunk_bytes)
    with torch.no_grad():
        return _forward(hidden, weight, targets, vocab_size, compute_dtype, chunk_bytes, need_grads=False)[0]


def _autocast_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    dtype: torch.dtype,
    chunk_bytes: int,
    need_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    w = weight[:vocab_size].to(dtype)
    rows = max(1, chunk_bytes // (vocab_size * 4))
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_grads else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grads else None
    for start in range(0, hidden.shape[0], rows):
        h = hidden[start : start + rows].to(dtype)
        t = targets[start : start + rows]
        keep = t != IGNORE_INDEX
        all_kept = bool(keep.all())
        safe_t = t if all_kept else torch.where(keep, t, 0)
        # The matmuls run in the compute dtype; the softmax runs in fp32, in place in one buffer (fp32
        # elementwise passes are faster on CPU than bf16 ones, and exact enough for the loss).
        logits = (h @ w.T).float()
        picked = logits.gather(1, safe_t[:, None]).squeeze(1)
        peak = logits.amax(dim=-1, keepdim=True)
        probs = logits.sub_(peak).exp_()  # the raw logits are not needed again
        sums = probs.sum(dim=-1)
        losses = sums.log() + peak.squeeze(1) - picked
        total += losses.sum() if all_kept else torch.where(keep, losses, 0.0).sum()
        if need_grads:
            # d(loss)/d(logits) = softmax − one-hot, still in the same buffer; ignored rows get 0.
            scale = sums.reciprocal()[:, None]
            probs.mul_(scale if all_kept else scale * keep[:, None])
            probs.scatter_add_(1, safe_t[:, None], torch.where(keep, -1.0, 0.0)[:, None])
            g = probs.to(dtype)
            grad_h[start : start + rows] = (g @ w).to(grad_h.dtype)
            grad_w[:vocab_size] += g.T @ h
    return total, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, dtype, chunk_bytes):  # type: ignore[override]
        total, grad_h, grad_w = _forward(
            hidden, weight, targets, vocab_size, dtype, chunk_bytes, need_grads=True
        )
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None, None
