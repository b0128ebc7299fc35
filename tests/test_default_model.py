"""The shipped models: they load and answer from a fresh clone, and their cards tell the truth."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "checkpoints" / "default"
DEFAULT_CHAT = ROOT / "checkpoints" / "default-chat"


def card_bits_per_byte(card: Path) -> float:
    """The bold bits-per-byte figure of a card's held-out quality table."""
    match = re.search(
        r"\|\s*[\d.]+\s*\|\s*[\d.]+\s*\|\s*\*\*([\d.]+)\*\*\s*\|", card.read_text(encoding="utf-8")
    )
    assert match, f"{card} has no held-out quality row"
    return float(match.group(1))


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptmini", *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(not DEFAULT.exists(), reason="no shipped default model")
def test_generate_without_a_checkpoint_uses_the_default_model():
    out = run_cli("generate", "ChatGPT is", "-n", "20", "--seed", "1", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ChatGPT is") and len(out.stdout) > len("ChatGPT is") + 10


@pytest.mark.skipif(not DEFAULT.exists(), reason="no shipped default model")
def test_default_card_bits_per_byte_is_reproduced_by_eval():
    from gptmini.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(DEFAULT, [ROOT / "data" / "shakespeare.txt"], split="val", device="cpu")
    assert round(result.bpb, 4) == card_bits_per_byte(DEFAULT / "MODEL.md")


@pytest.mark.skipif(not DEFAULT_CHAT.exists(), reason="no shipped chat model")
def test_chat_without_a_checkpoint_uses_the_chat_model():
    out = run_cli(
        "chat",
        "-t",
        "0",
        "-n",
        "20",
        "--device",
        "cpu",
        stdin="What news from the court?\nAnd then?\n/stats\n",
    )
    assert out.returncode == 0, out.stderr
    assert "template: tokens" in out.stderr  # /stats: the fine-tuned chat model, with its chat tokens
    assert out.stdout.strip()
