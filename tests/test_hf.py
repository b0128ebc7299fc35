import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_gpt2, random_gpt

from gptmini.checkpoint import save_checkpoint
from gptmini.errors import UserError
from gptmini.hf import export_hf
from gptmini.loading import load_checkpoint
from gptmini.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

PROMPTS = ["ChatGPT is", "To be, or not to be", "The quick brown fox jumps over"]


def hf_greedy(hf, ids, n):
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids], device=hf.device),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=50256,
        )
    return out[0, len(ids) :].tolist()


def test_import_gives_transformers_logits(hf_dir):
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    model, info = load_checkpoint(hf_dir)
    assert info["format"] == "huggingface-gpt2"
    tok = Tokenizer()
    batch = torch.tensor([tok.encode(p)[:4] for p in PROMPTS])
    with torch.no_grad():
        torch.testing.assert_close(model(batch)[0], hf(batch).logits, atol=1e-4, rtol=0)


def test_pytorch_model_bin_and_unprefixed_keys(tmp_path):
    hf = hf_gpt2(n_layer=2, n_head=2, n_embd=32, std=0.2)
    # As `gpt2` is published: a .bin whose keys lack `transformer.` and carry the causal-mask buffers.
    directory = tmp_path / "bin"
    directory.mkdir()
    hf.config.save_pretrained(directory)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state.update({f"h.{i}.attn.bias": torch.ones(1, 1, 64, 64) for i in range(2)})
    torch.save(state, directory / "pytorch_model.bin")
    model, _ = load_checkpoint(directory)
    idx = torch.randint(0, 50257, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)


def greedy_cli_matches_transformers(hf_dir, device: str) -> None:
    """`gptmini generate --greedy` on `device` in fp32 prints transformers' fp32 greedy text on that device."""
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval().to(device)
    tok = Tokenizer()
    for prompt in PROMPTS:
        expected = tok.decode(hf_greedy(hf, tok.encode(prompt), 32))
        out = subprocess.run(
            [sys.executable, "-m", "gptmini", "generate", prompt, "-c", str(hf_dir), "--greedy"]
            + ["--max-new-tokens", "32", "--ignore-eos", "--device", device, "--dtype", "float32"],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        assert out.stdout == prompt + expected + "\n"


def test_greedy_cli_matches_transformers(hf_dir):
    greedy_cli_matches_transformers(hf_dir, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_greedy_cli_on_cuda_matches_transformers_on_cuda(hf_dir):
    greedy_cli_matches_transformers(hf_dir, "cuda")


def test_export_round_trips_through_transformers(tmp_path):
    model = random_gpt(std=0.2, n_layer=3, n_head=2, n_embd=32)
    export_hf(model, tmp_path / "out")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides", [dict(pos_embedding="sinusoidal"), dict(bias=False)])
def test_export_of_non_gpt2_variants_keeps_the_function(tmp_path, overrides):
    model = random_gpt(std=0.2, **overrides)
    export_hf(model, tmp_path / "out")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, 50257, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-5, rtol=0)


def export_cli(checkpoint: Path, out: Path, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "gptmini", "export-hf", str(checkpoint), str(out), *args],
        check=True,
        capture_output=True,
        timeout=120,
    )


def assert_transformers_logits(directory: Path, model, atol: float = 1e-5) -> None:
    """transformers' own GPT-2, loaded from `directory`, computes `model`'s logits (not gptmini's importer)."""
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory).eval().float()
    idx = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=atol, rtol=0)


def test_export_cli_writes_what_transformers_loads(tmp_path):
    model = random_gpt(std=0.2)
    save_checkpoint(model, tmp_path / "ckpt")
    export_cli(tmp_path / "ckpt", tmp_path / "hf")
    assert_transformers_logits(tmp_path / "hf", model)


