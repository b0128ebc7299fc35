import math
from pathlib import Path

import pytest
import torch
from conftest import hf_gpt2, random_gpt

from gptmini.config import GPTConfig
from gptmini.hf import hf_to_gptmini
from gptmini.kv_cache import KVCache
from gptmini.model import GPT, sinusoidal_table


@pytest.mark.parametrize("n_layer,n_head,n_embd", [(2, 2, 32), (3, 4, 64), (4, 8, 128), (2, 1, 48)])
def test_logits_match_transformers(n_layer, n_head, n_embd):
    hf = hf_gpt2(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=64, std=0.2, seed=n_layer)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=64)).eval()
    model.load_state_dict(
        {**hf_to_gptmini(hf.state_dict(), model.config), "lm_head.weight": model.lm_head.weight}, strict=True
    )
    idx = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = model(idx)
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_loss_is_cross_entropy_of_logits():
    model = random_gpt()
    idx = torch.randint(0, 50257, (2, 16))
    targets = torch.randint(0, 50257, (2, 16))
    targets[0, :3] = -1  # ignored positions
    logits, loss = model(idx, targets)
    log_probs = logits.log_softmax(-1)
    keep = targets != -1
    expected = -log_probs[keep].gather(-1, targets[keep][:, None]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("pos_embedding,bias", [("learned", True), ("sinusoidal", False)])
def test_kv_cache_matches_full_recompute(pos_embedding, bias):
    model = random_gpt(std=0.2, pos_embedding=pos_embedding, bias=bias, block_size=48)
    idx = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(0))
    cache = KVCache.for_model(model, batch_size=2)
    with torch.no_grad():
        full, _ = model(idx)
        prompt = 7
        step_logits, _ = model(idx[:, :prompt], cache=cache, start_pos=0)
        torch.testing.assert_close(step_logits, full[:, :prompt], atol=1e-5, rtol=0)
        for t in range(prompt, 48):
            step_logits, _ = model(idx[:, t : t + 1], cache=cache, start_pos=t)
            torch.testing.assert_close(step_logits[:, 0], full[:, t], atol=1e-5, rtol=0)


def test_chunked_prefill_after_cached_tokens():
    # T > 1 new tokens after existing cache content need the explicit offset causal mask.
    model = random_gpt(std=0.2)
    idx = torch.randint(0, 50257, (1, 60), generator=torch.Generator().manual_seed(3))
    cache = KVCache.for_model(model)
    with torch.no_grad():
        full, _ = model(idx)
        chunks = [(0, 13), (13, 14), (14, 40), (40, 60)]
        for start, end in chunks:
            logits, _ = model(idx[:, start:end], cache=cache, start_pos=start)
            torch.testing.assert_close(logits, full[:, start:end], atol=1e-5, rtol=0)


def test_kv_cache_is_static_and_in_place():
    model = random_gpt()
    cache = KVCache.for_model(model, batch_size=1)
    k_ptr = cache.k.data_ptr()
    assert cache.k.shape == (2, 1, 4, 64, 16)
    with torch.no_grad():
        for t in range(10):
            model(torch.tensor([[t]]), cache=cache, start_pos=t)
    assert cache.k.data_ptr() == k_ptr
    assert cache.k[:, :, :, 10:].abs().sum() == 0  # nothing written past the last position


def test_attention_maps_are_causal_softmax_and_reproduce_sdpa():
    model = random_gpt(std=0.1)
    idx = torch.randint(0, 50257, (2, 12))
    maps = model.attention_maps(idx)
    assert len(maps) == 2 and maps[0].shape == (2, 4, 12, 12)
    for a in maps:
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 12))
        assert torch.all(a.triu(diagonal=1) == 0)  # no position looks ahead
    # Recompute layer 0 by hand: softmax(QKᵀ/√d)·V, projected, must equal the SDPA path.
    block = model.transformer.h[0]
    with torch.no_grad():
        x = model.transformer.wte(idx) + model.transformer.wpe.weight[:12]
        h = block.ln_1(x)
        q, k, v = (t.view(2, 12, 4, 16).transpose(1, 2) for t in block.attn.c_attn(h).split(64, dim=2))
        scores = q @ k.transpose(-2, -1) / 4.0  # √d_k = √16
        scores = scores.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(scores.softmax(-1), maps[0], atol=1e-6, rtol=0)
        by_hand = block.attn.c_proj((maps[0] @ v).transpose(1, 2).reshape(2, 12, 64))
        torch.testing.assert_close(by_hand, block.attn(h), atol=1e-5, rtol=0)


