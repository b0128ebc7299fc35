"""Prompt processing: a 512-token prompt through gptmini's engine beside llama.cpp's `llama-bench -p 512`, one run.

Both read the same GPT-2-small-shaped weights (random, written as a Hugging Face directory; llama.cpp's files are
converted from it by `../shared/tools/llamacpp.sh`: f32, q8_0 and q4_0). gptmini's rows time `Passes.prefill` — the
engine's prompt pass, every token through the native kernels, logits of the last — fp32, int8 and int4 (groups of
128), interleaved with llama-bench's runs; medians of the repeats, tokens/s.

    flock /tmp/gptmini-heavy.lock python scripts/bench_prefill.py
    python scripts/bench_prefill.py --tokens 256 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench_serve import LLAMACPP_SH, llamacpp_gguf, write_gpt2_dir  # noqa: E402

import gptmini  # noqa: E402
import gptmini.devices  # noqa: E402
from gptmini.steps import Passes  # noqa: E402

PEERS = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}


def gptmini_rate(passes: Passes, tokens: int) -> float:
    ids = torch.randint(0, 50257, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    start = time.perf_counter()
    passes.prefill(0, ids)
    return tokens / (time.perf_counter() - start)


def llamacpp_bench(
    gguf: Path, decode: int, prefill: int, threads: int, repeats: int = 1
) -> tuple[float, float]:
    """`llama-bench` tokens/s: (decoding `decode` tokens, prefilling `prefill`); 0 for either skips it."""
    bin_dir = Path(subprocess.check_output(["bash", str(LLAMACPP_SH), "build"], text=True).strip())
    cmd = [
        str(bin_dir / "llama-bench"),
        "-m",
        str(gguf),
        "-t",
        str(threads),
        "-r",
        str(repeats),
        "-o",
        "json",
    ]
    rates = {}
    for test, n in (("tg", decode), ("pp", prefill)):
        if n:
            args = ["-p", "0", "-n", str(n)] if test == "tg" else ["-p", str(n), "-n", "0"]
            out = subprocess.run([*cmd, *args], capture_output=True, text=True, check=True).stdout
            rates[test] = float(json.loads(out)[0]["avg_ts"])
    return rates.get("tg", 0.0), rates.get("pp", 0.0)


def llamacpp_rate(gguf: Path, tokens: int, threads: int) -> float:
    return llamacpp_bench(gguf, 0, tokens, threads)[1]


def gguf_of(hf_dir: Path, kind: str) -> Path:
    if kind != "q4_0":
        return llamacpp_gguf(hf_dir, kind)
    out = hf_dir.with_name(f"{hf_dir.name}-q4_0.gguf")
    if not out.exists():
        f32 = llamacpp_gguf(hf_dir, "f32")
        subprocess.run(["bash", str(LLAMACPP_SH), "quantize", str(f32), str(out), "Q4_0"], check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--formats", nargs="+", default=list(PEERS), choices=list(PEERS))
    args = parser.parse_args()
    gptmini.devices.set_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    hf_dir = write_gpt2_dir(Path(tempfile.mkdtemp(prefix="bench-prefill-")) / "gpt2-small-random")
    rows: dict[tuple[str, str], list[float]] = {}
    for form in args.formats:
        lm = gptmini.load(hf_dir, device="cpu", quantize=None if form == "fp32" else form)
        passes = Passes(lm.model, 1)
        gguf = gguf_of(hf_dir, PEERS[form])
        gptmini_rate(passes, 16)  # warm-up
        for _ in range(args.repeats):
            rows.setdefault((form, "gptmini"), []).append(gptmini_rate(passes, args.tokens))
            rows.setdefault((form, "llama.cpp"), []).append(llamacpp_rate(gguf, args.tokens, args.threads))
            print(
                json.dumps(
                    {
                        "format": form,
                        "gptmini": rows[(form, "gptmini")][-1],
                        "llama.cpp": rows[(form, "llama.cpp")][-1],
                    }
                ),
                flush=True,
            )
    print(
        f"\n| gptmini / llama.cpp | gptmini pp{args.tokens} tok/s | llama-bench pp{args.tokens} tok/s | ratio |"
    )
    print("|---|---:|---:|---:|")
    for form in args.formats:
        ours, theirs = (statistics.median(rows[(form, who)]) for who in ("gptmini", "llama.cpp"))
        print(f"| {form} / {PEERS[form]} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f}× |")


if __name__ == "__main__":
    main()
