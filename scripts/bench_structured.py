"""What structured output costs: `gptmini serve` tokens/s with and without a JSON schema, at 1 and 8 streaming
clients, in one run (interleaved repeats, medians).

Each client asks `/v1/completions` for up to 128 tokens, greedy. Plain: `ignore_eos`, so every reply is 128
tokens. Schema: `response_format` json_schema with one string property of 400 to 600 characters, so the grammar
holds the reply for its whole length (every token masked: llguidance's mask on the vocabulary, then the sampler's
-inf over the rest) and rarely ends it before 128 tokens. Tokens/s counts the tokens each reply really got.

    python scripts/bench_structured.py                          # GPT-2 small shape (random, fp32) and default-chat
    python scripts/bench_structured.py --models default-chat --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import ROOT, Running, free_port, level, write_gpt2_dir

SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string", "minLength": 400, "maxLength": 600}},
    "required": ["text"],
}
MODES = {
    "plain": {"ignore_eos": True},
    "json schema": {
        "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["gpt2-small", "default-chat"])
    parser.add_argument("--levels", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-structured-"))
    rows = []
    for name in args.models:
        ckpt = write_gpt2_dir(work / "gpt2") if name == "gpt2-small" else ROOT / "checkpoints" / name
        port = free_port()
        cmd = [sys.executable, "-m", "gptmini", "serve", "-c", str(ckpt), "--port", str(port), "--quiet"]
        cmd += [
            "--threads",
            str(args.threads),
            "--parallel",
            str(max(args.levels)),
            "--no-ui",
            "--dtype",
            "float32",
        ]
        server = Running(cmd, port, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        try:
            server.wait_ready("/health")
            asyncio.run(
                level(server.url, "m", 1, 8, MODES["json schema"])
            )  # warm-up: weights, grammar, kernels
            rates: dict[tuple[str, int], list[float]] = {}
            for _ in range(args.repeats):
                for clients in args.levels:
                    for mode, extra in MODES.items():
                        got = asyncio.run(level(server.url, "m", clients, 128, extra))
                        rates.setdefault((mode, clients), []).append(got["tokens_per_s"])
        finally:
            server.stop()
        for clients in args.levels:
            plain = statistics.median(rates[("plain", clients)])
            shaped = statistics.median(rates[("json schema", clients)])
            rows.append((name, clients, plain, shaped))
    print("| model | clients | plain tokens/s | JSON schema tokens/s | schema / plain |")
    print("|---|---:|---:|---:|---:|")
    for name, clients, plain, shaped in rows:
        print(f"| {name} | {clients} | {plain:.1f} | {shaped:.1f} | {shaped / plain:.2f}× |")


if __name__ == "__main__":
    main()
