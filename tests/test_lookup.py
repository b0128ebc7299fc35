"""Prompt-lookup decoding (`lookup=N`) against references that know nothing of drafts: the naive greedy recompute,
plain decoding, and exact distributions enumerated by hand with a chi-square bound."""

import math
from collections import Counter

import pytest
import torch
from conftest import main_in_process, random_gpt
from test_generation import naive_greedy

import gptmini.decoding as decoding
import gptmini.engine as engine_module
from gptmini.api import load
from gptmini.checkpoint import save_checkpoint
from gptmini.config import GPTConfig, SamplingConfig
from gptmini.decoding import AttentionStep, GenerationStats
from gptmini.generation import generate_tokens
from gptmini.lookup import MAX_CREDIT, MAX_LOOKUP, MAX_PAUSE, Drafter, NgramIndex
from gptmini.model import GPT

GREEDY = SamplingConfig(temperature=0.0)


def run(model, prompt, n, sampling=GREEDY, **kwargs):
    stats = GenerationStats()
    out = [
        s[0]
        for s in generate_tokens(model, prompt, max_new_tokens=n, sampling=sampling, stats=stats, **kwargs)
    ]
    return out, stats


# ---- the draft --------------------------------------------------------------------------------------------------


def test_draft_follows_the_latest_longest_ngram():
    # "5 1 2 3" ends with the trigram 1 2 3, last seen at 0..2 (followed by 9), not the bigram 2 3 at 5..6
    index = NgramIndex([1, 2, 3, 9, 7, 2, 3, 4, 1, 2, 3])
    assert index.draft(3) == [9, 7, 2]
    index = NgramIndex([8, 2, 3, 6, 5, 2, 3])  # no earlier trigram "5 2 3": the bigram "2 3" → 6 5 ...
    assert index.draft(2) == [6, 5]
    index = NgramIndex([4, 1, 5, 9, 1])  # only the unigram "1" recurs
    assert index.draft(2) == [5, 9]
    assert NgramIndex([1, 2, 3]).draft(4) == []  # nothing recurs: no draft
    assert NgramIndex([1, 2, 1]).draft(0) == []


def paused_steps(drafter: Drafter) -> int:
    """How many draft calls in a row come back empty before the drafter proposes again."""
    n = 0
    while not drafter.draft(room=8):
        n += 1
        assert n <= MAX_PAUSE
    return n


def test_passes_that_lose_time_pause_drafting_until_the_balance_is_back():
    """Each pass books kept + 1 tokens minus its time in plain steps; below a zero balance drafting pauses for
    1, 2, 4 .. MAX_PAUSE steps, and at zero or above it does not. Untimed, a pass costs 2.5 steps."""
    d = Drafter([1, 2, 3, 1, 2, 3, 1, 2], k=4)
    assert d.draft(room=8) == [3, 1, 2, 3]
    d.stepped(1.0)
    d.verified(3, seconds=2.0)  # 4 tokens for 2 steps' time: balance +2
    assert paused_steps(d) == 0
    d.verified(0, seconds=2.5)  # 1 token for 2.5 steps: +2 - 1.5 = +0.5, still paid for
    assert paused_steps(d) == 0
    d.verified(0, seconds=2.5)  # -1.0
    assert paused_steps(d) == 1
    d.verified(1, seconds=1.5)  # this pass paid (+0.5), but the balance is still -0.5
    assert paused_steps(d) == 2
    for expected in (4, 8, 16, 32, 64, 64):
        d.verified(0, seconds=1.5)  # -0.5 each
        assert paused_steps(d) == expected
    d.stepped(3.0)  # smoothed: 0.8·1 + 0.2·3 = 1.4 s a step; balance -3.5
    d.verified(4, seconds=1.4)  # +4
    assert paused_steps(d) == 0
    for _ in range(10):
        d.verified(4, seconds=1.4)  # credit stops at MAX_CREDIT
    d.verified(0, seconds=1.4 * (MAX_CREDIT + 1.5))  # spends it all and half a step more
    assert paused_steps(d) == 1
    untimed = Drafter([1, 2, 1, 2], k=4)
    assert paused_steps(untimed) == 0
    untimed.verified(2)  # +0.5
    assert paused_steps(untimed) == 0
    untimed.verified(0)  # -1.0
    assert paused_steps(untimed) == 1


