"""Model configuration: one dataclass, validated, JSON round-trippable, with presets.

Kept free of torch so the CLI can parse and validate flags without importing it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from gptmini.errors import UserError

GPT2_VOCAB_SIZE = 50257  # 50,000 merges + 256 bytes + <|endoftext|>
POS_EMBEDDINGS = ("learned", "sinusoidal", "rotary")
# gpt2: GPT-2's layout (import/export). modern: rotary positions, QK-norm, ReLU² MLP, zero-initialised output
# projections and no biases (see gptmini.model); it cannot be exported to GPT-2.
ARCHS = ("gpt2", "modern")


@dataclass
class GPTConfig:
    """Shape of a GPT-2-style decoder.

    `vocab_size` counts the token ids the model may read or emit. The embedding matrix is padded up to
    `padded_vocab_size` rows (a multiple of `pad_vocab_multiple`) because aligned matmuls are faster and the
    spare rows are where chat tokens go later; padding ids are never scored or sampled.

    `vocabulary` is None for GPT-2's own numbering, or the GPT-2 ids of a compact vocabulary (see
    `gptmini.tokenizer`): token id i stands for GPT-2 token vocabulary[i]; ids past it are chat tokens.
    """

    vocab_size: int = GPT2_VOCAB_SIZE
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    # Dropout on the attention probabilities; None: `dropout`. 0 keeps dropout on the residual branches only, where
    # it is cheap (attention-probability dropout takes SDPA off its fused kernel on a CPU).
    attention_dropout: float | None = None
    bias: bool = True
    pos_embedding: str = "learned"
    layer_norm_eps: float = 1e-5
    pad_vocab_multiple: int = 64
    vocabulary: list[int] | None = None
    arch: str = "gpt2"  # configs saved before it existed are GPT-2's layout

    def __post_init__(self) -> None:
        if self.arch == "modern":  # its positions are rotary and it has no biases, whatever the preset says
            self.pos_embedding, self.bias = "rotary", False
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "pad_vocab_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise UserError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_head={_nearest_divisor(self.n_embd, self.n_head)}"
            )
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise UserError(f"{name} must be in [0, 1), got {value}")
        if self.pos_embedding not in POS_EMBEDDINGS:
            raise UserError(
                f"pos_embedding must be one of {', '.join(POS_EMBEDDINGS)}, got {self.pos_embedding!r}"
            )
        if self.vocabulary is not None and not (
            isinstance(self.vocabulary, list) and 0 < len(self.vocabulary) <= self.vocab_size
        ):
            raise UserError(
                f"the vocabulary lists {len(self.vocabulary or [])} tokens but vocab_size is {self.vocab_size}; "
                "the checkpoint's config is damaged"
            )
        if self.arch not in ARCHS:
            raise UserError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if (self.pos_embedding == "rotary") != (self.arch == "modern"):
            raise UserError("pos_embedding rotary comes with arch modern, and only with it")
        if self.arch == "modern" and self.head_dim % 2:
            raise UserError(f"rotary positions need an even head size, got {self.head_dim}")
        if self.pos_embedding == "sinusoidal" and self.n_embd % 2:
            raise UserError(f"sinusoidal position embeddings need an even n_embd, got {self.n_embd}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def attention_dropout_p(self) -> float:
        """The attention probabilities' dropout: `attention_dropout`, or `dropout` where that is unset."""
        return self.dropout if self.attention_dropout is None else self.attention_dropout

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> dict[str, Any]:
        """`to_dict` for people: a compact vocabulary shown by its size, not its thousands of ids."""
        data = self.to_dict()
        if self.vocabulary is not None:
            data["vocabulary"] = f"compact: {len(self.vocabulary):,} GPT-2 tokens"
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> GPTConfig:
        return dataclasses.replace(self, **changes)


def _nearest_divisor(n: int, target: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), d))


# Presets: `tiny` trains in seconds (tests, smoke runs), `small` is the CPU default, `gpt2` is GPT-2 small (124M).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),
    # `gptmini train`'s default: the best of 256/192/128 wide in 10-minute CPU runs (docs/training-results.md)
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
}


def preset(name: str, **overrides: Any) -> GPTConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


# Below this a temperature is greedy: logits / 1e-40 are ±inf, and their softmax NaN.
MIN_TEMPERATURE = 1e-5
# What torch.Generator.manual_seed takes (negatives are read as their two's complement).
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


