"""gptmini/loss.py's hand-written backward (softmax − one-hot, masking, the padded-vocabulary slice) against
autograd through the plain logits: F.cross_entropy(h @ W[:V]ᵀ)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_gpt

import gptmini.loss as loss_mod
from gptmini.loss import IGNORE_INDEX, linear_cross_entropy

VOCAB, PADDED, WIDTH = 50, 64, 16  # 14 padding rows, as the embedding's rounding up to a multiple leaves
B, T = 2, 13  # 26 positions: chunks of 1, 3 and 10 rows leave ragged last chunks


def inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, WIDTH, generator=gen)
    weight = torch.randn(PADDED, WIDTH, generator=gen) * 0.5
    targets = torch.randint(0, VOCAB, (B, T), generator=gen)
    targets[0, 2:5] = (
        IGNORE_INDEX  # a run of ignored positions: with 1-row chunks, chunks with nothing scored
    )
    targets[1, 7] = IGNORE_INDEX
    return hidden, weight, targets


def reference_grads(hidden, weight, targets, scale, autocast_dtype=None):
    """Loss and (hidden, weight) gradients by autograd through the whole logits matrix."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    if autocast_dtype is None:
        logits = h @ w[:VOCAB].T
    else:
        with torch.autocast("cpu", dtype=autocast_dtype):
            logits = h @ w[:VOCAB].T
    loss = F.cross_entropy(
        logits.float().reshape(-1, VOCAB), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


def chunked_grads(hidden, weight, targets, scale, autocast_dtype=None):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    if autocast_dtype is None:
        loss = linear_cross_entropy(h, w, targets, vocab_size=VOCAB)
    else:
        with torch.autocast("cpu", dtype=autocast_dtype):
            loss = linear_cross_entropy(h, w, targets, vocab_size=VOCAB)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    (
        loss * scale
    ).backward()  # an upstream gradient other than 1 (the mean's 1/n, a loss scale) must reach both
    return loss.detach(), h.grad, w.grad


# Bytes of logits per chunk: 1, 3 and 10 rows (each row is VOCAB fp32 logits), and the default (one chunk).
CHUNKS = {"1 row": VOCAB * 4, "3 rows": 3 * VOCAB * 4, "10 rows": 10 * VOCAB * 4, "one chunk": None}


@pytest.mark.parametrize("chunk", CHUNKS.values(), ids=CHUNKS.keys())
def test_fp32_loss_and_gradients_equal_autograd(monkeypatch, chunk):
    if chunk is not None:
        monkeypatch.setattr(loss_mod, "CHUNK_BYTES", chunk)
    hidden, weight, targets = inputs()
    scale = 0.37
    loss, grad_h, grad_w = chunked_grads(hidden, weight, targets, scale)
    ref_loss, ref_h, ref_w = reference_grads(hidden, weight, targets, scale)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_h, ref_h, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_w, ref_w, rtol=0, atol=1e-6)
    # Ignored positions pass no gradient back; padding rows of the embedding get none either.
    assert torch.all(grad_h[targets == IGNORE_INDEX] == 0)
    assert torch.all(grad_w[VOCAB:] == 0)


@pytest.mark.parametrize("chunk", [3 * VOCAB * 4, None], ids=["3 rows", "one chunk"])
def test_bf16_autocast_loss_and_gradients_are_autograd_up_to_bf16_rounding(monkeypatch, chunk):
    """Both sides round h, W and the logits' gradient to bf16 for the matmuls (fp32 softmax). They differ in where
    results are rounded: each chunk's weight gradient is a bf16 product summed in fp32 here, one bf16 product in
    the reference. Tolerance: a few bf16 roundings (2^-8 relative) of the largest gradient; the loss, computed in
    fp32 from the same bf16 logits, agrees to fp32 summation order."""
    if chunk is not None:
        monkeypatch.setattr(loss_mod, "CHUNK_BYTES", chunk)
    hidden, weight, targets = inputs(seed=1)
    loss, grad_h, grad_w = chunked_grads(hidden, weight, targets, 1.0, autocast_dtype=torch.bfloat16)
    ref_loss, ref_h, ref_w = reference_grads(hidden, weight, targets, 1.0, autocast_dtype=torch.bfloat16)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for got, ref in ((grad_h, ref_h), (grad_w, ref_w)):
        assert got.dtype == ref.dtype == torch.float32
        assert (got - ref).abs().max() <= 1e-2 * ref.abs().max()  # measured: 3e-3
    # ... and both are bf16's distance from the exact fp32 gradient, not more.
    _, exact_h, _ = reference_grads(hidden, weight, targets, 1.0)
    assert (grad_h - exact_h).abs().max() <= 1.5e-2 * exact_h.abs().max()  # measured: 4e-3
    assert torch.all(grad_w[VOCAB:] == 0)


def test_training_loss_of_a_gpt_gives_autograds_parameter_gradients(monkeypatch):
    """The whole model through the training path (hidden states, chunked loss) against the plain forward's
    cross-entropy: every parameter's gradient, the tied embedding (LM head + lookup) included."""
    monkeypatch.setattr(loss_mod, "CHUNK_BYTES", 5 * 300 * 4)  # 5-row chunks of a 300-token vocabulary
    ours, theirs = random_gpt(std=0.1, vocab_size=300), random_gpt(std=0.1, vocab_size=300)
    assert ours.config.padded_vocab_size > 300  # the padding rows are there
    idx = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(2))
    targets = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(3))
    targets[:, :4] = IGNORE_INDEX
    kept = (targets != IGNORE_INDEX).sum()
    loss = linear_cross_entropy(ours.hidden_states(idx), ours.lm_head.weight, targets, vocab_size=300) / kept
    loss.backward()
    logits = theirs(idx)[0]
    ref = F.cross_entropy(logits.reshape(-1, 300), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6, msg=name)