def test_draft_repeats_a_period_that_runs_into_the_end():
    # "1 2 1 2": no earlier "2 1 2"; "1 2" ended 2 tokens back, so the text repeats with period 2
    assert NgramIndex([1, 2, 1, 2]).draft(5) == [1, 2, 1, 2, 1]
    assert NgramIndex([7, 7, 7]).draft(3) == [7, 7, 7]
    index = NgramIndex([3, 4])
    index.append(3)
    index.append(4)  # appending keeps the index as if built at once
    assert index.draft(3) == NgramIndex([3, 4, 3, 4]).draft(3) == [3, 4, 3]


# ---- greedy: token for token what plain greedy gives --------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,std,lookup",
    [
        (dict(block_size=64), 0.1, 4),
        (dict(block_size=24, n_head=8), 0.1, 10),  # many window slides
        (dict(block_size=24, pos_embedding="sinusoidal"), 0.05, 3),
        (dict(block_size=32, bias=False, n_layer=3, n_head=2, n_embd=32), 0.1, 1),
        (dict(block_size=24, arch="modern"), 0.1, 4),  # rotary positions
        (dict(block_size=40), None, MAX_LOOKUP),  # a degenerate repeater: nearly every draft is kept
    ],
)
@pytest.mark.usefixtures("always_draft")
def test_greedy_equals_naive_recompute_also_past_the_window(overrides, std, lookup):
    model = random_gpt(std=std, **overrides)
    prompt = [5, 6, 7, 8, 9] * 3  # repeats itself: drafts from the start
    n = 90
    out, stats = run(model, prompt, n, lookup=lookup)
    assert out == naive_greedy(model, prompt, n)
    assert stats.new_tokens == n and stats.window_slides >= 1
    assert stats.lookup_passes > 0 and stats.lookup_accepted > 0  # drafts were checked, and some kept
    assert stats.lookup_accepted < stats.lookup_drafted or std is None  # ... and some refused


@pytest.mark.usefixtures("always_draft")
def test_greedy_with_repetition_penalty_equals_plain():
    model = random_gpt(std=0.05, block_size=32)
    cfg = SamplingConfig(temperature=0.0, repetition_penalty=1.1)
    prompt = [5, 6, 7, 8] * 4
    plain, _ = run(model, prompt, 70, cfg, use_cache=False)
    out, stats = run(model, prompt, 70, cfg, lookup=5)
    assert out == plain and stats.lookup_accepted > 0


def test_never_more_than_max_new_tokens():
    model = random_gpt(std=0.1, block_size=48)
    prompt = [5, 6, 7, 8, 9] * 3
    full = naive_greedy(model, prompt, 20)
    for n in range(1, 20):
        out, stats = run(model, prompt, n, lookup=8)
        assert out == full[:n] and stats.new_tokens == n


def test_eos_inside_a_kept_run_ends_the_generation_there(monkeypatch):
    # The loop's bookkeeping alone: a stand-in verifier keeps every draft (then adds 0), so passes decide long runs.
    model = tiny_vocab_gpt()
    prompt = [1, 2, 3, 4, 5, 6, 7, 1, 2]
    passes = []

    def keep_all(logits, draft, *args):
        passes.append([*draft, 0])
        return passes[-1]

    monkeypatch.setattr(engine_module, "accept_draft", keep_all)
    out, _ = run(model, prompt, 30, lookup=6)
    first_pass = passes[0]
    eos = next(t for t in first_pass[1:-1] if t not in out[: out.index(t)])  # first seen inside the run
    stopped, _ = run(model, prompt, 30, lookup=6, eos_id=eos)
    assert stopped == out[: out.index(eos) + 1] and len(stopped) < len(out)


