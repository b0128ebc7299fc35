"""The sampler against hand-computed distributions (plain Python math) and transformers' logits processors."""

import dataclasses
import math
import re

import pytest
import torch

from gptmini.config import SamplingConfig
from gptmini.errors import UserError
from gptmini.sampling import choice_seed, draw, make_generator, next_token_probs, sample_next

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
        (dict(temperature=math.inf), "temperature must be a finite number"),
        (dict(temperature=10**400), "temperature must be a finite number"),
        (dict(top_p=math.nan), "top-p must be a finite number"),
        (dict(repetition_penalty=math.inf), "repetition-penalty must be a finite number"),
        (dict(seed=2**64), "seed must be in"),
        (dict(seed=-(2**63) - 1), "seed must be in"),
    ],
)
def test_validation(kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        SamplingConfig(**kwargs).validate()


@pytest.mark.parametrize("temperature", [1e-6, 1e-40, 1e-300, 5e-324])
def test_temperatures_below_the_floor_are_greedy(temperature):
    """logits / 1e-40 overflow float32 to ±inf (a NaN softmax): below 1e-5 the sampler takes the argmax instead."""
    torch.manual_seed(2)
    logits = torch.randn(16, 300) * 3
    cfg = SamplingConfig(temperature=temperature, top_k=None)
    gen = make_generator(0, torch.device("cpu"))
    assert torch.equal(sample_next(logits, cfg, gen), logits.argmax(-1))
    assert torch.equal(
        next_token_probs(logits, cfg), torch.nn.functional.one_hot(logits.argmax(-1), 300).float()
    )


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(temperature=1.0, top_k=None, repetition_penalty=1e-300),
        SamplingConfig(temperature=1e-4, top_k=None, repetition_penalty=1e-300),
        SamplingConfig(temperature=1e-5, top_k=3, repetition_penalty=1e300),
        SamplingConfig(temperature=1e300, top_p=1e-300, min_p=1.0),
        SamplingConfig(temperature=2e-5, top_k=None, top_p=0.5, min_p=0.5, repetition_penalty=1e-38),
    ],
)
def test_extreme_numbers_never_give_nan_or_an_id_outside_the_row(cfg):
    torch.manual_seed(3)
    logits = torch.randn(8, 300) * 5
    seen = torch.rand(8, 300) < 0.5
    p = next_token_probs(logits, cfg, seen)
    assert torch.isfinite(p).all() and torch.allclose(p.sum(-1), torch.ones(8))
    gen = make_generator(0, torch.device("cpu"))
    for _ in range(20):
        ids = sample_next(logits, cfg, gen, seen)
        assert ((ids >= 0) & (ids < 300)).all()
        assert (p.gather(1, ids[:, None]) > 0).all()  # drawn only where the distribution has mass


def test_a_tiny_penalty_ties_the_seen_positive_logits():
    """Penalty 1e-300: a seen positive logit / 1e-300 overflows; clamped, the seen positive tokens tie (hand
    computation: they share the mass evenly, everything else gets none)."""
    logits = torch.tensor([LOGITS])
    seen = torch.zeros(1, 8, dtype=torch.bool)
    seen[0, [0, 3, 1]] = True  # logits 2.0, 3.0 (positive), -1.0 (negative: multiplied, ~0)
    p = next_token_probs(logits, SamplingConfig(temperature=1.0, top_k=None, repetition_penalty=1e-300), seen)
    assert_probs(p[0].tolist(), [0.5, 0, 0, 0.5, 0, 0, 0, 0])


@pytest.mark.parametrize("temperature", [1.0, 1e-4])
def test_a_grammars_mask_holds_when_a_penalty_clamps_the_allowed_logits(temperature):
    """Penalty 1e300 on a seen negative logit clamps it to float32's lowest value, which is what the mask's -inf
    became after clamping too: the masked tokens tied the allowed one and were drawn (schemathesis found it, as a
    tool call that broke its grammar: repetition_penalty 1.9e108). Only the allowed tokens have mass."""
    logits = torch.tensor([LOGITS])
    seen = torch.ones(1, 8, dtype=torch.bool)
    allowed = torch.zeros(1, 8, dtype=torch.bool)
    allowed[0, [1, 5]] = True  # logits -1.0 and -2.5: both clamped to the lowest value, so they tie
    cfg = SamplingConfig(temperature=temperature, top_k=None, repetition_penalty=1e300)
    assert_probs(next_token_probs(logits, cfg, seen, None, allowed)[0].tolist(), [0, 0.5, 0, 0, 0, 0.5, 0, 0])
    gen = make_generator(0, torch.device("cpu"))
    assert {sample_next(logits, cfg, gen, seen, None, allowed).item() for _ in range(50)} == {1, 5}


def test_a_draw_from_a_row_without_mass_stays_in_the_row():
    gen = make_generator(0, torch.device("cpu"))
    for row in (torch.zeros(2, 5), torch.full((2, 5), math.nan)):
        assert ((draw(row, gen) >= 0) & (draw(row, gen) < 5)).all()


def test_choice_seeds_wrap_into_torchs_range():
    assert choice_seed(None, 3) is None
    assert choice_seed(5, 2) == 7
    assert choice_seed(2**63 - 1, 1) == 2**63  # past int64, still a seed torch takes
    assert choice_seed(2**64 - 1, 1) == 0
    # A negative seed keeps the generator it had (torch reads it as its two's complement).
    assert choice_seed(-1, 0) == 2**64 - 1
    a, b = make_generator(-1, torch.device("cpu")), make_generator(choice_seed(-1, 0), torch.device("cpu"))
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_logit_bias_and_openai_penalties_by_hand():
    """OpenAI's formula: logit += bias - frequency × count - presence × (count > 0), before the repetition penalty."""
    from gptmini.sampling import adjust_logits

    cfg = SamplingConfig(temperature=0, frequency_penalty=0.5, presence_penalty=1.0, logit_bias={3: -2.5})
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    counts = torch.tensor([[0.0, 2.0, 1.0, 0.0]])
    assert adjust_logits(logits, cfg, None, counts).tolist() == [[1.0, 0.0, 1.5, 1.5]]
    assert logits.tolist() == [[1.0, 2.0, 3.0, 4.0]]  # the caller's logits untouched
    seen = torch.tensor([[False, False, True, False]])
    with_rep = dataclasses.replace(cfg, repetition_penalty=2.0)
    assert adjust_logits(logits, with_rep, seen, counts).tolist() == [[1.0, 0.0, 0.75, 1.5]]
    banned = SamplingConfig(temperature=1.0, top_k=None, logit_bias={0: -100, 1: -100, 2: -100})
    draws = {int(sample_next(logits, banned, torch.Generator().manual_seed(s))) for s in range(50)}
    assert draws == {3}  # e^-97 against e^4: never drawn
    forced = SamplingConfig(temperature=0, logit_bias={0: 100})
    assert int(sample_next(logits, forced)) == 0


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"frequency_penalty": 2.5}, "frequency-penalty must be in [-2, 2]"),
        ({"presence_penalty": float("nan")}, "presence-penalty must be a finite number"),
        ({"logit_bias": {5: 101}}, "logit-bias of token 5 must be in [-100, 100]"),
        ({"logit_bias": {-1: 1}}, "logit-bias keys must be token ids"),
    ],
)
def test_penalty_and_bias_mistakes_are_refused(fields, message):
    with pytest.raises(UserError, match=re.escape(message)):
        SamplingConfig(**fields).validate()
