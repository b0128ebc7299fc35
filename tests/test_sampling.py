"""The sampler against hand-computed distributions (plain Python math) and transformers' logits processors."""

import math

import pytest
import torch

from gptmini.config import SamplingConfig
from gptmini.errors import UserError
from gptmini.sampling import make_generator, next_token_probs, sample_next

LOGITS = [2.0, -1.0, 0.5, 3.0, 1.5, -2.5, 0.0, 1.0]


def softmax(xs):
    m = max(x for x in xs if x != -math.inf)
    e = [math.exp(x - m) if x != -math.inf else 0.0 for x in xs]
    return [v / sum(e) for v in e]


def keep_only(xs, kept):
    return [x if i in kept else -math.inf for i, x in enumerate(xs)]


def probs(cfg, logits=LOGITS, seen=None):
    seen_mask = None
    if seen is not None:
        seen_mask = torch.zeros(1, len(logits), dtype=torch.bool)
        seen_mask[0, list(seen)] = True
    return next_token_probs(torch.tensor([logits]), cfg, seen_mask)[0].tolist()


def assert_probs(actual, expected):
    assert actual == pytest.approx(expected, abs=1e-6)


def test_temperature_only():
    assert_probs(probs(SamplingConfig(temperature=0.5, top_k=None)), softmax([x / 0.5 for x in LOGITS]))


def test_top_k_keeps_the_k_highest():
    # sorted: 3.0 (3), 2.0 (0), 1.5 (4), 1.0 (7) ...
    assert_probs(probs(SamplingConfig(temperature=1.0, top_k=3)), softmax(keep_only(LOGITS, {3, 0, 4})))
    assert_probs(probs(SamplingConfig(temperature=1.0, top_k=1)), [float(i == 3) for i in range(8)])
    assert_probs(probs(SamplingConfig(temperature=1.0, top_k=100)), softmax(LOGITS))


@pytest.mark.parametrize("top_p", [0.3, 0.5, 0.62, 0.9, 0.99, 1.0])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p):
    p = softmax(LOGITS)
    order = sorted(range(len(p)), key=lambda i: -p[i])
    kept, total = set(), 0.0
    for i in order:  # add tokens, most likely first, until their mass reaches top_p
        kept.add(i)
        total += p[i]
        if total >= top_p:
            break
    assert_probs(
        probs(SamplingConfig(temperature=1.0, top_k=None, top_p=top_p)), softmax(keep_only(LOGITS, kept))
    )


@pytest.mark.parametrize("min_p", [0.05, 0.2, 0.5, 0.9])
def test_min_p_drops_tokens_below_a_fraction_of_the_top(min_p):
    p = softmax(LOGITS)
    kept = {i for i, v in enumerate(p) if v >= min_p * max(p)}
    assert_probs(
        probs(SamplingConfig(temperature=1.0, top_k=None, min_p=min_p)), softmax(keep_only(LOGITS, kept))
    )


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    seen = {0, 1, 6}  # 2.0 → 1.0, -1.0 → -2.0, 0.0 stays 0.0
    penalised = list(LOGITS)
    penalised[0], penalised[1] = 2.0 / 2.0, -1.0 * 2.0
    cfg = SamplingConfig(temperature=1.0, top_k=None, repetition_penalty=2.0)
    assert_probs(probs(cfg, seen=seen), softmax(penalised))
    # penalty before temperature: greedy sees the penalised logits too
    greedy = SamplingConfig(temperature=0.0, repetition_penalty=10.0)
    assert (
        sample_next(torch.tensor([LOGITS]), greedy, seen=torch.tensor([[i == 3 for i in range(8)]])).item()
        == 0
    )


