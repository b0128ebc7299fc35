"""The native CPU kernels (`gptmini/native.c`) against float64 products and against the PyTorch model they replace."""

import copy
import platform
import subprocess
import sys

import pytest
import torch
from conftest import random_gpt
from test_generation import naive_greedy, run

import gptmini.native as native
from gptmini.decode_step import DecodeStep
from gptmini.kv_cache import KVCache
from gptmini.quantize import Int8Linear, int4_quantize, prepare_for_decoding, quantize_int8

pytestmark = pytest.mark.skipif(
    not native.available(), reason="no C compiler: the native kernels cannot be built"
)


@pytest.mark.parametrize("wtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("k", [7, 64, 77, 768])
def test_linear_equals_the_float64_product_and_a_row_alone_equals_its_batch(wtype, k):
    torch.manual_seed(k)
    n = 37
    w = torch.randn(n, k)
    scale = None
    if wtype == torch.int8:
        scale = torch.rand(n) / 50
        w = torch.randint(-127, 128, (n, k)).to(torch.int8)
        deq = w.double() * scale.double()[:, None]
    else:
        w = w.to(wtype)
        deq = w.double()
    bias = torch.randn(n)
    x = torch.randn(16, k)
    used = x.double()
    if wtype == torch.int8:  # int8 multiplies 16-bit activations: each row rounded against its own max
        step = x.abs().amax(1, keepdim=True) / 16383
        used = ((x / step).round() * step).double()
        assert (used - x).abs().max() <= 0.5 * step.max() * 1.0001
    expected = used @ deq.T + bias.double()
    for rows in (1, 2, 3, 4, 5, 16):
        got = native.linear(
            x[:rows], w, wtype=native.WEIGHT_TYPES[wtype], out_features=n, bias=bias, scale=scale
        )
        torch.testing.assert_close(
            got.double(), expected[:rows], rtol=1e-5, atol=1e-5 * expected.abs().max().item()
        )
        for i in range(rows):  # the same bits alone as in any batch: cached decoding equals its recompute
            alone = native.linear(
                x[i : i + 1], w, wtype=native.WEIGHT_TYPES[wtype], out_features=n, bias=bias, scale=scale
            )
            assert torch.equal(alone[0], got[i])


def every_format(x: torch.Tensor, w: torch.Tensor, int4_inputs: int, group: int = 32) -> list[tuple]:
    """(activations, weight, wtype, extra arguments) of `w` in each format: fp32, bf16, int8 (random row scales)
    and int4 (its first `int4_inputs` columns, a multiple of `group`)."""
    n = w.shape[0]
    codes, scale_zero = native.pack_int4(*int4_quantize(w[:, :int4_inputs], group))
    return [
        (x, w, native.WEIGHT_TYPES[torch.float32], {}),
        (x, w.bfloat16(), native.WEIGHT_TYPES[torch.bfloat16], {}),
        (x, w.to(torch.int8), native.INT8, {"scale": torch.rand(n)}),
        (x[:, :int4_inputs].contiguous(), codes, native.INT4, {"scale": scale_zero}),
    ]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds for an x86-64 level without AVX-512")
def test_the_plain_c_loops_compute_the_same_products(tmp_path):
    """Built for x86-64-v2 (no AVX-512), the fallback loops: int8's exact integer sums give the same bits as the
    vectorised build, the float and int4 ones the same products to fp32 rounding."""
    native.build(native._compiler(), tmp_path / "plain.so", march="x86-64-v2")
    plain = native.load(tmp_path / "plain.so")
    torch.manual_seed(1)
    n, k = 40, 200
    x = torch.randn(3, k)  # 200 inputs: a masked tail for the float and int8 loops
    w = torch.randn(n, k)
    # int4: 6 runs of 32 padded to 8, as groups of 32 and of 64
    for inputs, weight, wtype, extra in [*every_format(x, w, 192), every_format(x, w, 192, group=64)[-1]]:
        fast = native.linear(inputs, weight, wtype=wtype, out_features=n, **extra)
        slow = native.linear(inputs, weight, wtype=wtype, out_features=n, lib=plain, **extra)
        if wtype == native.INT8:
            assert torch.equal(slow, fast)
        else:
            torch.testing.assert_close(slow, fast, rtol=1e-5, atol=1e-5 * fast.abs().max().item())


def test_one_weight_stream_a_thread_gives_the_same_bits(tmp_path):
    """The build that reads one weight row at a time (AMD's) and the default one that reads several rows side by
    side sum every product in the same order: the same bits, for every format, alone and in a batch."""
    native.build(native._compiler(), tmp_path / "one.so", streams=1)
    native.build(native._compiler(), tmp_path / "many.so", streams=4)
    one, many = native.load(tmp_path / "one.so"), native.load(tmp_path / "many.so")
    torch.manual_seed(2)
    n, k = 203, 300  # rows not a multiple of threads × streams; inputs with a masked tail
    x, w = torch.randn(6, k), torch.randn(n, k)
    for inputs, weight, wtype, extra in [*every_format(x, w, 256), every_format(x, w, 256, group=128)[-1]]:
        for rows in (1, 2, 3, 6):
            args = dict(wtype=wtype, out_features=n, bias=torch.randn(n), **extra)
            a = native.linear(inputs[:rows], weight, lib=one, **args)
            b = native.linear(inputs[:rows], weight, lib=many, **args)
            assert torch.equal(a, b), (wtype, rows)


def test_every_thread_count_gives_the_same_bits():
    """Threads claim pieces of each other's rows as they finish (work stealing): whichever thread computes a row,
    every row is computed, once, with the same bits as one thread alone. Eight threads on fewer cores get
    descheduled mid-product, so the others take over their pieces."""
    torch.manual_seed(3)
    n, k = 5003, 300  # many pieces per thread; rows not a multiple of threads × streams
    x, w = torch.randn(3, k), torch.randn(n, k)
    before = torch.get_num_threads()
    try:
        for inputs, weight, wtype, extra in every_format(x, w, 256):
            args = dict(wtype=wtype, out_features=n, bias=torch.randn(n), **extra)
            for rows in (1, 3):
                torch.set_num_threads(1)
                alone = native.linear(inputs[:rows], weight, **args)
                for threads in (2, 3, 8):
                    torch.set_num_threads(threads)
                    for _ in range(3):
                        got = native.linear(inputs[:rows], weight, **args)
                        assert torch.equal(got, alone), (wtype, rows, threads)
    finally:
        torch.set_num_threads(before)


MODELS = {
    "gpt2": dict(),
    "sinusoidal": dict(pos_embedding="sinusoidal"),
    "modern": dict(arch="modern"),
    "no-bias": dict(bias=False, n_head=2),
}


def prefilled_twice(model, ids, n):
    """Two caches holding the same first `n` tokens of `ids` (one for PyTorch, one for the C step) and the step."""
    ref_cache, cache = KVCache.for_model(model), KVCache.for_model(model)
    model(ids[:, :n], cache=ref_cache)
    model(ids[:, :n], cache=cache)
    step = DecodeStep.for_model(model, cache)
    assert step is not None
    return ref_cache, cache, step


@pytest.mark.parametrize("form", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("name", list(MODELS))
@torch.no_grad()
def test_decode_step_equals_the_pytorch_step(name, form):
    model = random_gpt(std=0.2, vocab_size=700, **MODELS[name])
    if form == "bf16":
        model = model.to(torch.bfloat16)
    prepare_for_decoding(model, quantize=form if form in ("int8", "int4") else None)
    ids = torch.randint(0, 700, (1, 50))
    ref_cache, cache, step = prefilled_twice(model, ids, 10)
    # bf16: PyTorch rounds every activation to bf16, the C step keeps them in fp32. int8: a 1e-7 difference in a
    # linear's input may round one 16-bit activation the other way (a step of 6e-5 of the row's max); int4: the same
    # with int8 activations per block of 32 (a step of 1/127 of the block's max).
    tol = {"bf16": 3e-2, "int8": 1e-3, "int4": 1e-2}.get(form, 1e-5)
    for t in range(10, 50):
        if form in (
            "int8",
            "int4",
        ):  # bf16 caches: a 1e-5 difference may round a key the other way; start equal
            cache.k.copy_(ref_cache.k)
            cache.v.copy_(ref_cache.v)
        ref = model(ids[:, t : t + 1], cache=ref_cache, start_pos=t)[0][:, -1].float()
        got = step(int(ids[0, t]), t)
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())
    if cache.k.dtype == torch.bfloat16:  # one bf16 step apart at most
        tol = max(tol, 2**-7)
    for got, ref in ((cache.k, ref_cache.k), (cache.v, ref_cache.v)):  # the keys and values it wrote
        torch.testing.assert_close(
            got.float(), ref.float(), rtol=tol, atol=tol * ref.float().abs().max().item()
        )


@pytest.mark.parametrize("name", ["gpt2", "modern"])
@torch.no_grad()
def test_several_tokens_in_one_call_equal_the_pytorch_forward(name):
    """Prompt-lookup's verify pass: the fed token and a draft, each seeing the cache and the tokens before it."""
    model = prepare_for_decoding(random_gpt(std=0.2, vocab_size=700, **MODELS[name]))
    ids = torch.randint(0, 700, (1, 30))
    ref_cache, cache, step = prefilled_twice(model, ids, 12)
    for start, end in ((12, 13), (13, 18), (18, 27)):
        ref = model(ids[:, start:end], cache=ref_cache, start_pos=start)[0][0]
        got = step.forward(ids[0, start:end].tolist(), start)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(cache.k, ref_cache.k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "modern"])
