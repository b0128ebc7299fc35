"""The optimizers against PyTorch's own: Muon's half against torch.optim.Muon, AdamW's half against torch.optim.AdamW."""

from __future__ import annotations

import pytest
import torch

from gptmini.config import GPTConfig, TrainConfig
from gptmini.model import GPT
from gptmini.optim import MuonAdamW, make_optimizer, orthogonalize


def _steps(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], n: int = 4, lr_at=None) -> None:
    gen = torch.Generator().manual_seed(0)
    for step in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
        optimizer.step()


def _params(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=gen).requires_grad_() for shape in shapes]


@pytest.mark.skipif(
    not hasattr(torch.optim, "Muon"), reason="this PyTorch has no torch.optim.Muon (the reference)"
)
def test_muon_half_matches_torch_muon_with_adamw_matched_rms():
    shapes = [(24, 8), (8, 24), (16, 16)]  # tall, wide (transposed inside), square
    ours, theirs = _params(*shapes), _params(*shapes)
    lr_at = [2e-2, 1e-2, 5e-3, 1e-3].__getitem__  # a changing lr, as the schedule sets it
    _steps(MuonAdamW(ours, [], lr=2e-2, weight_decay=0.5), ours, lr_at=lr_at)
    reference = torch.optim.Muon(theirs, lr=2e-2, weight_decay=0.5, adjust_lr_fn="match_rms_adamw")
    _steps(reference, theirs, lr_at=lr_at)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_adamw_half_matches_torch_adamw():
    shapes = [(12, 5), (7,)]
    ours, theirs = _params(*shapes), _params(*shapes)
    groups = [{"params": [ours[0]], "weight_decay": 0.3}, {"params": [ours[1]], "weight_decay": 0.0}]
    _steps(MuonAdamW([], groups, lr=1e-2, betas=(0.9, 0.95)), ours)
    reference = torch.optim.AdamW(
        [{"params": [theirs[0]], "weight_decay": 0.3}, {"params": [theirs[1]], "weight_decay": 0.0}],
        lr=1e-2,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    _steps(reference, theirs)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_orthogonalize_approximates_the_polar_factor():
    gen = torch.Generator().manual_seed(2)
    for shape in [(64, 16), (16, 64)]:
        g = torch.randn(shape, generator=gen)
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        out = orthogonalize(g).float()
        singular = torch.linalg.svdvals(out)
        assert out.shape == g.shape
        assert singular.min() > 0.5 and singular.max() < 1.3  # Muon's quintic lands near 1, not exactly on it
        cosine = (out * (u @ vh)).sum() / (out.norm() * (u @ vh).norm())
        assert cosine > 0.95


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    gpt = GPT(GPTConfig(vocab_size=300, n_layer=2, n_head=2, n_embd=16, block_size=8))
    optimizer = make_optimizer(
        gpt, TrainConfig(max_iters=1, optimizer="muon"), torch.device("cpu"), dtype=torch.float32
    )
    names = {id(p): name for name, p in gpt.named_parameters()}
    muon = {names[id(p)] for g in optimizer.param_groups if g["muon"] for p in g["params"]}
    other = {names[id(p)] for g in optimizer.param_groups if not g["muon"] for p in g["params"]}
    assert muon == {
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"} <= other
    assert not muon & other and muon | other == set(names.values())
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == muon | {"transformer.wte.weight", "transformer.wpe.weight"}


def test_adamw_option_is_plain_adamw():
    gpt = GPT(GPTConfig(vocab_size=300, n_layer=1, n_head=2, n_embd=16, block_size=8))
    optimizer = make_optimizer(
        gpt, TrainConfig(max_iters=1, optimizer="adamw"), torch.device("cpu"), dtype=torch.float32
    )
    assert isinstance(optimizer, torch.optim.AdamW)


def _newton_schulz_float64(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic iteration written out in float64, as the reference to compare an orthogonalisation with."""
    a, b, c = 3.4445, -4.7750, 2.0315  # Keller Jordan's coefficients
    x = g.double()
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def test_orthogonalize_in_float32_follows_the_float64_iteration():
    gen = torch.Generator().manual_seed(3)
    for shape in [(48, 16), (16, 48), (32, 32)]:
        g = torch.randn(shape, generator=gen)
        exact = _newton_schulz_float64(g)
        fp32, bf16 = orthogonalize(g, dtype=torch.float32), orthogonalize(g)
        assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
        assert (fp32.double() - exact).abs().max() < 1e-5
        assert (bf16.double() - exact).abs().max() > 1e-3  # the bf16 default is another, coarser computation


def test_muon_orthogonalises_in_the_training_dtype():
    gpt = GPT(GPTConfig(vocab_size=300, n_layer=1, n_head=2, n_embd=16, block_size=8))
    cpu = torch.device("cpu")
    for compute, expected in [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]:
        assert (
            make_optimizer(gpt, TrainConfig(max_iters=1, optimizer="muon"), cpu, dtype=compute).ns_dtype
            == expected
        )
    # An fp32 Muon step is the float64 recompute of the same update, to float32 rounding.
    w = torch.randn(24, 8, generator=torch.Generator().manual_seed(4))
    ours = w.clone().requires_grad_()
    ours.grad = torch.randn(24, 8, generator=torch.Generator().manual_seed(5))
    MuonAdamW([ours], [], lr=1e-2, weight_decay=0.1, ns_dtype=torch.float32).step()
    momentum = 0.05 * ours.grad.double()  # lerp from zero, then the Nesterov mix with the gradient
    nesterov = ours.grad.double().lerp(momentum, 0.95)
    expected = w.double() * (1 - 1e-2 * 0.1) - 1e-2 * 0.2 * 24**0.5 * _newton_schulz_float64(nesterov)
    torch.testing.assert_close(ours.detach().double(), expected, rtol=0, atol=1e-6)


def test_a_stack_of_matrices_orthogonalises_each_as_alone():
    gen = torch.Generator().manual_seed(6)
    for shape in [(3, 48, 16), (2, 16, 48)]:
        stack = torch.randn(shape, generator=gen)
        batched = orthogonalize(stack, dtype=torch.float32)
        assert batched.shape == stack.shape
        for one, alone in zip(batched, stack, strict=True):
            torch.testing.assert_close(one, orthogonalize(alone, dtype=torch.float32), rtol=0, atol=1e-6)
            assert (one.double() - _newton_schulz_float64(alone)).abs().max() < 1e-5


def test_auto_takes_muon_where_newton_schulz_is_cheap_against_a_step_and_adamw_where_not():
    """Newton–Schulz FLOPs by hand (5 iterations of 4m²n + 2m³ on each block matrix, m ≤ n) over the model's training
    FLOPs: the shipped shape with 8 × 256 tokens takes Muon, GPT-2 small with 4 × 64 tokens takes AdamW."""
    from gptmini.config import GPTConfig
    from gptmini.model import GPT
    from gptmini.optim import MUON_MAX_COST, choose_optimizer

    def by_hand(c: GPTConfig, tokens: int) -> float:
        d, h = c.n_embd, 4 * c.n_embd
        mats = [(d, 3 * d), (d, d), (d, h), (d, h)]
        ns = c.n_layer * sum(5 * (4 * m * m * n + 2 * m**3) for m, n in mats)
        return ns / (GPT.skeleton(c, device="meta").flops_per_token(training=True) * tokens)

    shipped = GPTConfig(n_layer=4, n_head=4, n_embd=192, block_size=256, vocab_size=4096)
    gpt2 = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=64)
    for config, tokens, want in [(shipped, 8 * 256, "muon"), (gpt2, 4 * 64, "adamw")]:
        name, cost = choose_optimizer(GPT.skeleton(config, device="meta"), tokens)
        assert abs(cost - by_hand(config, tokens)) < 1e-9 * cost
        assert name == want and (cost <= MUON_MAX_COST) == (want == "muon")
