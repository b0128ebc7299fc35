import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import random_gpt

from gptmini.checkpoint import CONFIG_FILE, TRAIN_STATE_FILE, WEIGHTS_FILE, load_train_state, save_checkpoint
from gptmini.errors import UserError
from gptmini.loading import load_checkpoint


def logits_of(model, idx):
    with torch.no_grad():
        return model(idx)[0]


def test_round_trip_exact(tmp_path):
    model = random_gpt(pos_embedding="sinusoidal", bias=False)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded, info = load_checkpoint(tmp_path / "ckpt")
    assert info["format"] == "gptmini" and info["tokenizer"] == "gpt2" and "gptmini_version" in info
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    idx = torch.randint(0, 50257, (2, 10))
    assert torch.equal(logits_of(loaded, idx), logits_of(model, idx))


def test_bf16_storage_halves_size_and_loads_to_fp32(tmp_path):
    model = random_gpt()
    save_checkpoint(model, tmp_path / "fp32")
    save_checkpoint(model, tmp_path / "bf16", save_dtype=torch.bfloat16)
    small = (tmp_path / "bf16" / WEIGHTS_FILE).stat().st_size
    big = (tmp_path / "fp32" / WEIGHTS_FILE).stat().st_size
    assert small < 0.51 * big
    loaded, info = load_checkpoint(tmp_path / "bf16", dtype=torch.float32)
    assert info["weights_dtype"] == "bfloat16"
    assert loaded.lm_head.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, atol=0.01, rtol=0.01)


def test_compiled_model_saves_plain_names(tmp_path):
    model = random_gpt()
    compiled = torch.compile(model)  # wraps without compiling until called
    save_checkpoint(compiled, tmp_path / "c")
    loaded, _ = load_checkpoint(tmp_path / "c")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_train_state_loads_without_pickle(tmp_path):
    model = random_gpt()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.tensor([[1, 2]]), torch.tensor([[2, 3]]))[1].backward()
    opt.step()
    state = {"step": 3, "optimizer": opt.state_dict(), "rng": torch.get_rng_state()}
    save_checkpoint(model, tmp_path / "t", train_state=state)
    restored = load_train_state(tmp_path / "t")
    assert restored["step"] == 3 and torch.equal(restored["rng"], state["rng"])
    # The optimizer state comes back exactly: every moment and step count, the groups' settings...
    saved = opt.state_dict()
    assert restored["optimizer"]["param_groups"] == saved["param_groups"]
    assert restored["optimizer"]["state"].keys() == saved["state"].keys()
    for index, moments in saved["state"].items():
        for name, value in moments.items():
            assert torch.equal(restored["optimizer"]["state"][index][name], value), (index, name)
    # ... and an optimizer loaded from it takes the original's next step.
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.AdamW(twin.parameters())
    twin_opt.load_state_dict(restored["optimizer"])
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        m(torch.tensor([[4, 5]]), torch.tensor([[5, 6]]))[1].backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_malicious_train_state_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "e").mkdir()
    torch.save({"x": Evil()}, tmp_path / "e" / TRAIN_STATE_FILE)
    with pytest.raises(UserError, match="not a gptmini training state"):
        load_train_state(tmp_path / "e")


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: (d / WEIGHTS_FILE).unlink(), "missing"),
        (lambda d: (d / CONFIG_FILE).unlink(), "missing"),
        (
            lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:1000]),
            "truncated or corrupt",
        ),
        (lambda d: (d / WEIGHTS_FILE).write_bytes(b"garbage" * 10), "truncated or corrupt"),
        (lambda d: (d / CONFIG_FILE).write_text("{not json"), "not valid JSON"),
        (lambda d: _edit_config(d, n_embd=128, n_head=4), "shape"),
        (lambda d: _edit_config(d, n_layer=3), "missing"),
        (lambda d: _edit_config(d, n_embd=100, n_head=3), "divisible"),
    ],
)
def test_damaged_checkpoints_fail_with_one_clear_line(tmp_path, damage, message):
    save_checkpoint(random_gpt(), tmp_path / "d")
    damage(tmp_path / "d")
    with pytest.raises(UserError, match=message) as err:
        load_checkpoint(tmp_path / "d")
    assert "\n" not in str(err.value)


def _edit_config(directory, **changes):
    info = json.loads((directory / CONFIG_FILE).read_text())
    info["model"].update(changes)
    (directory / CONFIG_FILE).write_text(json.dumps(info))


def test_missing_directory(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


KILL_WHILE_SAVING = r"""
import sys, torch, threading, os, signal
sys.path.insert(0, sys.argv[2])
from conftest import random_gpt
from gptmini import checkpoint
model = random_gpt(seed=1, n_layer=8, n_embd=256)
real_fsync = os.fsync
def die_midway(fd):
    # the temp file is fully written but not yet renamed: die here
    os.kill(os.getpid(), signal.SIGKILL)
os.fsync = die_midway
checkpoint.save_checkpoint(model, sys.argv[1])
"""


def test_kill_while_saving_keeps_previous_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    old = random_gpt(seed=0, n_layer=8, n_embd=256)
    save_checkpoint(old, directory)
    before = {p.name for p in directory.iterdir()}
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-c", KILL_WHILE_SAVING, str(directory), tests_dir], timeout=120)
    assert proc.returncode == -9
    loaded, _ = load_checkpoint(directory)
    assert torch.equal(loaded.lm_head.weight, old.lm_head.weight)
    leftovers = {p.name for p in directory.iterdir()} - before
    assert all(name.endswith(".tmp") for name in leftovers)  # only an orphaned temp file, never a torn one


def test_checkpoint_files_follow_the_umask_not_mkstemps_0600(tmp_path):
    """A run shared with a teammate or a service user must be readable: files as the umask says (022: 0644)."""
    import os

    old = os.umask(0o022)
    try:
        save_checkpoint(random_gpt(), tmp_path / "ckpt")
        modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "ckpt").iterdir()}
        os.umask(0o077)
        save_checkpoint(random_gpt(), tmp_path / "private")
        private = {p.stat().st_mode & 0o777 for p in (tmp_path / "private").iterdir()}
    finally:
        os.umask(old)
    assert set(modes.values()) == {0o644}, modes
    assert private == {0o600}