@pytest.mark.usefixtures("always_draft")
def test_attention_steps_equal_plain_decoding():
    model = random_gpt(std=0.05, block_size=24)
    prompt = [5, 6, 7, 8, 9] * 3
    plain, with_lookup = [], []
    run(model, prompt, 30, on_attention=plain.append)
    _, stats = run(model, prompt, 30, on_attention=with_lookup.append, lookup=4)
    assert stats.lookup_accepted > 0 and len(plain) == len(with_lookup) == 30
    for a, b in zip(plain, with_lookup, strict=True):
        assert isinstance(b, AttentionStep) and a.key_start == b.key_start
        assert torch.equal(a.keys, b.keys) and torch.equal(a.tokens, b.tokens)
        for wa, wb in zip(a.weights, b.weights, strict=True):
            torch.testing.assert_close(wa, wb, atol=1e-5, rtol=1e-5)


# ---- sampling: the same distribution ----------------------------------------------------------------------------


def chi_square_p(counts: Counter, probs: dict, n: int) -> float:
    """P-value of Pearson's chi-square (cells expected below 5 pooled), Wilson–Hilferty approximation."""
    assert set(counts) <= {c for c, p in probs.items() if p > 0}, "an outcome of probability 0 happened"
    cells, rest_obs, rest_exp = [], 0, 0.0
    for c, p in probs.items():
        if n * p >= 5:
            cells.append((counts[c], n * p))
        else:
            rest_obs, rest_exp = rest_obs + counts[c], rest_exp + n * p
    if rest_exp > 0:
        cells.append((rest_obs, rest_exp))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    df = len(cells) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def hand_probs(logits: torch.Tensor, seen: set, cfg: SamplingConfig) -> torch.Tensor:
    """The sampler's distribution written out for these tests: penalty, temperature, top-k, softmax (fp64)."""
    x = logits.double().clone()
    for t in seen:
        x[t] = x[t] / cfg.repetition_penalty if x[t] > 0 else x[t] * cfg.repetition_penalty
    x = x / cfg.temperature
    if cfg.top_k is not None:
        x[x < torch.topk(x, cfg.top_k).values[-1]] = float("-inf")
    return x.softmax(-1)


def test_accept_draft_keeps_the_sampling_distribution_and_the_check_catches_a_planted_bug(monkeypatch):
    torch.manual_seed(0)
    V, draft = 8, [3, 5, 0]
    logits = torch.randn(len(draft) + 1, V) * 1.5
    cfg = SamplingConfig(temperature=0.9, top_k=6)
    p = [hand_probs(row, set(), cfg) for row in logits]
    # Plain sampling would draw x0 ~ p0, then (only if x0 = draft[0], the context row 1 assumes) x1 ~ p1, ...:
    # the first token off the draft ends what one pass decides.
    exact, prefix = {}, 1.0
    for m in range(len(draft) + 1):
        for x in range(V):
            if m == len(draft) or x != draft[m]:
                exact[(*draft[:m], x)] = prefix * p[m][x].item()
        prefix *= p[m][draft[m]].item() if m < len(draft) else 0.0
    assert math.isclose(sum(exact.values()), 1.0)

    def counts(n: int) -> Counter:
        generator = torch.Generator().manual_seed(1)
        return Counter(tuple(decoding.accept_draft(logits, draft, cfg, generator, None)) for _ in range(n))

    n = 6000
    assert chi_square_p(counts(n), exact, n) > 1e-3
    # A planted bug, keeping every draft token the sampler could draw (the uniform draws all 0): the check fails it.
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.zeros(*shape))
    assert chi_square_p(counts(n), exact, n) < 1e-6


def tiny_vocab_gpt() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=8, block_size=16, n_layer=2, n_head=2, n_embd=16, pad_vocab_multiple=8))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.6)
    return model.eval()


