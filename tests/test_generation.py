"""The generation engine against independent references: a naive full-recompute loop, one-shot decoding, str.find."""

import copy
import warnings

import pytest
import torch
from conftest import random_gpt

from gptmini import native
from gptmini.api import LM
from gptmini.config import GPTConfig, SamplingConfig
from gptmini.decoding import GenerationStats, StopMatcher
from gptmini.generation import generate_texts, generate_tokens, stream_text
from gptmini.kv_cache import KVCache
from gptmini.quantize import _has_vnni, pack_linears, packing_supported, quantize_int8
from gptmini.tokenizer import Tokenizer

GREEDY = SamplingConfig(temperature=0.0)
TOK = Tokenizer()


@torch.no_grad()
def naive_greedy(model, prompt, n):
    """Reference: recompute the whole context every step. The README's window policy, spelled out here rather than
    taken from the module under test: when the context overflows, its oldest quarter (at least one token) goes."""
    block = model.config.block_size
    keep = block - max(1, block // 4)
    device = model.lm_head.weight.device  # the reference runs where the model is
    ctx, out = list(prompt[-block:]), []
    for _ in range(n):
        tok = model(torch.tensor([ctx], device=device), last_only=True)[0][0, -1].argmax().item()
        out.append(tok)
        ctx.append(tok)
        if len(ctx) > block:
            ctx = ctx[-keep:]
    return out


def run(model, prompt, n, sampling=GREEDY, **kwargs):
    stats = GenerationStats()
    steps = list(generate_tokens(model, prompt, max_new_tokens=n, sampling=sampling, stats=stats, **kwargs))
    return [list(s) for s in zip(*steps, strict=True)], stats


CONFIGS = [
    dict(),
    dict(pos_embedding="sinusoidal"),
    dict(bias=False, n_layer=3, n_head=2, n_embd=32),
    dict(block_size=24, n_head=8),
]


@pytest.mark.parametrize("overrides", CONFIGS)
def test_cached_greedy_equals_no_cache_and_naive_recompute_past_the_window(overrides):
    overrides = {"block_size": 32, **overrides}
    model = random_gpt(std=0.3, **overrides)
    prompt = torch.randint(0, 50257, (10,), generator=torch.Generator().manual_seed(1)).tolist()
    n = 60  # several window slides
    (cached,), stats = run(model, prompt, n)
    (uncached,), _ = run(model, prompt, n, use_cache=False)
    assert stats.window_slides >= 3
    assert len(set(cached)) > 10  # not a degenerate repeat
    assert cached == uncached == naive_greedy(model, prompt, n)


def test_sampled_num_samples_cached_equals_uncached():
    model = random_gpt(std=0.3, block_size=32)
    cfg = SamplingConfig(temperature=1.0, top_k=50, seed=3)
    cached, stats = run(model, [5, 6, 7], 50, cfg, num_samples=3)
    uncached, _ = run(model, [5, 6, 7], 50, cfg, num_samples=3, use_cache=False)
    assert cached == uncached and stats.window_slides >= 2
    assert len({tuple(s) for s in cached}) == 3  # independent samples, not copies


def test_greedy_num_samples_each_equal_single_greedy():
    model = random_gpt(std=0.3, block_size=32)
    samples, _ = run(model, [11, 12], 50, num_samples=3)
    assert samples == [naive_greedy(model, [11, 12], 50)] * 3


def test_prefill_in_chunks_equals_at_once():
    model = random_gpt(std=0.2, block_size=64)
    ids = torch.randint(0, 50257, (2, 50))
    once, chunked = KVCache.for_model(model, 2), KVCache.for_model(model, 2)
    with torch.no_grad():
        full = model(ids, cache=once)[0]
        parts = [
            model(ids[:, a:b], cache=chunked, start_pos=a)[0] for a, b in [(0, 7), (7, 8), (8, 30), (30, 50)]
        ]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.k[:, :, :, :50], once.k[:, :, :, :50], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.v[:, :, :, :50], once.v[:, :, :, :50], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos_embedding", ["learned", "sinusoidal"])
def test_static_decode_step_equals_forward(pos_embedding):
    model = random_gpt(std=0.2, pos_embedding=pos_embedding)
    ids = torch.randint(0, 50257, (2, 40))
    cache = KVCache.for_model(model, 2)
    with torch.no_grad():
        full = model(ids)[0]
        model(ids[:, :10], cache=cache)
        steps = [model.decode_step(ids[:, t : t + 1], torch.tensor(t), cache) for t in range(10, 40)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 10:], atol=1e-5, rtol=1e-5)


