"""The decoding engine in process (no HTTP): a request's tokens and logprobs do not depend on its company."""

from __future__ import annotations

import pytest
import torch
from conftest import random_gpt

import gptmini.native as native
from gptmini.api import LM
from gptmini.config import SamplingConfig
from gptmini.engine import Engine
from gptmini.quantize import prepare_for_decoding
from gptmini.rows import Request
from gptmini.tokenizer import Tokenizer

FORMATS = ["fp32", "bf16", "int8", "int4"]


def tiny_lm(form: str, arch: str = "gpt2") -> LM:
    model = random_gpt(std=0.2, block_size=48, arch=arch)
    if form == "bf16":
        model = model.to(torch.bfloat16)
    prepare_for_decoding(model, quantize=form if form in ("int8", "int4") else None)
    return LM(model, Tokenizer(model.config.vocabulary))


def requests(n: int, lookup: int = 0) -> list[Request]:
    """`n` greedy requests of other prompt lengths and lengths of text (some slide their 48-token window), drafting
    `lookup` tokens a pass."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        prompt = (
            torch.randint(0, 50257, (1 + 5 * i % 40,), generator=gen).tolist() * 2
        )  # repeats: drafts come
        out.append(
            Request(
                prompt_ids=prompt[:48],
                sampling=SamplingConfig(temperature=0.0),
                max_new_tokens=8 + 7 * i % 60,
                ignore_eos=True,
                logprobs=2,
                lookup=lookup,
            )
        )
    return out


def decode(engine: Engine, batch: list[Request]) -> list[tuple[list[int], list[float]]]:
    """Every request's (token ids, logprobs), all submitted at once."""
    import queue

    outputs: list[queue.Queue] = [queue.Queue() for _ in batch]
    engine.submit_many([(r, q.put) for r, q in zip(batch, outputs, strict=True)])
    results = []
    for q in outputs:
        ids, logprobs = [], []
        while True:
            out = q.get(timeout=120)
            ids += [t.id for t in out.tokens]
            logprobs += [t.logprob for t in out.tokens]
            if out.finish_reason is not None:
                assert out.finish_reason == "length", out.error
                break
        results.append((ids, logprobs))
    return results


@pytest.mark.parametrize("path", ["native", "pytorch"])
@pytest.mark.parametrize("form", FORMATS)
def test_a_request_decodes_the_same_alone_and_batched_with_15_others(form, path):
    if path == "native" and not native.available():
        pytest.skip("no C compiler: the native kernels cannot be built")
    lm = tiny_lm(form)
    batch = requests(16)
    engine = Engine(lm, parallel=16, step="native" if path == "native" else "torch").start()
    try:
        alone = [decode(engine, [r])[0] for r in batch]
        together = decode(engine, batch)
    finally:
        engine.stop()
    assert engine.passes.kind == ("native" if path == "native" else "torch")
    for r, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert a[0] == b[0], f"request {r}: tokens differ"
        # The native step gives a row the same bits in any batch; PyTorch's batched kernels may round the last bit
        # of a logit differently.
        tol = 0 if path == "native" else 1e-6
        torch.testing.assert_close(torch.tensor(a[1]), torch.tensor(b[1]), rtol=tol, atol=tol)


@pytest.mark.skipif(not native.available(), reason="no C compiler: the native kernels cannot be built")
@pytest.mark.parametrize("form", ["fp32", "int8"])
def test_lookup_rows_verify_inside_the_batch_and_keep_the_plain_tokens_and_logprobs(form):
    """A verify pass feeds a row's draft beside the other rows' tokens in one native call; a token's arithmetic
    does not depend on the tokens beside it, so the text and logprobs are plain decoding's, alone or batched."""
    lm = tiny_lm(form, arch="modern")
    engine = Engine(lm, parallel=8).start()
    try:
        plain = decode(engine, requests(8, lookup=0))
        drafted = decode(engine, requests(8, lookup=4))
        alone = [decode(engine, [r])[0] for r in requests(8, lookup=4)]
    finally:
        engine.stop()
    assert drafted == plain
    assert alone == plain


