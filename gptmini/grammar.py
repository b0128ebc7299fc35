"""Structured output: decoding under a grammar, so the text always parses — any JSON object, a JSON schema, a regex,
one of a few strings — on every model, compact vocabularies included.

The grammar engine is llguidance (chosen by `scripts/bench_grammar.py`: on GPT-2's 50,257 tokens a mask costs
13–17 µs at the median and ≤ 0.3 ms at p99 per token, a schema compiles in about a millisecond, and recursive JSON
needs no depth bound; outlines-core took 23–40 ms to compile, up to 1.4 ms a mask, and cannot express nested JSON of
any depth). Before each token a row's `Constraint` gives the tokens that keep the text inside the grammar; the
sampler sets every other logit to -inf (after bias and penalties, before temperature, so greedy decoding takes the
most likely allowed token); the chosen token then advances the grammar. When the grammar is complete and nothing
may follow, the row ends with finish reason "stop".

JSON comes out as Python's `json.dumps` writes it (", " between items, ": " after keys, no other whitespace): a
grammar that lets a model add whitespace anywhere lets a small one fill its whole reply with newlines.
"""

from __future__ import annotations

import re
import threading
import weakref
from typing import Any

import numpy as np
import torch

from gptmini.errors import UserError
from gptmini.tokenizer import byte_token_ids

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}

_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Tokenizer -> {vocab_size: LLTokenizer}
_lock = threading.Lock()


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise UserError("structured output needs the llguidance package: pip install llguidance") from None
    return llguidance


def json_schema(schema: dict[str, Any] | bool | None = None) -> str:
    """The grammar of JSON text valid under `schema` (None: any JSON object, OpenAI's `json_object`).

    An object schema that lists its `properties` and says nothing of others takes no others, as in OpenAI's strict
    mode (the text stays valid under the schema as given): left open, a small model invents keys until max_tokens.
    """
    if schema is None:
        schema = ANY_JSON_OBJECT
    if not isinstance(schema, dict | bool):
        raise UserError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        return _llguidance().LLMatcher.grammar_from_json_schema(_closed(schema), overrides=JSON_STYLE)
    except ValueError as e:
        raise UserError(f"invalid JSON schema: {e}") from None


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_VALUES = ("const", "enum", "default", "examples")  # JSON values, not schemas


def _closed(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on each object schema that lists properties and is silent on
    others (a copy; everything else as it was)."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):  # name -> schema: the names are no keywords
            out[key] = {name: _closed(sub) for name, sub in value.items()}
        else:
            out[key] = value if key in _VALUES else _closed(value)
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def regex(pattern: str) -> str:
    """The grammar of text matching `pattern` whole."""
    return _llguidance().LLMatcher.grammar_from_regex(pattern)


def one_of(options: list[str]) -> str:
    """The grammar of exactly one of `options`."""
    if not options or not all(isinstance(o, str) and o for o in options):
        raise UserError("choices must be a non-empty list of non-empty strings")
    return regex("|".join(f"(?:{re.escape(o)})" for o in options))


def _end_tokens(tokenizer: Any, vocab_size: int) -> list[int]:
    """The tokens that end a text: <|endoftext|>, and a chat model's <|end|>."""
    ends = [tokenizer.eot_id]
    end = tokenizer.special_ids.get("<|end|>")
    if end is not None and end < vocab_size:
        ends.append(end)
    return ends


class _Vocabulary:
    """The model's tokens as llguidance reads them: each id's bytes, special tokens flagged, and an encoder."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        known = min(tokenizer.n_vocab, vocab_size)
        self.tokens = [tokenizer.token_bytes(i) for i in range(known)]
        self.tokens += [
            b"\xff<|unused_%d|>" % i for i in range(known, vocab_size)
        ]  # padding rows of the head
        self.special_token_ids = [i for i in range(known, vocab_size)]
        for text, i in tokenizer.special_ids.items():
            if i < vocab_size:
                self.tokens[i] = b"\xff" + text.encode()
                self.special_token_ids.append(i)
        self.eos_token_id = tokenizer.eot_id
        self.bos_token_id = None

    def __call__(self, text: bytes) -> list[int]:
        try:
            return self._tokenizer.encode(text.decode("utf-8"))
        except UnicodeDecodeError:  # a piece of a character: its bytes one byte token each
            return self._tokenizer.from_gpt2(byte_token_ids()[list(text)]).tolist()


def lltokenizer(tokenizer: Any, vocab_size: int) -> Any:
    """llguidance's view of `tokenizer` for a model of `vocab_size` logits (built once: ~0.1–0.2 s)."""
    llg = _llguidance()
    with _lock:
        per_size = _tokenizers.setdefault(tokenizer, {})
        if vocab_size not in per_size:
            wrapper = llg.TokenizerWrapper(_Vocabulary(tokenizer, vocab_size))
            per_size[vocab_size] = llg.LLTokenizer(
                wrapper, n_vocab=vocab_size, eos_token=_end_tokens(tokenizer, vocab_size)
            )
        return per_size[vocab_size]


def check(grammar: str, tokenizer: Any, vocab_size: int) -> None:
    """A UserError naming what is wrong with `grammar` (an unsupported schema keyword, a bad regex), else nothing."""
    message = _llguidance().LLMatcher.validate_grammar(grammar, lltokenizer(tokenizer, vocab_size))
    if message:
        raise UserError(f"cannot decode under this grammar: {message}")


class Constraint:
    """One row's place in its grammar: which tokens may come next, and the token that came."""

    def __init__(self, grammar: str, tokenizer: Any, vocab_size: int, device: torch.device) -> None:
        llg = _llguidance()
        import llguidance.numpy

        self._fill = llguidance.numpy.fill_next_token_bitmask
        self._matcher = llg.LLMatcher(lltokenizer(tokenizer, vocab_size), grammar, log_level=0)
        if self._matcher.is_error():
            raise ValueError(f"cannot decode under this grammar: {self._matcher.get_error()}")
        self._words = llguidance.numpy.allocate_token_bitmask(1, vocab_size)
        self._vocab_size = vocab_size
        self._device = device

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None

    @property
    def done(self) -> bool:
        """The grammar is complete and nothing may follow (only an end token)."""
        return self._matcher.is_stopped()

    def allowed(self, width: int) -> torch.Tensor:
        """`[1, width]` bools: the tokens that keep the text inside the grammar (a padded head's extra rows never)."""
        self._fill(self._matcher, self._words)
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little")[: self._vocab_size]
        if width > len(bits):
            bits = np.concatenate([bits, np.zeros(width - len(bits), dtype=np.uint8)])
        return torch.from_numpy(bits.view(np.bool_)).to(self._device)[None]

    def take(self, token: int) -> None:
        self._matcher.consume_token(token)
