import json
import subprocess
import sys

import pytest
from conftest import random_gpt

from gptmini.checkpoint import save_checkpoint
from gptmini.config import GPTConfig
from gptmini.model import GPT


def run(*args, input=None):
    return subprocess.run(
        [sys.executable, "-m", "gptmini", *args], capture_output=True, text=True, input=input, timeout=300
    )


def test_help_lists_commands_without_importing_torch():
    code = (
        "import sys\nfrom gptmini.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    for command in ("train", "generate", "chat", "eval", "info", "export-hf"):
        assert command in out
    assert out.strip().endswith("NO-TORCH")


def test_version():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.startswith("gptmini ")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(random_gpt(std=0.2), path)
    return path


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "hi", "-c", "/no/such/dir", "--device", "cpu"], "does not exist"),
        (["generate", "hi", "--temperature", "abc", "--device", "cpu"], "--temperature"),
        (["generate", "hi", "--bogus", "--device", "cpu"], "No such option"),
        (
            ["generate", "hi", "-c", "CKPT", "--temperature", "-1", "--device", "cpu"],
            "temperature must be >= 0",
        ),
        (["generate", "hi", "-c", "CKPT", "--top-k", "0", "--device", "cpu"], "top-k"),
        (["generate", "hi", "-c", "CKPT", "--top-p", "1.5", "--device", "cpu"], "top-p"),
        (["generate", "hi", "-c", "CKPT", "--device", "cuda"], None),
        (["generate", "hi", "-c", "CKPT", "--device", "tpu"], "unknown device"),
        (["generate", "hi", "-c", "CKPT", "--threads", "0", "--device", "cpu"], "--threads must be >= 1"),
        (["chat", "-c", "CKPT", "--threads", "-2", "--device", "cpu"], "--threads must be >= 1"),
        (["eval", "-c", "CKPT", "--threads", "0", "--device", "cpu"], "--threads must be >= 1"),
        (["info", "-c", "/no/such/dir"], "does not exist"),
        (["export-hf", "/no/such/dir", "/tmp/x"], "does not exist"),
    ],
)
def test_user_mistakes_are_one_line_exit_2(ckpt, args, message):
    args = [str(ckpt) if a == "CKPT" else a for a in args]
    if "cuda" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        message = "no CUDA GPU"
    out = run(*args)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ")
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hello": 1}))
    out = run("generate", "hi", "-c", str(tmp_path), "--device", "cpu")
    assert out.returncode == 2 and "not a gptmini" in out.stderr


def test_info_gpt2_small(tmp_path):
    # Only the config is needed: info counts on a weightless model.
    with __import__("torch").device("meta"):
        model = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024))
    from gptmini.checkpoint import CONFIG_FILE, atomic_write_json

    atomic_write_json(
        tmp_path / CONFIG_FILE, {"format": "gptmini", "tokenizer": "gpt2", "model": model.config.to_dict()}
    )
    out = run("info", "-c", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "124,439,808" in out.stdout
    data = json.loads(run("info", "-c", str(tmp_path), "--json").stdout)
    assert data["parameters"]["total"] == 124_439_808
    assert data["cost"]["kv_cache_bytes_per_token"] == 2 * 12 * 768 * 4
    forward = forward_flops_by_hand(n_layer=12, n_embd=768, block_size=1024, vocab_size=50257)
    assert forward == 284_978_688
    assert data["cost"]["forward_flops_per_token_at_full_context"] == forward
    assert data["cost"]["training_flops_per_token"] == 3 * forward  # backward: twice the forward's matmuls
    assert f"{forward:,}" in out.stdout


def forward_flops_by_hand(
    *, n_layer: int, n_embd: int, block_size: int, vocab_size: int, bias: bool = True
) -> int:
    """Matmul FLOPs of one token's forward pass at full context, counted layer by layer: 2 per weight it multiplies
    through (biases counted like weights, as in the 2·N convention), the LM head, and attention's scores QKᵀ and
    weighted sum over `block_size` keys (2·2·T·C per layer). Embedding lookups cost nothing."""
    c, b = n_embd, int(bias)
    qkv, attn_proj = c * 3 * c + b * 3 * c, c * c + b * c
    mlp_up, mlp_down = c * 4 * c + b * 4 * c, 4 * c * c + b * c
    weights = n_layer * (qkv + attn_proj + mlp_up + mlp_down) + c * vocab_size
    return 2 * weights + n_layer * 2 * 2 * block_size * c


def test_generate_reads_stdin_and_prints_prompt_then_completion(ckpt):
    import gptmini

    out = run("generate", "-c", str(ckpt), "--greedy", "-n", "5", "--device", "cpu", input="Once upon")
    assert out.returncode == 0, out.stderr
    expected = gptmini.load(ckpt, device="cpu").generate("Once upon", max_new_tokens=5, temperature=0)
    assert out.stdout == "Once upon" + expected + "\n" and expected


def test_generate_stats_go_to_stderr(ckpt):
    out = run(
        "generate", "hi", "-c", str(ckpt), "--greedy", "-n", "5", "--stats", "--ignore-eos", "--device", "cpu"
    )
    assert out.returncode == 0
    assert "tokens/s" in out.stderr and "tokens/s" not in out.stdout