@pytest.mark.skipif(not native.available(), reason="no C compiler: the native kernels cannot be built")
@pytest.mark.parametrize("form", ["fp32", "int8"])
def test_a_prompt_that_starts_like_an_earlier_one_reuses_its_cache_and_decodes_the_same_bits(form):
    """A chat re-sends its history: the slot the last turn left holds it, only the new tokens are computed, and the
    reply's tokens and logprobs equal a cold engine's."""
    lm = tiny_lm(form, arch="modern")
    first = requests(5)[4]
    first.prompt_ids, first.max_new_tokens = first.prompt_ids[:20], 12  # no window slide
    warm = Engine(lm, parallel=2).start()
    cold = Engine(lm, parallel=2).start()
    try:
        reply, _ = decode(warm, [first])[0]
        turn = Request(
            prompt_ids=[*first.prompt_ids, *reply[:10], 7, 8, 9],
            sampling=SamplingConfig(temperature=0.0),
            max_new_tokens=12,
            ignore_eos=True,
            logprobs=2,
        )
        outs = list(warm.generate(turn))
        again = decode(cold, [turn])[0]
    finally:
        warm.stop()
        cold.stop()
    assert [t.id for o in outs for t in o.tokens] == again[0]
    assert [t.logprob for o in outs for t in o.tokens] == again[1]
    assert outs[-1].stats.prompt_cached == 20 + 10  # the first prompt, and the reply's tokens it wrote


def naive_penalised_greedy(
    model, prompt: list[int], n: int, freq: float, pres: float, bias: dict[int, float]
):
    """Greedy by a full recompute each step, OpenAI's penalties applied by hand to the last position's logits."""
    ids, counts = list(prompt), {}
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0][0, -1].tolist()
            for t, b in bias.items():
                logits[t] += b
            for t, c in counts.items():
                logits[t] -= freq * c + pres
            tok = max(range(len(logits)), key=logits.__getitem__)
            counts[tok] = counts.get(tok, 0) + 1
            ids.append(tok)
    return ids[len(prompt) :]


@pytest.mark.parametrize("lookup", [0, 4])
def test_penalties_and_logit_bias_decode_what_a_hand_applied_formula_decodes(lookup):
    lm = tiny_lm("fp32", arch="modern")
    prompt = [11, 12, 13, 11, 12, 13, 11, 12]
    bias = {500: 3.0, 11: -1.0}
    expected = naive_penalised_greedy(lm.model, prompt, 20, 0.7, 0.4, bias)
    plain = naive_penalised_greedy(lm.model, prompt, 20, 0.0, 0.0, {})
    assert expected != plain  # the settings change the text
    sampling = SamplingConfig(temperature=0, frequency_penalty=0.7, presence_penalty=0.4, logit_bias=bias)
    request = Request(prompt, sampling, max_new_tokens=20, ignore_eos=True, lookup=lookup)
    engine = Engine(lm, parallel=2)
    got = [t for out in engine.generate(request) for t in out.ids]
    assert got == expected


@pytest.mark.skipif(not native.available(), reason="no C compiler: the native kernels cannot be built")
def test_scored_prompts_that_share_a_context_reuse_its_cache_and_its_scores():
    """An evaluation harness scores the same context with other endings (`echo` + `logprobs`, no new tokens): the
    second prompt computes only past the shared context, and every prompt token's logprob is a cold engine's."""
    lm = tiny_lm("int8", arch="modern")
    gen = torch.Generator().manual_seed(3)
    context = torch.randint(0, 50257, (25,), generator=gen).tolist()

    def scored(ending: list[int]) -> Request:
        return Request(
            context + ending,
            SamplingConfig(temperature=0),
            max_new_tokens=0,
            logprobs=2,
            prompt_logprobs=True,
        )

    def scores(engine: Engine, request: Request):
        outs = list(engine.generate(request))
        lps = [(t.id, t.logprob, t.top) for o in outs for t in (o.prompt_logprobs or [])]
        return lps, outs[-1].stats.prompt_cached

    warm, cold = Engine(lm, parallel=2), Engine(lm, parallel=2)
    first, cached = scores(warm, scored([7, 8, 9]))
    assert cached == 0 and first == scores(cold, scored([7, 8, 9]))[0]
    second, cached = scores(warm, scored([10, 11, 12, 13]))
    assert cached == len(context) - 1  # the context's last token is scored again: its ending differs after it
    assert second == scores(Engine(lm, parallel=2), scored([10, 11, 12, 13]))[0]


