"""Any model directory gptmini reads — its own checkpoints, or a Hugging Face GPT-2 directory — as a config or as a
model. The one place that tells the formats apart: `gptmini.checkpoint` knows gptmini's, `gptmini.hf` Hugging
Face's, and neither imports the other's reader through this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gptmini import hf
from gptmini.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_checkpoint_dir,
    load_state_into,
    read_checkpoint_info,
    read_json,
    read_safetensors,
)
from gptmini.config import GPTConfig
from gptmini.model import GPT


def read_model_config(path: str | Path) -> tuple[GPTConfig, dict[str, Any]]:
    """The model config (and checkpoint info) of a gptmini or Hugging Face GPT-2 directory, without the weights."""
    path = check_checkpoint_dir(path)
    if hf.is_hf_gpt2_dir(path):
        config = hf.config_from_hf(read_json(path / CONFIG_FILE, ""), path)
        return config, {"format": "huggingface-gpt2", "tokenizer": "gpt2", "model": config.to_dict()}
    info = read_checkpoint_info(path)
    return info["model_config"], info


def load_checkpoint(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[GPT, dict[str, Any]]:
    """A model from a gptmini checkpoint or a Hugging Face GPT-2 directory, in eval mode on `device`/`dtype`."""
    path = check_checkpoint_dir(path)
    if hf.is_hf_gpt2_dir(path):
        return hf.load_hf_gpt2(path, device=device, dtype=dtype)
    info = read_checkpoint_info(path)
    tensors = read_safetensors(path / WEIGHTS_FILE)
    model = GPT.skeleton(info["model_config"], device=device, dtype=dtype)
    load_state_into(model, tensors, path / WEIGHTS_FILE)
    return model.eval(), info