def test_compiled_decode_equals_reference_past_the_window():
    model = random_gpt(std=0.3, block_size=32, n_layer=1)
    (compiled,), stats = run(model, [1, 2, 3], 50, compile=True)
    assert stats.window_slides >= 2
    assert compiled == naive_greedy(model, [1, 2, 3], 50)


def test_int8_is_close_to_fp32_and_exact_between_paths():
    model = random_gpt(std=0.02, n_embd=128)
    q = quantize_int8(copy.deepcopy(model))
    ids = torch.randint(0, 50257, (1, 40))
    with torch.no_grad():
        ref, got = model(ids)[0], q(ids)[0]
    # error of int8 weights and 8-bit activations: small against the logits' spread
    assert (got - ref).abs().max() < 0.05 * ref.std() * 10
    # Without VNNI the activations are quantised to 7 bits (see Int8Linear): about twice the error, and this random
    # model's near-tied logits then flip more often (~0.87 measured on an AVX2-only EPYC).
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > (0.9 if _has_vnni() else 0.8)
    (cached,), _ = run(q, [1, 2, 3], 40)
    (uncached,), _ = run(q, [1, 2, 3], 40, use_cache=False)
    assert cached == uncached


def test_int8_linear_is_the_dequantized_product():
    from gptmini.quantize import Int8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    q = Int8Linear(lin)
    w = lin.weight.detach()
    scale = w.abs().amax(1, keepdim=True) / 127
    deq = (w / scale).round().clamp(-127, 127) * scale  # what the int8 weights represent
    x = torch.randn(5, 64)
    expected = x @ deq.T + lin.bias.detach()
    # only the on-the-fly 8-bit quantisation of x separates the two
    torch.testing.assert_close(q(x), expected, atol=0.02 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("kind", ["NativeLinear", "PackedLinear"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_packed_linears_equal_plain(monkeypatch, kind, dtype, tol):
    if kind == "NativeLinear" and not native.available():
        pytest.skip("no C compiler: the native kernels cannot be built here")
    if kind == "PackedLinear":  # the fallback where the native kernels cannot be built
        if not packing_supported(dtype):
            pytest.skip(f"this PyTorch build cannot prepack {dtype} linears")
        monkeypatch.setattr(native, "available", lambda: False)
    model = random_gpt(std=0.3).to(dtype)
    with torch.no_grad():
        packed_model = pack_linears(copy.deepcopy(model))
        for ids in (
            torch.randint(0, 50257, (2, 20)),
            torch.randint(0, 50257, (1, 7)),
        ):  # BLAS rows, kernel rows
            torch.testing.assert_close(packed_model(ids)[0], model(ids)[0], atol=tol, rtol=tol)
    assert any(type(m).__name__ == kind for m in packed_model.modules()), "nothing was swapped"
    (a,), _ = run(model, [1, 2], 30)
    (b,), _ = run(pack_linears(model), [1, 2], 30)
    assert a == b


# ---- text: stop strings, streaming, EOS -------------------------------------------------------------------------


class Replay(torch.nn.Module):
    """A stand-in model whose greedy text is `ids`: after a one-token prompt, position t predicts ids[t]."""

    def __init__(self, ids):
        super().__init__()
        self.ids = list(ids)
        self.config = GPTConfig(vocab_size=TOK.chat_vocab_size, block_size=512, n_layer=1, n_head=1, n_embd=8)
        self.transformer = torch.nn.Module()
        self.transformer.wte = torch.nn.Embedding(1, 1)

    def forward(self, x, cache=None, start_pos=0, last_only=False):
        assert cache is None  # the engine's cache-less passes: the whole window each time
        logits = torch.zeros(1, x.shape[1], self.config.vocab_size)
        for t in range(x.shape[1]):
            logits[0, t, self.ids[min(t, len(self.ids) - 1)]] = 1.0
        return (logits[:, -1:] if last_only else logits), None


@pytest.fixture
def replay():
    """Make the engine emit chosen token ids, so the text pipeline can be tested on any text."""
    return lambda ids: Replay(ids)


def stream(model, stops=(), ignore_eos=True):
    cfg = SamplingConfig(temperature=0.0, stop=list(stops))
    stats = GenerationStats()
    n = len(model.ids)
    pieces = list(
        stream_text(
            model,
            TOK,
            [0],
            max_new_tokens=n,
            sampling=cfg,
            ignore_eos=ignore_eos,
            stats=stats,
            use_cache=False,
        )
    )
    return pieces, stats


TEXTS = [
    "The quick brown fox jumps over the lazy dog. The end of the story is near, my friend.",
    "你好，世界！这是一个测试。🌍👋🏽 Emoji and 中文 mixed: 🇫🇷🧑‍💻 done.",
]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_one_shot_decode(replay, text):
    ids = TOK.encode(text)
    model = replay(ids)
    pieces, _ = stream(model)
    assert "".join(pieces) == TOK.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)  # no half characters on the way


def stop_cases(text):
    ids = TOK.encode(text)
    spans, pos = [], 0
    for t in ids:
        n = len(TOK.decode([t]))
        spans.append((pos, pos + n))
        pos += n
    i = len(ids) // 2
    a, b = spans[i]
    return ids, {
        "inside one token": text[a + 1 : b] if b - a > 2 else text[a:b],
        "split across two tokens": text[b - 2 : b + 2],
        "several tokens": text[spans[i - 3][0] : spans[i + 1][1]],
        "never appears": "xyzzy-not-there",
    }


@pytest.mark.parametrize("text", TEXTS)
def test_stop_strings_cut_exactly_and_nothing_held_back_leaks(replay, text):
    ids, cases = stop_cases(text)
    for name, stop in cases.items():
        model = replay(ids)
        pieces, stats = stream(model, [stop])
        full = TOK.decode(ids)
        cut = full.find(stop)
        expected = full if cut < 0 else full[:cut]
        assert "".join(pieces) == expected, name
        assert stats.stop_reason == ("max_new_tokens" if cut < 0 else "stop"), name
        shown = ""
        for p in pieces:  # every streamed prefix is final text: nothing later retracted, no stop text shown
            shown += p
            assert expected.startswith(shown), name


def test_earliest_of_several_stops_wins(replay):
    text = TEXTS[0]
    ids = TOK.encode(text)
    model = replay(ids)
    pieces, _ = stream(model, ["story", "brown", "lazy"])
    assert "".join(pieces) == text[: text.find("brown")]


def test_stop_matcher_char_by_char_never_shows_a_stop_prefix_too_early():
    text, stops = "abcab abcabd tail", ["abd", "c a"]
    expected = text[: min(i for i in (text.find(s) for s in stops) if i >= 0)]
    m, shown = StopMatcher(stops), ""
    for ch in text:
        shown += m.feed(ch)
        assert expected.startswith(shown)
    shown += m.flush()
    assert shown == expected and m.done


def test_eos_stops_unless_ignored(replay):
    ids = TOK.encode("Hello there") + [TOK.eot_id] + TOK.encode(" more")
    model = replay(ids)
    pieces, stats = stream(model, ignore_eos=False)
    assert "".join(pieces) == "Hello there" and stats.stop_reason == "eos"
    model = replay(ids)
    pieces, _ = stream(model, ignore_eos=True)
    assert "".join(pieces) == TOK.decode(ids)


# ---- the Python API ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
    return LM(random_gpt(std=0.3, block_size=48), TOK)


def test_same_seed_same_text_different_seed_different(lm):
    kw = dict(max_new_tokens=30, temperature=1.0, top_k=None, ignore_eos=True)
    assert lm.generate("Once upon a time", seed=5, **kw) == lm.generate("Once upon a time", seed=5, **kw)
    assert lm.generate("Once upon a time", seed=5, **kw) != lm.generate("Once upon a time", seed=6, **kw)
    many = lm.generate("Once upon a time", seed=5, num_samples=3, **kw)
    assert many == lm.generate("Once upon a time", seed=5, num_samples=3, **kw) and len(set(many)) == 3


def test_greedy_text_is_decoded_reference_tokens(lm):
    prompt = "To be, or not to be"
    text = lm.generate(prompt, max_new_tokens=40, temperature=0, ignore_eos=True)
    assert text == TOK.decode(naive_greedy(lm.model, TOK.encode(prompt), 40))
    assert "".join(lm.stream(prompt, max_new_tokens=40, temperature=0, ignore_eos=True)) == text


def test_prompt_longer_than_the_window_keeps_its_last_tokens_with_a_warning(lm):
    ids = torch.randint(0, 50000, (100,), generator=torch.Generator().manual_seed(0)).tolist()
    prompt = TOK.decode(ids)
    ids = TOK.encode(prompt)
    stats = GenerationStats()
    with pytest.warns(UserWarning, match="keeping the last 48"):
        text = lm.generate(prompt, max_new_tokens=10, temperature=0, ignore_eos=True, stats=stats)
    assert stats.prompt_truncated == len(ids) - 48
    assert text == TOK.decode(naive_greedy(lm.model, ids[-48:], 10))


def test_empty_prompt_starts_from_endoftext(lm):
    stats = GenerationStats()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = lm.generate("", max_new_tokens=12, temperature=0, ignore_eos=True, stats=stats)
    assert stats.prompt_tokens == 1
    assert text == TOK.decode(naive_greedy(lm.model, [TOK.eot_id], 12))


def test_generate_texts_stop_per_sample(lm):
    cfg = SamplingConfig(temperature=1.0, top_k=None, seed=2)
    free = generate_texts(
        lm.model, TOK, [1, 2], max_new_tokens=30, sampling=cfg, num_samples=3, ignore_eos=True
    )
    stop = free[0][5:8]
    cfg.stop = [stop]
    cut = generate_texts(
        lm.model, TOK, [1, 2], max_new_tokens=30, sampling=cfg, num_samples=3, ignore_eos=True
    )
    assert cut == [t[: t.find(stop)] if stop in t else t for t in free]


def test_zero_new_tokens_and_bad_values(lm):
    from gptmini.errors import UserError

    assert lm.generate("hi", max_new_tokens=0) == ""
    with pytest.raises(UserError, match="max-new-tokens"):
        lm.generate("hi", max_new_tokens=-1)
    with pytest.raises(UserError, match="num-samples"):
        lm.generate("hi", num_samples=0)
    with pytest.raises(UserError, match="top-p"):
        lm.generate("hi", top_p=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_equals_eager_on_gpu():
    model = random_gpt(std=0.3, block_size=32).cuda()
    prompt = [1, 2, 3]
    (eager,), _ = run(model, prompt, 50)
    (graphed,), stats = run(model, prompt, 50, compile=True)  # reduce-overhead: captured as a CUDA graph
    assert stats.window_slides >= 2
    assert graphed == eager == naive_greedy(model.cpu(), prompt, 50)