def test_greedy_decoding_through_the_native_step_equals_the_recompute_past_the_window(monkeypatch, name):
    calls = []
    original = DecodeStep.rows
    monkeypatch.setattr(DecodeStep, "rows", lambda self, *a: calls.append(1) or original(self, *a))
    model = prepare_for_decoding(random_gpt(std=0.3, block_size=32, **MODELS[name]))
    (tokens,), stats = run(model, [1, 2, 3], 90)
    assert stats.window_slides >= 2 and len(calls) > 60  # the native step ran, and windows slid
    assert tokens == naive_greedy(model, [1, 2, 3], 90)


def test_int8_decoding_equals_its_recompute_and_stays_close_to_fp32():
    model = random_gpt(std=0.02, n_embd=128)
    q = quantize_int8(copy.deepcopy(model))
    assert all(lin._native for lin in q.modules() if isinstance(lin, Int8Linear))
    ids = torch.randint(0, 50257, (1, 40))
    with torch.no_grad():
        ref, got = model(ids)[0], q(ids)[0]
    # weight-only int8 (activations stay fp32): well inside the 8-bit-activation path's bound
    assert (got - ref).abs().max() < 0.1 * ref.std()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert run(q, [1, 2, 3], 40)[0] == run(q, [1, 2, 3], 40, use_cache=False)[0]


