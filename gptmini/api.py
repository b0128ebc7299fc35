"""The Python API the CLI is built on: `lm = gptmini.load(path)`, then `lm.generate(...)` or `lm.stream(...)`."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from gptmini.checkpoint import load_checkpoint
from gptmini.config import GPTConfig, SamplingConfig
from gptmini.devices import resolve_device, resolve_dtype
from gptmini.errors import UserError
from gptmini.generation import GenerationStats, generate_texts, stream_text
from gptmini.model import GPT
from gptmini.quantize import check_quantize, prepare_for_decoding
from gptmini.tokenizer import Tokenizer

DEFAULT_CHECKPOINT = Path("checkpoints/default")


def default_checkpoint() -> Path:
    """`checkpoints/default` of the current directory, else the one beside the installed package."""
    if DEFAULT_CHECKPOINT.exists():
        return DEFAULT_CHECKPOINT
    return Path(__file__).resolve().parent.parent / DEFAULT_CHECKPOINT


class LM:
    """A loaded model with its tokenizer: text in, text out."""

    def __init__(
        self, model: GPT, tokenizer: Tokenizer, info: dict[str, Any] | None = None, *, compile: bool = False
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info = info or {}
        self.compile = compile  # decode steps run through a compiled, static-shape graph

    @property
    def config(self) -> GPTConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt ids; an empty prompt starts from <|endoftext|>, as GPT-2's unconditional samples do.

        A prompt longer than the context length warns here; generation then keeps its last `block_size` tokens.
        """
        ids = self.tokenizer.encode(prompt) or [self.tokenizer.eot_id]
        if len(ids) > self.config.block_size:
            warnings.warn(
                f"prompt has {len(ids)} tokens; keeping the last {self.config.block_size} (the context length)",
                stacklevel=3,
            )
        return ids

    def stream(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = 200,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        use_cache: bool = True,
        stats: GenerationStats | None = None,
    ) -> Iterator[str]:
        """Yield the completion (not the prompt) piece by piece as it is generated."""
        sampling = _sampling(temperature, top_k, top_p, min_p, repetition_penalty, seed, stop)
        _check_max_new_tokens(max_new_tokens)
        stats = stats if stats is not None else GenerationStats()
        ids = self.encode_prompt(prompt)
        yield from stream_text(
            self.model,
            self.tokenizer,
            ids,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            ignore_eos=ignore_eos,
            use_cache=use_cache,
            compile=self.compile,
            stats=stats,
        )

    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = 200,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        use_cache: bool = True,
        num_samples: int | None = None,
        stats: GenerationStats | None = None,
    ) -> str | list[str]:
        """The completion as one string, or a list of `num_samples` completions drawn from one prefill."""
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
            use_cache=use_cache,
            stats=stats,
        )
        if num_samples is None:
            return "".join(self.stream(prompt, **kwargs))
        if num_samples < 1:
            raise UserError(f"num-samples must be >= 1, got {num_samples}")
        sampling = _sampling(temperature, top_k, top_p, min_p, repetition_penalty, seed, stop)
        _check_max_new_tokens(max_new_tokens)
        return generate_texts(
            self.model,
            self.tokenizer,
            self.encode_prompt(prompt),
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            num_samples=num_samples,
            ignore_eos=ignore_eos,
            use_cache=use_cache,
            compile=self.compile,
            stats=stats,
        )


def _sampling(
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    min_p: float | None,
    repetition_penalty: float,
    seed: int | None,
    stop: Sequence[str],
) -> SamplingConfig:
    cfg = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty, seed, list(stop))
    cfg.validate()
    return cfg


def _check_max_new_tokens(n: int) -> None:
    if n < 0:
        raise UserError(f"max-new-tokens must be >= 0, got {n}")


def load(
    path: str | Path | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    threads: int | None = None,
    quantize: str | None = None,
    compile: bool = False,
) -> LM:
    """Load a gptmini checkpoint directory or a Hugging Face GPT-2 directory, ready to generate.

    `quantize="int8"` stores the linear layers and LM head as int8 (CPU only, see `gptmini.quantize`); bf16 on a
    CPU gets prepacked oneDNN linears; `compile=True` compiles the one-token decode step on first use.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    path = Path(path) if path is not None else default_checkpoint()
    if path == default_checkpoint() and not path.exists():
        raise UserError(
            f"no default checkpoint at {path}; train one with `gptmini train FILE` or pass -c DIR"
        )
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    quantize = check_quantize(quantize, dev)
    model, info = load_checkpoint(path, device=dev, dtype=torch_dtype)
    prepare_for_decoding(model, quantize=quantize, compile=compile)
    return LM(model, Tokenizer(model.config.vocabulary), info, compile=compile)
