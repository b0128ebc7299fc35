"""Shared fixtures: small random models, and Hugging Face GPT-2s built from a config (no download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptmini.config import GPTConfig
from gptmini.model import GPT

ROOT = Path(__file__).resolve().parent.parent


def random_gpt(seed: int = 0, std: float | None = None, **overrides) -> GPT:
    """A small GPT with random weights; a large `std` makes greedy text non-degenerate."""
    torch.manual_seed(seed)
    config = GPTConfig(**{**dict(n_layer=2, n_head=4, n_embd=64, block_size=64), **overrides})
    model = GPT(config).eval()
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, std)
    return model


def hf_gpt2(
    n_layer: int = 2, n_head: int = 4, n_embd: int = 64, n_positions: int = 64, std: float = 0.2, seed=0
):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        n_positions=n_positions,
        vocab_size=50257,
        initializer_range=std,
    )
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """A saved Hugging Face GPT-2 directory (3 layers, 4 heads, 64 wide, 128 positions)."""
    model = hf_gpt2(n_layer=3, n_head=4, n_embd=64, n_positions=128, std=0.3)
    path = tmp_path_factory.mktemp("hf") / "gpt2-random"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """60 kB of the shipped Shakespeare."""
    path = tmp_path_factory.mktemp("corpus") / "shake.txt"
    text = (ROOT / "data" / "shakespeare.txt").read_bytes()[:60_000].decode("utf-8", errors="ignore")
    path.write_text(text, encoding="utf-8")
    return path
