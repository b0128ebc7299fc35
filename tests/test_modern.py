"""--arch modern: rotary positions, QK-norm, ReLU², zero-initialised output projections, no biases."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_gpt
from test_generation import naive_greedy, run
from test_train import TINY, interrupted_and_resumed_equals_uninterrupted, settings

from gptmini.checkpoint import CONFIG_FILE
from gptmini.cli import main
from gptmini.config import GPTConfig
from gptmini.kv_cache import KVCache
from gptmini.loading import load_checkpoint
from gptmini.train import train

MODERN = dict(arch="modern")


pytestmark = pytest.mark.usefixtures("tmp_token_cache", "one_thread")


def naive_modern_logits(model, idx):
    """The modern block written out from its definition, sharing only the weights with the module under test."""
    c = model.config
    H, D = c.n_head, c.head_dim
    B, T = idx.shape
    half = D // 2
    freq = 10000.0 ** (-torch.arange(half, dtype=torch.float64) * 2 / D)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freq  # [T, D/2]

    def rope(t):  # pairs (i, i + D/2) rotated by position · frequency i
        a, b = t[..., :half].double(), t[..., half:].double()
        return torch.cat((a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()), -1).float()

    def rms(t, weight, eps):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight

    x = model.transformer.wte.weight[idx]
    for block in model.transformer.h:
        attn = block.attn
        h = F.layer_norm(x, (c.n_embd,), block.ln_1.weight, None, c.layer_norm_eps)
        q, k, v = (h @ attn.c_attn.weight.T).split(c.n_embd, -1)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        q = rope(rms(q, attn.q_norm.weight, c.layer_norm_eps))
        k = rope(rms(k, attn.k_norm.weight, c.layer_norm_eps))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, c.n_embd)
        x = x + y @ attn.c_proj.weight.T
        h = F.layer_norm(x, (c.n_embd,), block.ln_2.weight, None, c.layer_norm_eps)
        x = x + torch.relu(h @ block.mlp.c_fc.weight.T) ** 2 @ block.mlp.c_proj.weight.T
    x = F.layer_norm(x, (c.n_embd,), model.transformer.ln_f.weight, None, c.layer_norm_eps)
    return (x @ model.transformer.wte.weight.T)[..., : c.vocab_size]


def test_the_modern_block_is_what_its_definition_says():
    model = random_gpt(std=0.1, **MODERN)
    with torch.no_grad():
        for block in model.transformer.h:  # norms' gains away from 1, so a dropped gain would show
            for norm in (block.attn.q_norm, block.attn.k_norm, block.ln_1, block.ln_2):
                norm.weight.uniform_(0.5, 1.5)
    names = [name for name, _ in model.named_parameters()]
    assert not any(name.endswith(".bias") for name in names) and "transformer.wpe.weight" not in names
    idx = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], naive_modern_logits(model, idx), atol=1e-4, rtol=1e-4)


def test_fresh_modern_blocks_start_as_the_identity():
    model = random_gpt(**MODERN)  # the model's own init
    projections = [p for name, p in model.named_parameters() if name.endswith("c_proj.weight")]
    assert len(projections) == 2 * model.config.n_layer and all(not p.any() for p in projections)
    idx = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        expected = model.logits(model.transformer.ln_f(model.transformer.wte(idx)))
        torch.testing.assert_close(model(idx)[0], expected, atol=1e-6, rtol=0)


def test_cached_decoding_equals_full_recompute_past_the_window():
    """Prefill, decode steps, window slides (re-prefilled at positions 0..), against the whole window recomputed."""
    model = random_gpt(std=0.3, block_size=32, **MODERN)
    block, keep = 32, 32 - 8
    ctx = torch.randint(0, 50257, (10,), generator=torch.Generator().manual_seed(1)).tolist()
    cache = KVCache.for_model(model, 1)
    worst, scale, slides = 0.0, 0.0, 0
    with torch.no_grad():
        logits = model(torch.tensor([ctx]), cache=cache, last_only=True)[0][0, -1]
        for _ in range(70):
            full = model(torch.tensor([ctx]), last_only=True)[0][0, -1]
            worst = max(worst, (logits - full).abs().max().item())
            scale = max(scale, full.abs().max().item())
            tok = int(full.argmax())
            if len(ctx) == block:  # slide: the oldest quarter leaves, the rest is re-prefilled
                ctx = ctx[-(keep - 1) :] + [tok]
                logits = model(torch.tensor([ctx]), cache=cache, last_only=True)[0][0, -1]
                slides += 1
            else:
                ctx.append(tok)
                logits = model.decode_step(torch.tensor([[tok]]), torch.tensor(len(ctx) - 1), cache)[0]
    # fp32 rounding of sums taken in another order (logits up to ~11 here: an ulp is ~1e-6), not a wrong value
    assert slides >= 3 and worst < 4e-6 * scale


def test_generate_cached_equals_uncached_and_naive_greedy_past_the_window():
    model = random_gpt(std=0.3, block_size=32, **MODERN)
    prompt = torch.randint(0, 50257, (10,), generator=torch.Generator().manual_seed(1)).tolist()
    (cached,), stats = run(model, prompt, 60)
    (uncached,), _ = run(model, prompt, 60, use_cache=False)
    assert stats.window_slides >= 3 and len(set(cached)) > 10
    assert cached == uncached == naive_greedy(model, prompt, 60)


def test_decode_step_with_each_row_at_its_own_position_equals_forward():
    # The serving engine's continuous batch: row b decodes at pos[b].
    model = random_gpt(std=0.2, **MODERN)
    ids = torch.randint(0, 50257, (2, 30))
    lengths = [12, 21]
    cache = KVCache.for_model(model, 2)
    with torch.no_grad():
        full = [model(ids[b : b + 1, : n + 1])[0][0, -1] for b, n in enumerate(lengths)]
        for b, n in enumerate(lengths):
            model(ids[b : b + 1, :n], cache=cache.view(b), start_pos=0)
        step = model.decode_step(ids[[0, 1], lengths][:, None], torch.tensor(lengths), cache)
    torch.testing.assert_close(step, torch.stack(full), atol=1e-5, rtol=1e-5)


def test_keep_attention_sees_the_rotated_queries_and_keys():
    model = random_gpt(std=0.2, **MODERN)
    idx = torch.randint(0, 50257, (1, 20))
    maps = model.attention_maps(idx)
    # The map is the attention the model applied: its weighted sum of values gives the layer's output.
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        h = model.transformer.h[0].ln_1(model.transformer.wte(idx))
        v = (h @ attn.c_attn.weight.T).split(model.config.n_embd, -1)[2]
        v = v.view(1, 20, attn.n_head, -1).transpose(1, 2)
        y = (maps[0] @ v).transpose(1, 2).reshape(1, 20, -1) @ attn.c_proj.weight.T
        torch.testing.assert_close(y, attn(h, rope=model._rope(slice(0, 20))), atol=1e-5, rtol=1e-5)


def test_a_config_saved_before_arch_existed_is_gpt2(tmp_path):
    old = GPTConfig(**TINY).to_dict()
    del old["arch"]
    assert GPTConfig.from_dict(old).arch == "gpt2"
    modern = GPTConfig(**TINY, arch="modern")
    assert modern.bias is False and modern.pos_embedding == "rotary"
    assert GPTConfig.from_dict(json.loads(json.dumps(modern.to_dict()))) == modern


def test_interrupted_and_resumed_equals_uninterrupted_with_arch_modern(corpus, tmp_path):
    interrupted_and_resumed_equals_uninterrupted(
        corpus, tmp_path, device="cpu", dtype="auto", atol=1e-6, model_fields=MODERN
    )


@pytest.fixture(scope="module")
def modern_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("modern") / "run"
    train([corpus], config=settings(max_iters=40, eval_interval=20), model={**TINY, **MODERN}, out=out)
    return out


def test_a_modern_run_learns_and_its_checkpoint_says_modern(modern_run):
    assert '"arch": "modern"' in (modern_run / "best" / CONFIG_FILE).read_text()
    model, _ = load_checkpoint(modern_run / "best")
    assert model.config.arch == "modern"
    lines = [json.loads(line) for line in (modern_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in lines if r.get("train_loss") is not None]
    assert losses[-1] < losses[0] - 1.0


def test_export_hf_refuses_a_modern_model_in_one_line(modern_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export-hf", str(modern_run / "best"), str(tmp_path / "hf")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--arch modern" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())


def test_resuming_with_another_arch_is_a_one_line_error(modern_run, corpus, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["train", str(corpus), "--out", str(modern_run), "--resume", "--arch", "gpt2", "--device", "cpu"]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "arch modern → gpt2" in err and len(err.splitlines()) == 1


def test_a_bf16_modern_model_runs_without_pytorch_dtype_warnings():
    """QK-norm in fp32 with its weight in fp32 too: a bf16 weight against an fp32 input made PyTorch warn
    ("Mismatch dtype between input and weight") on every call; the output stays the bf16 model's."""
    import warnings

    model = random_gpt(arch="modern", pos_embedding="rotary", bias=False).to(torch.bfloat16)
    idx = torch.randint(0, 50257, (1, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            logits = model(idx)[0].float()
    with torch.no_grad():
        reference = model.float()(idx)[0]
    assert torch.allclose(logits, reference, atol=0.1, rtol=0.05)
