"""lm-evaluation-harness, the real third-party harness, evaluates models served by `gptmini serve` as their own
forward pass scores them: `scripts/check_lm_eval.py` (lm-eval's `local-completions` on a real server on a loopback
port, local multiple-choice, perplexity and generation tasks, every document against the model's log-softmax or
greedy recomputation), on the shipped compact-vocabulary models through the server's own tokenizer endpoints
(token-id and string prompts), and on a GPT-2-vocabulary model against lm-eval's own `hf` backend as well."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_lm_eval", ROOT / "scripts" / "check_lm_eval.py")
check = importlib.util.module_from_spec(_spec)
sys.modules["check_lm_eval"] = check
_spec.loader.exec_module(check)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def offline(one_thread):
    """No hub, no progress bars; the reference on one thread beside the server's one (a shared machine)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TQDM_DISABLE"):
            mp.setenv(name, "1")
        yield


@pytest.fixture(scope="module")
def text():
    path = check.HELD_OUT if check.HELD_OUT.exists() else check.FALLBACK_TEXT
    return path.read_text(encoding="utf-8")


def assert_agrees(comparisons: list[check.Comparison], runs: int) -> None:
    report = check.report(comparisons)
    assert not [f for c in comparisons for f in c.failures], report
    scored = [c for c in comparisons if c.compared]
    assert len(scored) == runs, report
    for c in scored:  # nothing vacuous: every task's documents were compared
        assert c.compared[check.MC_TASK] == 12 and c.compared[check.GEN_TASK] == 4, report
        assert c.compared.get(check.PPL_TASK, 0) >= 3, report


@pytest.mark.parametrize("model", ["default", "default-chat"])
def test_lm_eval_scores_a_shipped_model_as_its_forward_does(model, text):
    """Compact vocabularies: only the server's /tokenize, /detokenize and /tokenizer_info can tokenize for lm-eval
    (and lm-eval's default finds them). Prompts as token ids (batched, concurrent) and as strings."""
    comparisons = check.check_served(ROOT / "checkpoints" / model, text, modes=("remote-ids", "remote-text"))
    assert_agrees(comparisons, runs=2)


def test_lm_eval_scores_a_gpt2_as_its_own_hf_backend_does(tmp_path, text):
    """GPT-2's whole vocabulary from a Hugging Face directory with tokenizer files: the served model scored through
    the server's tokenizer (string prompts) and through the directory's (token ids), and by lm-eval's `hf` model
    (transformers) in this process, within 1e-4 of each other and of the reference."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # lm-eval's hf backend imports it
    gpt2 = check.write_random_gpt2(tmp_path / "gpt2-random")
    comparisons = check.check_served(gpt2, text, modes=("remote-text", "hf-ids"), hf_backend=True)
    assert_agrees(comparisons, runs=3)
    crossed = [c for c in comparisons if c.label.endswith(" vs hf")]
    assert len(crossed) == 2 and all(len(c.rows) == 3 for c in crossed), check.report(comparisons)
