"""The Python API the CLI is built on: `lm = gptmini.load(path)`, then `lm.generate(...)` or `lm.stream(...)`."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gptmini.config import GPTConfig, SamplingConfig
from gptmini.decoding import AttentionStep, GenerationStats
from gptmini.devices import resolve_device, resolve_dtype, set_threads
from gptmini.errors import UserError
from gptmini.generation import generate_texts, make_engine, stream_text
from gptmini.grammar import check as check_grammar
from gptmini.loading import load_checkpoint
from gptmini.lookup import check_lookup
from gptmini.model import GPT
from gptmini.quantize import check_quantize, prepare_for_decoding
from gptmini.tokenizer import Tokenizer

if TYPE_CHECKING:
    from gptmini.engine import Engine
    from gptmini.inspect import Attention, HeadScores, LogitLens

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
        self._engine: Engine | None = None  # see `engine`

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
        prompt: str | Sequence[int],
        sampling: SamplingConfig | None = None,
        *,
        max_new_tokens: int = 200,
        ignore_eos: bool = False,
        use_cache: bool = True,
        stats: GenerationStats | None = None,
        on_attention: Callable[[AttentionStep], None] | None = None,
        lookup: int = 0,
        grammar: str | None = None,
        **sampling_fields: Any,
    ) -> Iterator[str]:
        """Yield the completion (not the prompt: text, or token ids as they are) piece by piece as it is generated.

        Sampling is one `SamplingConfig`; its fields may also be given by name (`temperature=0`, `top_k=50`,
        `seed=1`, `stop=["."]`, …), which override the config's. `on_attention` receives what each step attended
        to (e.g. a `gptmini.inspect.GenerationAttention`). `lookup=N` turns on prompt-lookup decoding: up to N
        tokens copied from earlier in the text checked per forward pass (the same greedy text, the same sampling
        distribution; faster where the text repeats itself). `grammar` (structured output: e.g.
        `gptmini.grammar.json_schema(schema)`) keeps every token inside it, so the text parses; the text ends when
        the grammar is complete. A bad value raises `ValueError` (an unusable grammar: `UserError`).
        """
        sampling = sampling_config(sampling, **sampling_fields)
        _check_max_new_tokens(max_new_tokens)
        check_lookup(lookup)
        if grammar is not None:
            check_grammar(grammar, self.tokenizer, self.config.vocab_size)
        ids = self.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        yield from stream_text(
            self.model,
            self.tokenizer,
            ids,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            ignore_eos=ignore_eos,
            stats=stats,
            on_attention=on_attention,
            lookup=lookup,
            grammar=grammar,
            engine=self.engine(1, use_cache=use_cache, capture=on_attention is not None),
        )

    def generate(
        self,
        prompt: str,
        sampling: SamplingConfig | None = None,
        *,
        max_new_tokens: int = 200,
        ignore_eos: bool = False,
        use_cache: bool = True,
        num_samples: int | None = None,
        stats: GenerationStats | None = None,
        on_attention: Callable[[AttentionStep], None] | None = None,
        lookup: int = 0,
        grammar: str | None = None,
        **sampling_fields: Any,
    ) -> str | list[str]:
        """The completion as one string, or a list of `num_samples` completions drawn from one prefill
        (`lookup`, `grammar`: as for `stream`; `lookup` one sample only)."""
        sampling = sampling_config(sampling, **sampling_fields)
        options = dict(
            max_new_tokens=max_new_tokens,
            ignore_eos=ignore_eos,
            stats=stats,
            on_attention=on_attention,
            lookup=lookup,
            grammar=grammar,
        )
        if grammar is not None:
            check_grammar(grammar, self.tokenizer, self.config.vocab_size)
        if num_samples is None:
            return "".join(self.stream(prompt, sampling, use_cache=use_cache, **options))
        if num_samples < 1:
            raise UserError(f"num-samples must be >= 1, got {num_samples}")
        _check_max_new_tokens(max_new_tokens)
        engine = self.engine(num_samples, use_cache=use_cache, capture=on_attention is not None)
        return generate_texts(
            self.model,
            self.tokenizer,
            self.encode_prompt(prompt),
            sampling=sampling,
            num_samples=num_samples,
            engine=engine,
            **options,
        )

    def engine(self, rows: int = 1, *, use_cache: bool = True, capture: bool = False) -> Engine:
        """The engine this model's generations decode on, with at least `rows` rows, driven by the calling thread:
        kept between calls (its KV cache is allocated once), made anew only for more rows. `use_cache=False` (the
        recompute reference) and `capture` (attention for `on_attention`) get an engine of their own each call."""
        if not use_cache or capture:
            return make_engine(self.model, self.tokenizer, rows, use_cache=use_cache, capture=capture)
        if self._engine is None or self._engine.parallel < rows:
            self._engine = make_engine(self.model, self.tokenizer, rows, compile=self.compile)
        return self._engine

    # ---- looking inside: thin wrappers of gptmini.inspect -----------------------------------------------------

    def attention(self, text: str, *, last: int | None = None) -> Attention:
        """Attention maps of `text` (or its last `last` tokens): `.weights[layer, head, query, key]`, fp32."""
        from gptmini import inspect

        return inspect.attention(self.model, self.tokenizer, text, last=last)

    def logit_lens(self, text: str, *, top: int = 5, last: int | None = None) -> LogitLens:
        """Each layer's top `top` next tokens and its probability of the actual next token, per position."""
        from gptmini import inspect

        return inspect.logit_lens(self.model, self.tokenizer, text, top=top, last=last)

    def head_scores(self, text: str | None = None, *, seed: int = 0) -> HeadScores:
        """Entropy, previous/first/self-token and induction scores of every head, with the roles they suggest."""
        from gptmini import inspect

        return inspect.head_scores(self.model, self.tokenizer, text, seed=seed)


def sampling_config(base: SamplingConfig | None = None, **fields: Any) -> SamplingConfig:
    """`base` (default: `SamplingConfig()`) with `fields` replaced, validated."""
    cfg = dataclasses.replace(base or SamplingConfig(), **fields)
    cfg.stop = list(cfg.stop)
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

    `quantize="int8"` / `"int4"` stores the linear layers and LM head as int8 / group-wise int4 (`"int4-64"`,
    `"int4-32"`: smaller groups; CPU only, see `gptmini.quantize`); bf16 on a
    CPU gets prepacked oneDNN linears; `compile=True` compiles the one-token decode step on first use.
    """
    if threads is not None:
        set_threads(threads)
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
