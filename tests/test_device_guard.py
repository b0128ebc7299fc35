"""The device guard of conftest.py: it recognises gptmini's command lines and in-process device choices."""

from __future__ import annotations

import subprocess
import sys

import conftest
import pytest
from conftest import check_cpu_argv, gptmini_argv

PY = sys.executable


@pytest.fixture
def violations():
    """Takes (and clears) what the guard recorded so far in the test body, so this test itself can pass."""
    recorded = conftest._current["violations"]

    def take() -> list[str]:
        found = list(recorded)
        recorded.clear()
        return found

    return take


@pytest.mark.parametrize(
    "argv,cli",
    [
        ([PY, "-m", "gptmini", "generate", "hi"], ["generate", "hi"]),
        (["/usr/local/bin/gptmini", "chat", "-c", "x"], ["chat", "-c", "x"]),
        ([PY, "-m", "torch.distributed.run", "--standalone", "-m", "gptmini", "train", "a"], ["train", "a"]),
        ([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "/t/patched.py", "train"], ["train"]),
        ([PY, "-c", "print(1)"], None),
        ([PY, "script.py", "train"], None),
    ],
)
def test_gptmini_command_lines_are_found(argv, cli):
    assert gptmini_argv(argv) == cli


@pytest.mark.parametrize(
    "argv,flagged",
    [
        ([PY, "-m", "gptmini", "generate", "hi", "-c", "ckpt"], True),
        ([PY, "-m", "gptmini", "generate", "hi", "--device", "auto"], True),
        ([PY, "-m", "gptmini", "train", "a.txt", "--device", "cpu"], False),
        ([PY, "-m", "gptmini", "train", "a.txt", "--device=cpu"], False),
        (
            [PY, "-m", "gptmini", "eval", "-c", "x", "--device", "cuda"],
            False,
        ),  # explicit: a choice, not "auto"
        ([PY, "-m", "gptmini", "info", "-c", "x"], False),  # info loads no weights
        ([PY, "-m", "gptmini", "generate", "--help"], False),
        (f"{PY} -m gptmini chat -c x", True),  # a shell string is read too
    ],
)
def test_command_lines_without_a_device_are_flagged(violations, argv, flagged):
    check_cpu_argv(argv)
    assert bool(violations()) == flagged


def test_popen_is_checked_and_otherwise_unchanged(violations):
    done = subprocess.run([PY, "-c", "print('ran')"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "ran\n" and not violations()
    with subprocess.Popen([PY, "-m", "gptmini", "--version"], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.communicate(timeout=60)[0].startswith("gptmini ") and proc.returncode == 0
    assert not violations()


def test_in_process_auto_is_flagged_and_explicit_cpu_is_not(violations):
    from gptmini.api import resolve_device  # the name the API imported: the checking one

    assert resolve_device("cpu").type == "cpu" and not violations()
    resolve_device("auto")
    found = violations()
    assert len(found) == 1 and "test_device_guard.py" in found[0]