def test_export_cli_of_a_bf16_best_dir_from_training(corpus, tmp_path, monkeypatch, capsys):
    """The README's recipe: `train --vocab gpt2 --save-dtype bfloat16`, then `export-hf RUN/best` (as fp32 and as
    bf16 weights). transformers' logits are those of the bf16 weights read straight from best/'s safetensors."""
    from safetensors.torch import load_file

    from gptmini.cli import main

    monkeypatch.setenv("GPTMINI_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    args = [
        "train",
        str(corpus),
        "--out",
        str(run),
        "--preset",
        "tiny",
        "--block-size",
        "32",
        "--max-iters",
        "2",
    ]
    args += ["--vocab", "gpt2", "--save-dtype", "bfloat16", "--device", "cpu", "--dtype", "float32"]
    try:
        main(args)
    except SystemExit as e:
        pytest.fail(f"train exited {e.code}: {capsys.readouterr().err}")
    stored = load_file(run / "best" / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    # The reference: a GPT of best/'s config holding exactly those bf16 values, as fp32.
    reference = random_gpt(n_layer=2, n_head=2, n_embd=64, block_size=32)
    with torch.no_grad():
        for name, param in reference.state_dict().items():
            if name != "lm_head.weight":  # tied to the token embedding
                param.copy_(stored[name].float())
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"hf-{dtype}"
        export_cli(run / "best", out, "--dtype", dtype)
        assert_transformers_logits(out, reference)


def gptmini_cli(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptmini", *args], capture_output=True, text=True, input=input, timeout=120
    )


def test_eval_info_and_chat_take_a_hugging_face_directory(hf_dir, tmp_path):
    """Every -c takes a Hugging Face GPT-2 directory: eval's figures, info's counts and chat's reply are those of
    transformers' model loaded from it."""
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    tok = Tokenizer()
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 8
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    ids = tok.encode(text)

    # eval: cross-entropy of transformers' logits over non-overlapping 128-token windows (its context)
    done = gptmini_cli("eval", str(tmp_path / "t.txt"), "-c", str(hf_dir), "--json", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    nats = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 128):
            x = torch.tensor([ids[start : start + 128]])
            y = torch.tensor([ids[start + 1 : start + 129]])
            nats += F.cross_entropy(hf(x[:, : y.shape[1]]).logits[0].double(), y[0], reduction="sum").item()
    n_bytes = len(tok.decode(ids[1:]).encode("utf-8"))
    assert got["tokens"] == len(ids) - 1 and got["bytes"] == n_bytes
    assert got["loss"] == pytest.approx(nats / (len(ids) - 1), rel=1e-5)
    assert got["bpb"] == pytest.approx(nats / (n_bytes * math.log(2)), rel=1e-5)

    # info: transformers' parameter count (the tied head counted once) and the config it read
    done = gptmini_cli("info", "-c", str(hf_dir), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["parameters"]["total"] == hf.num_parameters()
    assert report["checkpoint"]["format"] == "huggingface-gpt2"
    cfg = report["config"]
    assert (cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["block_size"]) == (3, 4, 64, 128)

    # chat (a base model: the plain template): transformers' greedy continuation of the same prompt, cut at the
    # next "\nUser:" turn or <|endoftext|>
    done = gptmini_cli("chat", "-c", str(hf_dir), "-t", "0", "-n", "12", "--device", "cpu", input="hi\n")
    assert done.returncode == 0, done.stderr
    prompt = tok.encode("User: hi\nAssistant:")
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=50256, eos_token_id=50256
        )
    reply = tok.decode([t for t in out[0, len(prompt) :].tolist() if t != 50256]).split("\nUser:")[0]
    assert done.stdout == reply.lstrip() + "\n"


def test_unsupported_hf_config(tmp_path):
    hf = hf_gpt2()
    hf.config.activation_function = "relu"
    hf.save_pretrained(tmp_path / "relu")
    with pytest.raises(UserError, match="activation"):
        load_checkpoint(tmp_path / "relu")
