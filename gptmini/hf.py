"""Hugging Face GPT-2 directories in and out, without importing transformers.

A Hugging Face GPT-2 stores its linear layers as `Conv1D` with weights shaped `[in, out]`; gptmini uses
`nn.Linear` (`[out, in]`), so those four matrices per block are transposed on the way in and out. The LM head is
tied to the token embedding in both, and the causal-mask buffers (`attn.bias`, `attn.masked_bias`) that older
checkpoints carry are not weights at all.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors_bytes

from gptmini.checkpoint import (
    CONFIG_FILE,
    TIED_KEY,
    atomic_write_bytes,
    atomic_write_json,
    load_state_into,
    read_json,
    read_safetensors,
    unwrap,
)
from gptmini.config import GPTConfig
from gptmini.errors import UserError
from gptmini.model import GPT

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
NOT_WEIGHTS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers, not weights


def is_hf_gpt2_dir(path: str | Path) -> bool:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        return False
    try:
        return read_json(file, "").get("model_type") == "gpt2"
    except UserError:
        return False


def config_from_hf(hf: dict[str, Any], source: Path) -> GPTConfig:
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(
            f"{source}: activation {activation!r} is not supported (gptmini's GPT-2 uses tanh-GELU)"
        )
    n_embd = hf.get("n_embd", 768)
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise UserError(f"{source}: n_inner={hf['n_inner']} is not supported (gptmini's MLP is 4 × n_embd)")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights", True) is False:
        raise UserError(f"{source}: non-standard attention scaling is not supported")
    return GPTConfig(
        vocab_size=hf.get("vocab_size", 50257),
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
        dropout=0.0,
        bias=True,
        pos_embedding="learned",
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )


def _read_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    legacy = path / "pytorch_model.bin"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        shards = sorted(set(read_json(index, "").get("weight_map", {}).values()))
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(read_safetensors(path / shard))
        return tensors
    if legacy.exists():
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{legacy} is truncated or not a plain state dict ({type(e).__name__})") from None
    raise UserError(f"{path} has a GPT-2 config.json but no model.safetensors or pytorch_model.bin")


def hf_to_gptmini(tensors: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        key = name.removeprefix("transformer.")
        if NOT_WEIGHTS.match(key):
            continue
        if key == TIED_KEY:
            wte = tensors.get("transformer.wte.weight", tensors.get("wte.weight"))
            if wte is not None and not torch.equal(tensor, wte):
                raise UserError("this GPT-2 has an untied LM head; gptmini ties it to the token embedding")
            continue
        if key.endswith(CONV1D):
            tensor = tensor.t()
        if key == "wte.weight":
            # Pad the embedding with zero rows up to the aligned size; padding ids are never scored.
            padded = tensor.new_zeros(config.padded_vocab_size, tensor.shape[1])
            padded[: tensor.shape[0]] = tensor
            tensor = padded
        # Conv1D weights stay transposed views: the copy into the model transposes them in its one pass.
        out["transformer." + key] = tensor
    return out


def load_hf_gpt2(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[GPT, dict[str, Any]]:
    path = Path(path)
    hf_config = read_json(path / CONFIG_FILE, "")
    config = config_from_hf(hf_config, path)
    tensors = hf_to_gptmini(_read_hf_tensors(path), config)
    model = GPT.skeleton(config, device=device, dtype=dtype)
    load_state_into(model, tensors, path)
    info = {
        "format": "huggingface-gpt2",
        "tokenizer": "gpt2",
        "model": config.to_dict(),
        "model_config": config,
    }
    return model.eval(), info


def export_hf(model: torch.nn.Module, out_dir: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write `config.json` + `model.safetensors` that `GPT2LMHeadModel.from_pretrained(out_dir)` loads."""
    gpt = unwrap(model)
    config = gpt.config
    if config.arch != "gpt2":
        raise UserError(
            f"this model is --arch {config.arch} (rotary positions, QK-norm, ReLU²), which GPT-2's layout cannot "
            "hold; only --arch gpt2 models export to Hugging Face"
        )
    if config.vocabulary is not None:
        raise UserError(
            "this model uses a compact vocabulary (the tokens of its training text), which GPT-2's numbering "
            "cannot express; train with --vocab gpt2 for a model Hugging Face can load"
        )
    out_dir = Path(out_dir)
    state = gpt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name == TIED_KEY:
            continue
        key = name.removeprefix("transformer.")
        if key.endswith(CONV1D):
            tensor = tensor.t()
        if key == "wte.weight":
            tensor = tensor[: config.vocab_size]  # drop the padding rows
        tensors["transformer." + key] = tensor
    if (
        config.pos_embedding == "sinusoidal"
    ):  # GPT-2 only has learned positions: export the fixed table as one
        tensors["transformer.wpe.weight"] = gpt.pos_table
    if not config.bias:  # GPT-2 always has biases: zeros are the same function
        for name, module in gpt.named_modules():
            key = name.removeprefix("transformer.")
            if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)) and name != "lm_head":
                tensors["transformer." + key + ".bias"] = torch.zeros(module.weight.shape[0])
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in tensors.items()}
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.attention_dropout_p,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "torch_dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
    }
    atomic_write_bytes(
        out_dir / "model.safetensors", save_safetensors_bytes(tensors, metadata={"format": "pt"})
    )
    atomic_write_json(out_dir / CONFIG_FILE, hf_config)
    return out_dir
