"""Which constrained-decoding library: per-token mask cost on GPT-2's 50,257-token vocabulary, on this CPU.

For each library installed (llguidance, outlines-core; xgrammar where present) and each schema below, in one
process: the one-off cost of reading the vocabulary, the cost of compiling the schema, and the time to compute
the allowed-token mask at every token of a valid JSON reply (the reply as GPT-2's tokenizer splits it, each token
consumed after its mask), as median and p99 per token. A mask that rejects the reply's own next token is counted
(it must be 0). `json_object` (any JSON value, nested) needs a context-free grammar: a regex engine gets a depth
bound or nothing.

    pip install llguidance outlines-core    # bench-only: gptmini ships with llguidance alone
    python scripts/bench_grammar.py
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np

from gptmini.tokenizer import _gpt2_encoding

SCHEMAS = {
    "person": (
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer"},
                "role": {"enum": ["admin", "user", "guest"]},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["name", "age", "role", "tags"],
            "additionalProperties": False,
        },
        {"name": "Ada Lovelace", "age": 36, "role": "admin", "tags": ["math", "engines", "poetry"]},
    ),
    "weather-call": (
        {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
        {"city": "San Francisco", "unit": "celsius", "days": 3},
    ),
    "json_object": (
        None,
        {"a": [1, 2, {"b": None, "c": "text with spaces"}], "d": True, "e": -1.5e3},
    ),
}


def per_token(mask_then_take, ids: list[int]) -> tuple[list[float], int]:
    times, rejected = [], 0
    for tok in ids:
        t = time.perf_counter()
        ok = mask_then_take(tok)
        times.append(time.perf_counter() - t)
        rejected += not ok
    return times, rejected


def bench_llguidance(enc, schemas):
    import llguidance
    import llguidance.numpy
    import llguidance.tiktoken

    t = time.perf_counter()
    tok = llguidance.tiktoken.lltokenizer_from_encoding(enc)
    setup = time.perf_counter() - t
    rows = []
    for name, (schema, doc) in schemas.items():
        t = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema if schema is not None else {"type": "object"}
        )
        matcher = llguidance.LLMatcher(tok, grammar)
        compile_s = time.perf_counter() - t
        mask = llguidance.numpy.allocate_token_bitmask(1, tok.vocab_size)

        def step(token, matcher=matcher, mask=mask):
            llguidance.numpy.fill_next_token_bitmask(matcher, mask)
            allowed = bool(mask[0, token // 32] >> (token % 32) & 1)
            matcher.consume_token(token)
            return allowed

        times, rejected = per_token(step, enc.encode(json.dumps(doc)))
        rows.append(("llguidance", name, setup, compile_s, times, rejected))
    return rows


def bench_outlines(enc, schemas):
    import outlines_core

    t = time.perf_counter()
    vocab: dict[bytes, list[int]] = {}
    for i in range(enc.n_vocab):
        if i != enc.eot_token:
            vocab.setdefault(enc.decode_single_token_bytes(i), []).append(i)
    vocabulary = outlines_core.Vocabulary(enc.eot_token, vocab)
    setup = time.perf_counter() - t
    rows = []
    for name, (schema, doc) in schemas.items():
        if schema is None:
            rows.append(("outlines-core", name, setup, float("nan"), [], -1))
            continue
        t = time.perf_counter()
        regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(schema))
        guide = outlines_core.Guide(outlines_core.Index(regex, vocabulary))
        compile_s = time.perf_counter() - t
        mask = np.zeros((enc.n_vocab + 31) // 32, dtype=np.int32)

        def step(token, guide=guide, mask=mask):
            guide.write_mask_into(mask.ctypes.data, mask.size, 4)
            allowed = bool(mask[token // 32] >> (token % 32) & 1)
            guide.advance(token)
            return allowed

        times, rejected = per_token(step, enc.encode(json.dumps(schema and doc)))
        rows.append(("outlines-core", name, setup, compile_s, times, rejected))
    return rows


def main() -> None:
    enc = _gpt2_encoding()  # tiktoken's GPT-2 BPE from the files gptmini ships (no download)
    rows = []
    for bench in (bench_llguidance, bench_outlines):
        try:
            rows += bench(enc, SCHEMAS)
        except ImportError as e:
            print(f"skipped {bench.__name__}: {e}")
    print("| library | schema | vocabulary setup s | compile ms | mask µs p50 / p99 | tokens | rejected |")
    print("|---|---|---:|---:|---|---:|---:|")
    for lib, name, setup, compile_s, times, rejected in rows:
        if not times:
            print(f"| {lib} | {name} | {setup:.2f} | — | cannot (recursive grammar) | — | — |")
            continue
        us = sorted(t * 1e6 for t in times)
        p99 = us[min(len(us) - 1, int(0.99 * len(us)))]
        print(
            f"| {lib} | {name} | {setup:.2f} | {compile_s * 1e3:.1f} | {statistics.median(us):.0f} / {p99:.0f} "
            f"| {len(us)} | {rejected} |"
        )


if __name__ == "__main__":
    main()