# ---- the engine's life cycle, driven by the calling thread (no engine thread, no HTTP) ----------------------------


def greedy(prompt: list[int], n: int) -> Request:
    return Request(
        prompt_ids=prompt, sampling=SamplingConfig(temperature=0.0), max_new_tokens=n, ignore_eos=True
    )


def alone(lm: LM, request: Request, step: str = "auto") -> list[int]:
    engine = Engine(lm, parallel=1, max_queue=0, step=step)
    return [t for _, out in engine.generate_many([request]) for t in out.ids]


def test_a_full_queue_refuses_and_a_cancelled_request_frees_its_row_for_the_next():
    from gptmini.rows import QueueFull

    lm = tiny_lm("fp32")
    engine = Engine(lm, parallel=1, max_queue=1)
    got: dict[int, list] = {0: [], 1: []}
    first = engine.submit(greedy([5, 6, 7], 40), got[0].append)
    engine.submit(greedy([9, 10], 6), got[1].append)
    with pytest.raises(QueueFull):
        engine.submit(greedy([1], 4), lambda out: None)
    for _ in range(3):
        engine.run_step()
    assert engine.running == 1 and engine.waiting == 1  # one row: the second waits
    first.cancel()
    while not got[1] or got[1][-1].finish_reason is None:
        engine.run_step()
    assert got[0][-1].finish_reason == "cancelled"
    assert sum(len(o.ids) for o in got[0]) < 40
    assert [t for o in got[1] for t in o.ids] == alone(
        lm, greedy([9, 10], 6)
    )  # the freed row, cold or cached


@pytest.mark.parametrize("step", ["auto", "torch"])
def test_a_request_admitted_mid_flight_and_rows_packed_after_a_removal_decode_as_alone(step):
    """Rows leave at different steps and one joins late; on the PyTorch path the last row moves into a freed slot
    (`packed`). Every request's tokens are its tokens alone."""
    lm = tiny_lm("fp32")
    batch = [greedy([3 + i, 4, 5 + 2 * i], 4 + 6 * i) for i in range(3)]
    late = greedy([11, 12, 13, 14], 12)
    engine = Engine(lm, parallel=3, max_queue=4, step=step)
    got: list[list[int]] = [[] for _ in range(4)]
    finished = [False] * 4

    def emit(i):
        def take(out):
            got[i].extend(out.ids)
            finished[i] = finished[i] or out.finish_reason is not None

        return take

    engine.submit_many([(r, emit(i)) for i, r in enumerate(batch)])
    for _ in range(5):
        engine.run_step()
    assert (
        finished[0] and not finished[2]
    )  # the first left; its slot is free (and, packed, refilled by a move)
    engine.submit(late, emit(3))
    while not all(finished):
        engine.run_step()
    for request, tokens in zip([*batch, late], got, strict=True):
        assert tokens == alone(lm, request, step)


def test_each_row_slides_its_own_window_as_the_naive_recompute_does():
    """A 48-token context: a long request slides its window (several times) beside a short one that never does;
    both equal a full recompute under the documented window policy."""
    from test_generation import naive_greedy

    lm = tiny_lm("fp32")
    long_prompt, short_prompt = list(range(100, 140)), [7, 8, 9]
    engine = Engine(lm, parallel=2, max_queue=0)
    got: dict[int, list[int]] = {0: [], 1: []}
    for i, out in engine.generate_many([greedy(long_prompt, 70), greedy(short_prompt, 10)]):
        got[i] += out.ids
    with torch.no_grad():
        assert got[0] == naive_greedy(lm.model, long_prompt, 70)
        assert got[1] == naive_greedy(lm.model, short_prompt, 10)
