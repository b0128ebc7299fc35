"""`gptmini generate`, run in-process (fast) and checked against a naive greedy reference and the Python API."""

import copy
import subprocess
import sys

import pytest
import torch
from conftest import main_in_process, random_gpt
from test_generation import naive_greedy

from gptmini.api import load
from gptmini.checkpoint import save_checkpoint
from gptmini.loading import load_checkpoint
from gptmini.quantize import quantize_int8
from gptmini.tokenizer import Tokenizer

TOK = Tokenizer()
PROMPT = "It was a dark and stormy night"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "tiny"
    save_checkpoint(random_gpt(std=0.3, block_size=48), path)
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    # The plain CPU fp32 model (no packed linears) every CPU test's reference runs on.
    return load_checkpoint(ckpt, device="cpu")[0]


def cli(capsys, monkeypatch, *args, stdin=None):
    """`gptmini generate ARGS` in this process, on the CPU unless the args name a device."""
    args = [str(a) for a in args]
    if args[:1] == ["generate"] and "--device" not in args:
        args += ["--device", "cpu"]
    return main_in_process(capsys, *args, stdin=stdin, monkeypatch=monkeypatch)


def reference(model, prompt, n):
    return TOK.decode(naive_greedy(model, TOK.encode(prompt) or [TOK.eot_id], n))


def test_greedy_prints_prompt_then_reference_completion(capsys, monkeypatch, ckpt, model):
    expected = PROMPT + reference(model, PROMPT, 20) + "\n"
    for extra in ([], ["--no-kv-cache"], ["--no-stream"], ["--dtype", "float32", "--device", "cpu"]):
        code, out, err = cli(
            capsys, monkeypatch, "generate", PROMPT, "-c", ckpt, "--greedy", "-n", 20, "--ignore-eos", *extra
        )
        assert code == 0, err
        assert out == expected, extra


def test_stop_string_cuts_the_output(capsys, monkeypatch, ckpt, model):
    full = reference(model, PROMPT, 20)
    stop = full[8:11]
    code, out, _ = cli(
        capsys,
        monkeypatch,
        "generate",
        PROMPT,
        "-c",
        ckpt,
        "-t",
        0,
        "-n",
        20,
        "--ignore-eos",
        "--stop",
        "zzz",
        "--stop",
        stop,
    )
    assert code == 0 and out == PROMPT + full[: full.find(stop)] + "\n"


def test_prompt_from_stdin_dash_omitted_and_empty(capsys, monkeypatch, ckpt, model):
    args = ["generate", "-c", ckpt, "--greedy", "-n", 8, "--ignore-eos"]
    assert (
        cli(capsys, monkeypatch, *args, "-", stdin=PROMPT)[1] == PROMPT + reference(model, PROMPT, 8) + "\n"
    )
    assert cli(capsys, monkeypatch, *args, stdin=PROMPT)[1] == PROMPT + reference(model, PROMPT, 8) + "\n"
    # an empty prompt starts from <|endoftext|>
    assert cli(capsys, monkeypatch, *args, stdin="")[1] == reference(model, "", 8) + "\n"


def test_sampling_flags_reach_the_sampler(capsys, monkeypatch, ckpt):
    lm = load(ckpt, device="cpu")
    kw = dict(
        temperature=0.9, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=4, ignore_eos=True
    )
    expected = PROMPT + lm.generate(PROMPT, max_new_tokens=15, **kw) + "\n"
    args = [
        "generate",
        PROMPT,
        "-c",
        ckpt,
        "-n",
        15,
        "-t",
        0.9,
        "--top-k",
        40,
        "--top-p",
        0.9,
        "--min-p",
        0.05,
    ]
    args += ["--repetition-penalty", 1.3, "--seed", 4, "--ignore-eos"]
    assert cli(capsys, monkeypatch, *args)[1] == expected
    assert cli(capsys, monkeypatch, *args[:-3], "--seed", 5, "--ignore-eos")[1] != expected


def test_num_samples_prints_each_sample(capsys, monkeypatch, ckpt):
    lm = load(ckpt, device="cpu")
    samples = lm.generate(PROMPT, max_new_tokens=10, temperature=1.0, seed=1, num_samples=3, ignore_eos=True)
    code, out, _ = cli(
        capsys,
        monkeypatch,
        "generate",
        PROMPT,
        "-c",
        ckpt,
        "-n",
        10,
        "-t",
        1.0,
        "--seed",
        1,
        "--num-samples",
        3,
        "--ignore-eos",
    )
    assert code == 0
    for s in samples:
        assert PROMPT + s in out
    assert out.count(PROMPT) == 3


def test_stats_go_to_stderr_only(capsys, monkeypatch, ckpt, model):
    code, out, err = cli(
        capsys, monkeypatch, "generate", PROMPT, "-c", ckpt, "--greedy", "-n", 10, "--ignore-eos", "--stats"
    )
    assert code == 0 and out == PROMPT + reference(model, PROMPT, 10) + "\n"
    for field in ("prompt tokens 8", "new tokens 10", "prefill", "tokens/s", "peak memory"):
        assert field in err


def test_long_prompt_warns_on_stderr(capsys, monkeypatch, ckpt):
    code, out, err = cli(capsys, monkeypatch, "generate", "word " * 100, "-c", ckpt, "--greedy", "-n", 3)
    assert code == 0 and "warning: prompt has 101 tokens; keeping the last 48" in err
    assert out.startswith("word " * 100)