@pytest.mark.parametrize("form", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("name", ["gpt2", "modern"])
@torch.no_grad()
def test_a_row_gets_the_same_bits_alone_and_batched_with_rows_at_other_positions(name, form):
    """One call over rows each at its own position: every row's logits and cached keys are the bits it gets alone
    (prefill, a decode step, a verify pass), so a request's text cannot depend on its neighbours."""
    model = random_gpt(std=0.2, vocab_size=700, **MODELS[name])
    if form == "bf16":
        model = model.to(torch.bfloat16)
    prepare_for_decoding(model, quantize=form if form in ("int8", "int4") else None)
    lengths = [3, 17, 9, 30, 1]  # a different prompt length per row
    prompts = [torch.randint(0, 700, (n + 6,)).tolist() for n in lengths]
    alone = [KVCache.for_model(model, batch_size=1) for _ in lengths]
    batched = KVCache.for_model(model, batch_size=len(lengths))
    steps = [DecodeStep.for_model(model, c) for c in alone]
    together = DecodeStep.for_model(model, batched)
    expected = []
    for step, ids, n in zip(steps, prompts, lengths, strict=True):
        step.forward(ids[:n], 0)
        expected.append([step.forward([t], n + i).clone() for i, t in enumerate(ids[n:-3])])
        expected[-1].append(step.forward(ids[-3:], len(ids) - 3).clone())  # a verify pass of 3 tokens
    # All prefills in one call, then the decode steps of every row in one call each, then the verify passes.
    tokens = [t for ids, n in zip(prompts, lengths, strict=True) for t in ids[:n]]
    rows = [r for r, n in enumerate(lengths) for _ in range(n)]
    together.rows(tokens, rows, [p for n in lengths for p in range(n)])
    for i in range(3):
        got = together.rows(
            [ids[n + i] for ids, n in zip(prompts, lengths, strict=True)],
            list(range(5)),
            [n + i for n in lengths],
        ).clone()
        for r in range(5):
            assert torch.equal(got[r : r + 1], expected[r][i]), (r, i)
    verify = together.rows(
        [t for ids in prompts for t in ids[-3:]],
        [r for r in range(5) for _ in range(3)],
        [len(ids) - 3 + j for ids in prompts for j in range(3)],
    )
    for r in range(5):
        assert torch.equal(verify[3 * r : 3 * r + 3], expected[r][-1]), r
        assert torch.equal(batched.k[:, r : r + 1], alone[r].k)
        assert torch.equal(batched.v[:, r : r + 1], alone[r].v)


def test_the_step_refuses_rows_and_positions_outside_its_cache():
    model = prepare_for_decoding(random_gpt())
    step = DecodeStep.for_model(model, KVCache.for_model(model, batch_size=2))
    with pytest.raises(ValueError, match="row"):
        step.rows([1], [2], [0])
    with pytest.raises(ValueError, match="position"):
        step.rows([1], [0], [model.config.block_size])


def test_no_compiler_or_opt_out_falls_back_to_pytorch(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setattr(native, "_compiler", lambda: "false")
    native.library.cache_clear()
    try:
        assert native.library() is None
        assert not list(tmp_path.rglob("*.so"))  # no half-written library left behind
    finally:
        native.library.cache_clear()
    code = "import gptmini.native as n; print(n.library())"
    out = subprocess.run(
        [sys.executable, "-c", code], env={"GPTMINI_NATIVE": "0", "PATH": ""}, capture_output=True, text=True
    )
    assert out.stdout.strip() == "None", out.stderr


def test_the_thread_chooser_drops_threads_at_a_stall_and_keeps_the_faster_count(monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    clock = [0.0]
    monkeypatch.setattr(native.time, "monotonic", lambda: clock[0])

    def run(chooser, calls: int, seconds: dict[int, float]) -> list[int]:
        picked = []
        for _ in range(calls):
            t = chooser.pick()
            picked.append(t)
            clock[0] += seconds[t]  # the call's time passes, then it is recorded
            chooser.record(t, seconds[t])
        return picked

    chooser = native.ThreadChooser(4)
    quiet = run(
        chooser, 600, {4: 1e-3, 2: 1.8e-3}
    )  # all cores faster: fewer are tried now and then, never kept
    assert quiet[:32] == [4] * 32 and 2 in quiet
    assert quiet.count(2) <= 8 * 5  # tries of 8 calls, 32, 64, 128, 256, 512 calls apart

    run(chooser, 10, {4: 1e-3, 2: 1.8e-3})
    chooser.record(4, 0.2)  # one slow call is any hiccup, no stall: still all cores
    assert chooser.current == 4
    busy = run(chooser, 30_000, {4: 0.2, 2: 1.8e-3})  # another job: calls on all cores stall (~1 min)
    assert busy[2:].count(4) <= 10 and busy[-100:] == [2] * 100  # tried again 1, 2, 4 .. 32 s apart
    clock[0] += 60
    assert run(chooser, 100, {4: 1e-3, 2: 1.8e-3})[-50:].count(4) >= 40  # the job ended: all cores again
    tiny = run(native.ThreadChooser(4), 300, {4: 1e-3, 2: 5e-4})  # a model too small to share: fewer win
    assert tiny[-100:].count(2) >= 90
    native.fix_threads(3)
    try:
        assert chooser.pick() == 3  # --threads: no choosing
    finally:
        native.fix_threads(None)
