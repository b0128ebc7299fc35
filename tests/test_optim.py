"""The optimizers against PyTorch's own: Muon's half against torch.optim.Muon, AdamW's half against torch.optim.AdamW."""

from __future__ import annotations

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
    optimizer = make_optimizer(gpt, TrainConfig(max_iters=1), torch.device("cpu"))
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
    optimizer = make_optimizer(gpt, TrainConfig(max_iters=1, optimizer="adamw"), torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW)