@pytest.mark.parametrize("extra", [["--dtype", "bfloat16"], ["--quantize", "int8"], ["--compile"]])
def test_speed_flags_run(capsys, monkeypatch, ckpt, model, extra):
    code, out, err = cli(
        capsys, monkeypatch, "generate", PROMPT, "-c", ckpt, "--greedy", "-n", 6, "--ignore-eos", *extra
    )
    assert code == 0, err
    if "bfloat16" in extra:
        # The naive recompute over the same bf16 weights, in fp32 as the native step computes (fp32's text
        # differs), as far as the bf16 KV cache keeps (its rounding may flip a later near tie): three tokens
        bf16 = copy.deepcopy(model).to(torch.bfloat16).float()
        assert out.startswith(PROMPT + TOK.decode(naive_greedy(bf16, TOK.encode(PROMPT), 3)))
    elif (
        "int8" in extra
    ):  # the naive recompute over the same int8 weights, as far as the bf16 KV cache of int8
        # models keeps (its rounding may flip a later near tie): the first three tokens
        ids = naive_greedy(quantize_int8(copy.deepcopy(model)), TOK.encode(PROMPT), 3)
        assert out.startswith(PROMPT + TOK.decode(ids))
    else:  # --compile: same math as eager fp32
        assert out == PROMPT + reference(model, PROMPT, 6) + "\n"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--quantize", "int3"], "unknown quantization 'int3'"),
        (["--num-samples", "0"], "num-samples must be >= 1"),
        (["--max-new-tokens", "-1"], "max-new-tokens must be >= 0"),
        (["--dtype", "float64"], "unknown dtype 'float64'"),
        (["--min-p", "2"], "min-p must be in [0, 1]"),
        (["--repetition-penalty", "0"], "repetition-penalty must be > 0"),
        (["--top-k", "0"], "top-k must be >= 1"),
        (["--top-p", "0"], "top-p must be in (0, 1]"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--device", "tpu"], "unknown device"),
        (["--num-samples", "two"], "--num-samples"),
    ],
)
def test_bad_values_are_one_line_exit_2(capsys, monkeypatch, ckpt, args, message):
    code, out, err = cli(capsys, monkeypatch, "generate", "hi", "-c", ckpt, *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_missing_default_checkpoint_is_a_clear_error(capsys, monkeypatch, tmp_path):
    import gptmini.api

    monkeypatch.setattr(gptmini.api, "default_checkpoint", lambda: tmp_path / "checkpoints" / "default")
    code, _, err = cli(capsys, monkeypatch, "generate", "hi")
    assert code == 2 and err.startswith("error: no default checkpoint") and err.count("\n") == 1


def test_generate_help_does_not_import_torch():
    code = (
        "import sys\nfrom gptmini.cli import main\n"
        "try:\n    main(['generate', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    for flag in ("--top-p", "--min-p", "--repetition-penalty", "--stop", "--num-samples", "--no-kv-cache"):
        assert flag in out
    for flag in ("--stats", "--dtype", "--quantize", "--compile", "--device", "--no-stream"):
        assert flag in out
    assert out.strip().endswith("NO-TORCH")


# ---- the same on a GPU ----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp32_greedy_equals_the_naive_recompute_on_cuda(capsys, monkeypatch, ckpt):
    # fp32 on both sides, same device: the cached engine must reproduce the full recompute token for token.
    cuda_model = load(ckpt, device="cuda", dtype="float32").model
    expected = PROMPT + reference(cuda_model, PROMPT, 20) + "\n"
    for extra in ([], ["--no-kv-cache"], ["--compile"]):
        code, out, err = cli(
            capsys, monkeypatch, "generate", PROMPT, "-c", ckpt, "--greedy", "-n", 20, "--ignore-eos",
            "--device", "cuda", "--dtype", "float32", *extra,
        )  # fmt: skip
        assert code == 0, err
        assert out == expected, extra


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_logits_are_within_bf16_rounding_of_cpu_fp32(capsys, monkeypatch, ckpt, model):
    # "auto" on a GPU is bf16. Tolerance: bf16 keeps 8 significant bits (relative error 2^-9 per rounding); through
    # two blocks and the head the logits stay within 3% of their largest magnitude, and the argmax agrees at most
    # positions (random weights leave some near ties).
    bf16 = load(ckpt, device="cuda", dtype="auto").model
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    ids = torch.tensor([TOK.encode(PROMPT * 3)[:48]])
    with torch.no_grad():
        expected = model(ids)[0][0]
        got = bf16(ids.cuda())[0][0].float().cpu()
    assert (got - expected).abs().max() <= 0.03 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
    code, out, err = cli(
        capsys, monkeypatch, "generate", PROMPT, "-c", ckpt, "--greedy", "-n", 6, "--ignore-eos",
        "--device", "cuda",
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith(PROMPT) and len(TOK.encode(out)) == len(TOK.encode(PROMPT)) + 6


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_int8_is_refused_in_one_line(capsys, monkeypatch, ckpt):
    code, out, err = cli(
        capsys, monkeypatch, "generate", "hi", "-c", ckpt, "--quantize", "int8", "--device", "cuda"
    )
    assert code == 2 and out == "" and err.count("\n") == 1 and "--quantize int8 is for CPU decoding" in err


def test_threads_fixes_the_native_step_thread_count(capsys, monkeypatch, ckpt, model):
    """`--threads 1` runs every step on one thread (no choosing), with the same greedy text."""
    import gptmini.native as native

    monkeypatch.setattr(native, "_fixed_threads", None)
    before = torch.get_num_threads()
    args = ["generate", "To be", "-c", ckpt, "-n", "8", "--greedy", "--device", "cpu"]
    try:
        _, plain, _ = main_in_process(capsys, *args)
        code, fixed, _ = main_in_process(capsys, *args, "--threads", "1")
        assert code == 0 and fixed == plain
        assert native._fixed_threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