def test_order_is_penalty_temperature_top_k_top_p_min_p():
    cfg = SamplingConfig(temperature=0.7, top_k=5, top_p=0.8, min_p=0.1, repetition_penalty=1.3)
    seen = {3, 5}
    x = [
        v if i not in seen else (LOGITS[i] / 1.3 if LOGITS[i] > 0 else LOGITS[i] * 1.3)
        for i, v in enumerate(LOGITS)
    ]
    x = [v / 0.7 for v in x]
    top5 = set(sorted(range(8), key=lambda i: -x[i])[:5])
    x = keep_only(x, top5)
    p = softmax(x)
    kept, total = set(), 0.0
    for i in sorted(range(8), key=lambda i: -p[i]):
        kept.add(i)
        total += p[i]
        if total >= 0.8:
            break
    x = keep_only(x, kept)
    p = softmax(x)
    x = keep_only(x, {i for i in range(8) if p[i] >= 0.1 * max(p)})
    assert_probs(probs(cfg, seen=seen), softmax(x))


def test_matches_transformers_logits_processors():
    transformers = pytest.importorskip("transformers")
    from transformers.generation import logits_process as lp

    torch.manual_seed(0)
    logits = torch.randn(4, 1000) * 3
    input_ids = torch.randint(0, 1000, (4, 30))
    seen = torch.zeros(4, 1000, dtype=torch.bool).scatter_(1, input_ids, True)
    for cfg in [
        SamplingConfig(temperature=0.8, top_k=50, top_p=0.9, min_p=None, repetition_penalty=1.2),
        SamplingConfig(temperature=1.3, top_k=None, top_p=0.5, min_p=0.05, repetition_penalty=1.0),
        SamplingConfig(temperature=0.6, top_k=200, top_p=None, min_p=0.2, repetition_penalty=0.8),
    ]:
        chain = [
            lp.RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty),
            lp.TemperatureLogitsWarper(cfg.temperature),
        ]
        if cfg.top_k:
            chain.append(lp.TopKLogitsWarper(cfg.top_k))
        if cfg.top_p:
            chain.append(lp.TopPLogitsWarper(cfg.top_p))
        if cfg.min_p:
            chain.append(lp.MinPLogitsWarper(cfg.min_p))
        expected = transformers.LogitsProcessorList(chain)(input_ids, logits.clone()).softmax(-1)
        torch.testing.assert_close(next_token_probs(logits, cfg, seen), expected, atol=1e-6, rtol=0)


def test_temperature_towards_zero_is_greedy():
    torch.manual_seed(1)
    logits = torch.randn(64, 500) * 2
    gen = make_generator(0, torch.device("cpu"))
    cold = sample_next(logits, SamplingConfig(temperature=1e-4, top_k=None), gen)
    greedy = sample_next(logits, SamplingConfig(temperature=0.0), gen)
    assert torch.equal(cold, logits.argmax(-1)) and torch.equal(greedy, logits.argmax(-1))


def test_draws_follow_the_filtered_distribution():
    cfg = SamplingConfig(temperature=0.9, top_k=5, top_p=0.95, seed=0)
    expected = torch.tensor(probs(cfg))
    n = 40_000
    draws = sample_next(torch.tensor([LOGITS]).expand(n, -1), cfg, make_generator(0, torch.device("cpu")))
    freq = torch.bincount(draws, minlength=8).float() / n
    assert freq[expected == 0].sum() == 0  # filtered tokens are never drawn
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)  # ~4 standard errors


def test_same_seed_same_draws_different_seed_different():
    logits = torch.randn(8, 300)
    cfg = SamplingConfig(temperature=1.0, top_k=None)

    def draw(seed):
        gen = make_generator(seed, torch.device("cpu"))
        return [sample_next(logits, cfg, gen).tolist() for _ in range(5)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(top_k=0), "top-k must be >= 1"),
        (dict(top_p=0.0), "top-p must be in (0, 1]"),
        (dict(top_p=1.01), "top-p must be in (0, 1]"),
        (dict(min_p=-0.1), "min-p must be in [0, 1]"),
        (dict(min_p=1.5), "min-p must be in [0, 1]"),
        (dict(repetition_penalty=0.0), "repetition-penalty must be > 0"),
    ],
)
def test_validation(kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        SamplingConfig(**kwargs).validate()
