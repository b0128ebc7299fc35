"""Checkpoints: a directory holding `config.json`, `model.safetensors` and, for training runs, `train_state.pt`.

Nothing in a checkpoint is ever unpickled: weights are safetensors and the training state loads with
`weights_only=True`. Every file is written atomically (temp file in the same directory, fsync, `os.replace`), so a
run killed while saving leaves the previous checkpoint whole. Every problem on load is a one-line `UserError`.
A directory of either kind gptmini reads (this format, or Hugging Face's) loads through `gptmini.loading`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save as save_safetensors_bytes

from gptmini import __version__
from gptmini.config import GPTConfig
from gptmini.errors import UserError
from gptmini.model import GPT

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAIN_STATE_FILE = "train_state.pt"
FORMAT = "gptmini"
TIED_KEY = "lm_head.weight"  # the LM head shares the token embedding; stored once


# ---- atomic files ---------------------------------------------------------------------------------------------


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` so that readers see either the old file or the complete new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide a run from a teammate or a service user
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)  # reading it means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on this platform (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- saving ---------------------------------------------------------------------------------------------------


def unwrap(model: torch.nn.Module) -> GPT:
    """The plain GPT inside DDP/FSDP wrappers or `torch.compile`, so saved names never carry `_orig_mod.`."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            return model


def weights_for_saving(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    state = unwrap(model).state_dict()
    state.pop(TIED_KEY, None)
    return {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}


def save_checkpoint(
    model: torch.nn.Module,
    directory: str | Path,
    *,
    save_dtype: torch.dtype | None = None,
    train_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Save weights (optionally cast to bf16/fp16 to halve the size), config and training state."""
    directory = Path(directory)
    gpt = unwrap(model)
    tensors = weights_for_saving(gpt, save_dtype)
    weights_dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    atomic_write_bytes(directory / WEIGHTS_FILE, save_safetensors_bytes(tensors, metadata={"format": "pt"}))
    if train_state is not None:
        atomic_write(directory / TRAIN_STATE_FILE, lambda f: torch.save(train_state, f))
    # The config goes last: it names the format, so a directory without it was never a finished checkpoint.
    info = {
        "format": FORMAT,
        "gptmini_version": __version__,
        "tokenizer": "gpt2",
        "weights_dtype": weights_dtype,
        "model": gpt.config.to_dict(),
        **(meta or {}),
    }
    atomic_write_json(directory / CONFIG_FILE, info)
    return directory


# ---- loading --------------------------------------------------------------------------------------------------


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path} is not valid JSON ({e}); the checkpoint is damaged, re-export or retrain it"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{path} should hold a JSON object; the checkpoint is damaged")
    return data


def check_checkpoint_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; train one with `gptmini train` or pass -c DIR")
    if not path.is_dir():
        raise UserError(f"checkpoint {path} is a file; pass the directory that holds config.json")
    return path


def read_checkpoint_info(path: str | Path) -> dict[str, Any]:
    """`config.json` of a gptmini checkpoint, validated (format, tokenizer, model config)."""
    path = check_checkpoint_dir(path)
    info = read_json(path / CONFIG_FILE, "not a gptmini checkpoint (no config.json)")
    if info.get("format") != FORMAT:
        raise UserError(f"{path / CONFIG_FILE} is not a gptmini or Hugging Face GPT-2 config")
    if info.get("tokenizer", "gpt2") != "gpt2":
        raise UserError(f"{path} uses tokenizer {info['tokenizer']!r}; gptmini only knows gpt2")
    if not isinstance(info.get("model"), dict):
        raise UserError(f"{path / CONFIG_FILE} has no model config")
    info["model_config"] = GPTConfig.from_dict(info["model"])
    return info


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        # Mapped, not read: the caller's copy into its model is then the one pass over the bytes (reading the file
        # and parsing the copy made two more, 0.4-2.5 s of a GPT-2 small's start-up on a 2-core Zen 4).
        return load_safetensors_file(path)
    except FileNotFoundError:
        raise UserError(f"{path} is missing; the checkpoint is incomplete") from None
    except (SafetensorError, ValueError, OSError) as e:
        raise UserError(
            f"{path} is truncated or corrupt ({e}); re-export or retrain the checkpoint"
        ) from None


def load_state_into(model: GPT, tensors: dict[str, torch.Tensor], source: Path) -> GPT:
    """Copy `tensors` into `model` after checking that every name and shape matches; cast to the model's dtype."""
    expected = {k: v for k, v in model.state_dict().items() if k != TIED_KEY}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - {TIED_KEY})
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' …' if len(unexpected) > 3 else ''}")
        raise UserError(f"{source} does not match its config ({'; '.join(parts)})")
    for name, ref in expected.items():
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise UserError(
                f"{source}: {name} has shape {tuple(tensors[name].shape)} but the config needs {tuple(ref.shape)} "
                "(vocabulary or size mismatch)"
            )
    with torch.no_grad():
        for name, ref in expected.items():
            ref.copy_(tensors[name])
    return model


def load_train_state(path: str | Path) -> dict[str, Any]:
    """The optimizer/schedule/RNG/sampler state of a training run, loaded without unpickling code."""
    file = Path(path) / TRAIN_STATE_FILE
    if not file.exists():
        raise UserError(f"{path} has no {TRAIN_STATE_FILE}: nothing to resume (start without --resume)")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise UserError(f"{file} is truncated or not a gptmini training state ({type(e).__name__})") from None