@dataclass
class SamplingConfig:
    """Decoding settings, shared by generate, chat and the Python API."""

    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # OpenAI's: minus frequency_penalty × (times a token was generated so far), minus presence_penalty if it was
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (-100..100)

    @property
    def greedy(self) -> bool:
        """Temperatures below `MIN_TEMPERATURE` decode greedily: dividing logits by them overflows to inf/NaN."""
        return self.temperature < MIN_TEMPERATURE

    def validate(self) -> None:
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "frequency_penalty",
            "presence_penalty",
        ):
            value = getattr(self, name)
            if value is not None and not _finite(value):
                raise UserError(f"{name.replace('_', '-')} must be a finite number, got {value}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise UserError(f"seed must be in {SEED_MIN}..{SEED_MAX}, got {self.seed}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise UserError(f"min-p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise UserError(f"repetition-penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise UserError(
                    f"{name.replace('_', '-')} must be in [-2, 2] (0 = off), got {getattr(self, name)}"
                )
        for token, bias in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise UserError(f"logit-bias keys must be token ids (integers >= 0), got {token!r}")
            if not (_finite(bias) and -100.0 <= bias <= 100.0):
                raise UserError(f"logit-bias of token {token} must be in [-100, 100], got {bias}")


# ---- decoding -------------------------------------------------------------------------------------------------

INT4_GROUPS = (32, 64, 128)  # inputs per int4 scale and zero that the kernels take
INT4_DEFAULT_GROUP = 128  # gpt-fast's and torchao's default; llama.cpp's Q4_1 is 32
QUANTIZE_CHOICES = ("none", "int8", "int4", *(f"int4-{g}" for g in INT4_GROUPS))


def check_quantize_name(name: str | None) -> str | None:
    """A `--quantize` value (None or "none": no quantisation, returned as None)."""
    if name in (None, "none"):
        return None
    if name not in QUANTIZE_CHOICES:
        raise UserError(
            f"unknown quantization {name!r}; choose none, int8, int4, or int4-32 / int4-64 / int4-128 "
            f"(inputs per int4 scale; int4 alone means {INT4_DEFAULT_GROUP})"
        )
    return name


def int4_group(name: str) -> int:
    """The group size a valid int4 `--quantize` value asks for."""
    return INT4_DEFAULT_GROUP if name == "int4" else int(name.removeprefix("int4-"))


# ---- training -------------------------------------------------------------------------------------------------

ENCODING_ERRORS = ("strict", "replace")


def check_encoding_errors(value: str) -> None:
    """How undecodable bytes in a corpus are handled: `strict` (refuse the file) or `replace` (U+FFFD)."""
    if value not in ENCODING_ERRORS:
        raise UserError(f"encoding-errors must be strict or replace, got {value!r}")


# A compact vocabulary of the tokens the corpus uses, all of GPT-2's, or (a number N) the train split's N most
# frequent (see `TrainConfig.vocab_limit`).
VOCABS = ("corpus", "gpt2")
TRAIN_DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16")
SAVE_DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("auto", "muon", "adamw")  # auto: Muon where its cost is small against the step (optim.py)
# Peak lr per optimizer at 4×128 on Shakespeare: Muon 5e-3 beat 3e-3 and 2e-3 over 1,200 steps (1.926 bits/byte
# in ten minutes); AdamW 2e-3 (3e-3: worse at 4×256, within noise at 4×128).
DEFAULT_LR = {"muon": 5e-3, "adamw": 2e-3}
DEFAULT_TIME_BUDGET_S = 600.0  # with neither --max-iters nor --time: ten minutes


@dataclass
class TrainConfig:
    """Everything about a training run except the model's shape (that is `GPTConfig`).

    A step is one optimizer update over `batch_size × grad_accum × world_size` sequences. The run ends at
    `max_iters` steps or after `time_budget_s` seconds of wall clock, whichever comes first; the learning rate
    follows whichever of the two is further along, so a time-boxed run still decays to its floor.
    """

    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None  # peak; None: the optimizer's default (DEFAULT_LR)
    # Muon for the blocks' matrices + AdamW for the rest, "adamw" for everything, or "auto": Muon where its
    # Newton–Schulz iterations cost little against a step (`gptmini.optim.choose_optimizer`), decided at the start
    optimizer: str = "auto"
    min_lr_ratio: float = 0.1  # the cosine ends at lr × min_lr_ratio
    warmup_iters: int = 50
    max_iters: int | None = None
    time_budget_s: float | None = None
    weight_decay: float = 0.5  # 10-minute runs: 0.5 beat 0.1 and 1.0 (a small model sees its corpus ~5 times)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    val_fraction: float = 0.1
    seed: int = 1337
    dtype: str = "auto"
    device: str = "auto"
    compile: bool = False
    fsdp: bool = False  # shard weights, gradients and optimizer state over torchrun's ranks
    save_dtype: str = "float32"  # weights of best/, the copy for inference (the resumable one stays fp32)
    encoding_errors: str = "strict"
    vocab: str = "4096"  # the train split's 4,096 most frequent tokens: best for 4×128 in 10-minute runs
    # Decay of the weights' moving average that evaluation and best/ use (0 = off). Ten-minute runs: the average
    # scored 0.030 bits/byte better than the same run's live weights on Shakespeare val and on Paradise Lost.
    ema: float = 0.999

    def __post_init__(self) -> None:
        if isinstance(self.vocab, int) and not isinstance(self.vocab, bool):
            self.vocab = str(self.vocab)  # TrainConfig(vocab=4096) from Python
        if self.max_iters is None and self.time_budget_s is None:
            self.time_budget_s = DEFAULT_TIME_BUDGET_S
        if self.lr is None and self.optimizer in DEFAULT_LR:
            self.lr = DEFAULT_LR[self.optimizer]
        self.validate()

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; choose auto, muon or adamw")
        for name in ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.max_iters is not None and (not isinstance(self.max_iters, int) or self.max_iters <= 0):
            raise UserError(f"max-iters must be a positive integer, got {self.max_iters!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise UserError(f"time must be positive, got {self.time_budget_s!r} seconds")
        if not isinstance(self.warmup_iters, int) or self.warmup_iters < 0:
            raise UserError(f"warmup-iters must be >= 0, got {self.warmup_iters!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0) and not (
            self.lr is None and self.optimizer == "auto"
        ):
            raise UserError(f"lr must be positive, got {self.lr}")  # (auto's default lr follows its choice)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise UserError(f"weight-decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.grad_clip < 0:
            raise UserError(f"grad-clip must be >= 0 (0 = off), got {self.grad_clip}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.save_dtype not in SAVE_DTYPES:
            raise UserError(f"unknown save-dtype {self.save_dtype!r}; choose float32, bfloat16 or float16")
        if self.dtype not in TRAIN_DTYPES:
            raise UserError(f"unknown dtype {self.dtype!r}; choose auto, float32 or bfloat16")
        if self.vocab not in VOCABS and not (self.vocab.isdigit() and int(self.vocab) > 257):
            raise UserError(
                f"vocab must be corpus, gpt2 or a number of tokens above 257 (e.g. 8192), got {self.vocab!r}"
            )
        check_encoding_errors(self.encoding_errors)
        if not (isinstance(self.ema, (int, float)) and 0.0 <= self.ema < 1.0):
            raise UserError(f"ema must be in [0, 1) (0 = off; e.g. 0.999), got {self.ema!r}")

    @property
    def vocab_limit(self) -> int | None:
        """The most tokens a compact vocabulary may hold (`--vocab N`), None for all the corpus uses."""
        return int(self.vocab) if self.vocab.isdigit() else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        data = {"optimizer": "adamw", **data}  # runs saved before Muon existed were AdamW runs
        return cls(**{k: v for k, v in data.items() if k in known})


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in `90`, `90s`, `10m`, `1.5h` or `1h30m`; a UserError for anything else."""
    import re

    spec = text.strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smh]?)", spec)
    if not spec or re.sub(r"(\d+(?:\.\d+)?)\s*([smh]?)", "", spec).strip() or not parts:
        raise UserError(f"cannot read the duration {text!r}; write e.g. 90s, 10m or 1h30m")
    seconds = sum(float(n) * _DURATION_UNITS[u or "s"] for n, u in parts)
    if seconds <= 0:
        raise UserError(f"time must be positive, got {text!r}")
    return seconds