@torch.no_grad()
def exact_joint(model: GPT, prompt: list[int], n: int, cfg: SamplingConfig) -> dict:
    """P(the next n tokens) by enumeration: full recomputes (no cache), the hand-written sampler."""
    V = model.config.vocab_size
    out = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for seq, q in out.items():
            ctx = prompt + list(seq)
            logits = model(torch.tensor([ctx]), last_only=True)[0][0, -1]
            probs = hand_probs(logits, set(ctx) if cfg.repetition_penalty != 1.0 else set(), cfg)
            for x in range(V):
                nxt[(*seq, x)] = q * probs[x].item()
        out = nxt
    return out


@pytest.mark.usefixtures("always_draft")
def test_sampled_generation_keeps_the_joint_distribution_of_the_next_tokens():
    model = tiny_vocab_gpt()
    prompt = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2]  # every token recurs: each step has a draft
    cfg = SamplingConfig(temperature=1.0, top_k=6, repetition_penalty=1.5)
    n_new, n = 3, 2500
    exact = exact_joint(model, prompt, n_new, cfg)
    counts, accepted = Counter(), 0
    for seed in range(n):
        out, stats = run(model, prompt, n_new, SamplingConfig(**{**vars(cfg), "seed": seed}), lookup=2)
        counts[tuple(out)] += 1
        accepted += stats.lookup_accepted
    assert accepted > n // 8  # drafts were kept often enough to matter
    assert chi_square_p(counts, exact, n) > 1e-3


# ---- the API and the CLI ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("lookup") / "tiny"
    save_checkpoint(random_gpt(std=0.1, block_size=48), path)
    return path


@pytest.mark.parametrize("bad", [-1, MAX_LOOKUP + 1, 10**6, 2.5, True])
def test_api_refuses_bad_values_with_value_error(ckpt, bad):
    lm = load(ckpt, device="cpu")
    with pytest.raises(ValueError, match="lookup must be an integer"):
        lm.generate("hi", lookup=bad, max_new_tokens=3)
    with pytest.raises(ValueError, match="one sample"):
        lm.generate("hi", lookup=2, num_samples=2, max_new_tokens=3)


@pytest.mark.usefixtures("always_draft")
def test_api_text_stop_strings_and_stats_equal_plain(ckpt):
    lm = load(ckpt, device="cpu")
    prompt = "the cat sat on the mat. the cat sat on the mat. the cat"
    plain = lm.generate(prompt, temperature=0, max_new_tokens=40, ignore_eos=True)
    stats = GenerationStats()
    assert (
        lm.generate(prompt, temperature=0, max_new_tokens=40, ignore_eos=True, lookup=6, stats=stats) == plain
    )
    assert stats.new_tokens == 40 and stats.lookup_accepted > 0 and stats.decode_tokens_per_s > 0
    stop = plain[len(plain) // 2 : len(plain) // 2 + 3]
    cut = lm.generate(prompt, temperature=0, max_new_tokens=40, stop=[stop], lookup=6)
    assert (
        cut == lm.generate(prompt, temperature=0, max_new_tokens=40, stop=[stop]) == plain[: plain.find(stop)]
    )
    assert "".join(lm.stream(prompt, temperature=0, max_new_tokens=40, ignore_eos=True, lookup=6)) == plain


cli = main_in_process


def test_cli_flag_end_to_end(capsys, ckpt):
    prompt = "the cat sat on the mat. the cat sat on the mat. the cat"
    args = ["generate", prompt, "-c", ckpt, "--greedy", "-n", 30, "--ignore-eos", "--device", "cpu"]
    code, plain, _ = cli(capsys, *args)
    assert code == 0
    code, out, err = cli(capsys, *args, "--lookup", 6, "--stats")
    assert code == 0 and out == plain
    assert "lookup " in err and "draft tokens accepted" in err and "new tokens 30" in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--lookup", "-1"], "lookup must be an integer in 0..64"),
        (["--lookup", "1000"], "lookup must be an integer in 0..64"),
        (["--lookup", "3", "--num-samples", "2"], "one sample at a time"),
    ],
)
def test_cli_bad_values_are_one_line_exit_2(capsys, ckpt, args, message):
    code, out, err = cli(capsys, "generate", "hi", "-c", ckpt, "--device", "cpu", *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
