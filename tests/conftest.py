"""Shared fixtures: small random models, and Hugging Face GPT-2s built from a config (no download).

Also the device guard: a test that means the CPU must say so (`--device cpu`, `device="cpu"`), so the suite passes
the same on a machine with a GPU. Tests marked `cuda` are the GPU variants and are exempt.
"""

from __future__ import annotations

import inspect
import io
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

import gptmini
import gptmini.checkpoint
import gptmini.devices
from gptmini.config import GPTConfig
from gptmini.model import GPT

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tmp_token_cache(tmp_path_factory):
    """Token caches go to a temp dir for the whole module, its module-scoped runs included (never ~/.cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTMINI_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def main_in_process(capsys, *args, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    """`gptmini ARGS` in this process: (exit code, stdout, stderr); `stdin` needs `monkeypatch`."""
    from gptmini.cli import main

    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def random_gpt(seed: int = 0, std: float | None = None, **overrides) -> GPT:
    """A small GPT with random weights; a large `std` makes greedy text non-degenerate."""
    torch.manual_seed(seed)
    config = GPTConfig(**{**dict(n_layer=2, n_head=4, n_embd=64, block_size=64), **overrides})
    model = GPT(config).eval()
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, std)
    return model


def hf_gpt2(
    n_layer: int = 2, n_head: int = 4, n_embd: int = 64, n_positions: int = 64, std: float = 0.2, seed=0
):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        n_positions=n_positions,
        vocab_size=50257,
        initializer_range=std,
    )
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """A saved Hugging Face GPT-2 directory (3 layers, 4 heads, 64 wide, 128 positions)."""
    model = hf_gpt2(n_layer=3, n_head=4, n_embd=64, n_positions=128, std=0.3)
    path = tmp_path_factory.mktemp("hf") / "gpt2-random"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """60 kB of the shipped Shakespeare."""
    path = tmp_path_factory.mktemp("corpus") / "shake.txt"
    text = (ROOT / "data" / "shakespeare.txt").read_bytes()[:60_000].decode("utf-8", errors="ignore")
    path.write_text(text, encoding="utf-8")
    return path


# ---- the device guard -----------------------------------------------------------------------------------------
#
# On a machine with a GPU, "auto" puts a model on CUDA in bf16: a test that means the CPU but leaves the device to
# "auto" passes here only because this machine has none. The guard makes that dependency visible on any machine:
# every `gptmini` process a test starts (subprocess.Popen/run, torchrun, a pseudo-terminal through
# `check_cpu_argv`) must pass an explicit --device other than auto to each command that takes one, and every
# in-process device choice (gptmini.load, train, evaluate_checkpoint, chat: all go through
# gptmini.devices.resolve_device) must be explicit. A test that breaks the rule fails with the offending call.

_current: dict[str, object] = {"item": None, "violations": []}
_NO_MODEL_FLAGS = {"--help", "-h", "--version"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA GPU (skipped without one; exempt from the CPU guard)"
    )


def _guarded() -> bool:
    item = _current["item"]
    return item is not None and item.get_closest_marker("cuda") is None


def _violation(what: str) -> None:
    if _guarded():
        import traceback

        tests_dir = str(Path(__file__).parent)
        frames = [
            f
            for f in traceback.extract_stack()
            if f.filename.startswith(tests_dir) and f.filename != __file__
        ]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}: " if frames else ""
        _current["violations"].append(where + what)


def _commands_with_device() -> set[str]:
    from gptmini.cli import app

    return {
        c.name or c.callback.__name__.replace("_", "-")
        for c in app.registered_commands
        if "device" in inspect.signature(c.callback).parameters
    }


def gptmini_argv(argv: Sequence[str]) -> list[str] | None:
    """The `gptmini` command line inside a process's argv (python -m gptmini, the console script, torchrun's
    program), or None when the process does not run gptmini."""
    argv = [str(a) for a in argv]
    for i in range(len(argv) - 1):
        if argv[i] == "-m" and argv[i + 1] == "gptmini":
            return argv[i + 2 :]
    if argv and os.path.basename(argv[0]) == "gptmini":
        return argv[1:]
    launcher = any(os.path.basename(a) == "torchrun" for a in argv[:1]) or "torch.distributed.run" in argv
    if launcher:  # torchrun running a script that calls gptmini's main with the arguments after it
        scripts = [i for i, a in enumerate(argv) if a.endswith(".py") and i > 0]
        if scripts:
            return argv[scripts[0] + 1 :]
    return None


def check_cpu_argv(argv: Sequence[str] | str) -> None:
    """Record a violation if `argv` runs a gptmini command that loads a model without an explicit --device."""
    if not _guarded():
        return
    cli = gptmini_argv(shlex.split(argv) if isinstance(argv, str) else argv)
    if cli is None or _NO_MODEL_FLAGS & set(cli):
        return
    command = next((a for a in cli if not a.startswith("-")), None)
    if command not in _commands_with_device():
        return
    device = None
    for i, a in enumerate(cli):
        if a == "--device" and i + 1 < len(cli):
            device = cli[i + 1]
        elif a.startswith("--device="):
            device = a.split("=", 1)[1]
    if device is None or device.split(":")[0] == "auto":
        _violation(f"`gptmini {' '.join(cli)}` leaves the device to auto: pass --device cpu")


_real_popen_init = subprocess.Popen.__init__


def _checked_popen_init(self, args, *pargs, **kwargs):
    check_cpu_argv(args)  # only looks at the command line: the process starts and behaves as it would anyway
    _real_popen_init(self, args, *pargs, **kwargs)


subprocess.Popen.__init__ = _checked_popen_init

_real_resolve_device = gptmini.devices.resolve_device


def _checked_resolve_device(name: str = "auto") -> torch.device:
    if name.split(":")[0] == "auto":
        _violation("a model was placed with device='auto': pass device='cpu' (or --device cpu)")
    return _real_resolve_device(name)


def _install_device_check() -> None:
    """Point every gptmini module's `resolve_device` at the checking one (modules imported later take it from
    gptmini.devices)."""
    import sys

    for name, module in list(sys.modules.items()):
        if (name == "gptmini" or name.startswith("gptmini.")) and (
            getattr(module, "resolve_device", None) is _real_resolve_device
        ):
            module.resolve_device = _checked_resolve_device


_install_device_check()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _install_device_check()  # modules that imported resolve_device before this conftest did
    _current["item"], _current["violations"] = item, []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        violations = list(dict.fromkeys(_current["violations"]))
        if violations and report.passed:
            report.outcome = "failed"
            report.longrepr = (
                "device guard: this CPU test depends on the machine having no GPU:\n"
                + "\n".join(f"  - {v}" for v in violations)
            )


def pytest_runtest_teardown(item: pytest.Item) -> None:
    _current["item"] = None


@pytest.fixture
def always_draft(monkeypatch):
    """Prompt lookup drafts at every step, never pausing: a pass's worth is timed on the machine, so without this
    a test that needs kept drafts would depend on how fast its passes happened to run."""
    from gptmini import lookup

    monkeypatch.setattr(lookup, "MAX_PAUSE", 0)


# ---- the shipped models, and a random one with GPT-2's vocabulary (the HTTP and structured-output tests) ----


@pytest.fixture(scope="module")
def base_lm():
    return gptmini.load(ROOT / "checkpoints" / "default", device="cpu")


@pytest.fixture(scope="module")
def chat_lm():
    return gptmini.load(ROOT / "checkpoints" / "default-chat", device="cpu")


@pytest.fixture(scope="module")
def gpt2_lm(tmp_path_factory):
    """A random model with GPT-2's whole vocabulary: its logits rows are padded past 50,257 (to a multiple of 64)."""
    path = tmp_path_factory.mktemp("gpt2vocab") / "ckpt"
    gptmini.checkpoint.save_checkpoint(
        random_gpt(std=0.2, n_layer=1, n_embd=32, n_head=2, block_size=64, vocab_size=50257), path
    )
    lm = gptmini.load(path, device="cpu")
    assert lm.config.padded_vocab_size > lm.config.vocab_size == 50257
    return lm