def test_sinusoidal_table_hand_values():
    table = sinusoidal_table(50, 8)
    p = 7
    for i in range(4):
        angle = p / 10000 ** (2 * i / 8)
        assert table[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
        assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    model = random_gpt(pos_embedding="sinusoidal")
    assert "pos_table" not in model.state_dict()
    assert not any("wpe" in n for n, _ in model.named_parameters())


def test_gpt2_initialisation():
    model = random_gpt(n_layer=6, n_embd=128, n_head=4)
    assert model.lm_head.weight is model.transformer.wte.weight
    proj = model.transformer.h[0].attn.c_proj.weight
    fc = model.transformer.h[0].mlp.c_fc.weight
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(12), rel=0.05)
    assert fc.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.h[0].mlp.c_fc.bias.abs().sum() == 0


def test_gpt2_small_parameter_count():
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024))
    counts = model.num_params()
    assert model.config.padded_vocab_size == 50304
    assert counts["total"] == 124_439_808
    # Every counted parameter exists, and only the padding rows are left out.
    stored = sum(p.numel() for p in model.parameters())
    assert stored - counts["total"] == (50304 - 50257) * 768


def test_padding_ids_are_never_scored():
    model = random_gpt()
    logits, _ = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape[-1] == 50257 < model.config.padded_vocab_size


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(n_embd=100, n_head=3), "divisible"),
        (dict(n_layer=0), "positive"),
        (dict(pos_embedding="rotary"), "pos_embedding"),
        (dict(dropout=1.5), "dropout"),
        (dict(attention_dropout=-0.1), "attention_dropout"),
    ],
)
def test_config_validation(kwargs, message):
    from gptmini.errors import UserError

    with pytest.raises(UserError, match=message):
        GPTConfig(**kwargs)


def test_attention_dropout_follows_dropout_unless_set():
    """Residual-only dropout (attention_dropout 0): the residual branches drop, the attention weights do not."""
    for attention_dropout, expected in [(None, 0.5), (0.0, 0.0), (0.25, 0.25)]:
        config = GPTConfig(
            vocab_size=300, n_layer=1, n_head=2, n_embd=16, dropout=0.5, attention_dropout=attention_dropout
        )
        attn = GPT(config).transformer.h[0].attn
        assert (attn.dropout, attn.resid_dropout.p) == (expected, 0.5)


def test_config_json_round_trip():
    config = GPTConfig(n_layer=3, pos_embedding="sinusoidal", bias=False)
    assert GPTConfig.from_dict(config.to_dict()) == config


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident size from /proc")
def test_a_cpu_kv_cache_holds_memory_for_the_rows_it_holds_and_gives_a_released_row_back():
    before = _rss_mib()
    cache = KVCache(
        n_layer=12, batch_size=16, n_head=12, max_len=1024, head_dim=64
    )  # 1,152 MiB of keys and values
    assert _rss_mib() - before < 50
    cache.k[:, 3].fill_(1.0)
    cache.v[:, 3].fill_(2.0)
    cache.k[:, 5, :, :10].fill_(3.0)
    held = _rss_mib() - before
    assert 60 < held < 110  # row 3's 72 MiB and a few pages of row 5
    cache.release_row(3)
    assert _rss_mib() - before < held - 60
    assert not cache.k[:, 3].any() and not cache.v[:, 3].any()  # reads as zeros again
    assert (cache.k[:, 5, :, :10] == 3.0).all() and not cache.k[:, 5, :, 10:].any()  # the others untouched
