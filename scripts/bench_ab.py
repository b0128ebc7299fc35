"""Batch-1 decode speed of this tree against another revision, interleaved in one run (regression checks).

Each repeat runs, for every model and format, one child process per tree (the baseline checked out by `git
worktree` into a temporary folder), alternating which tree goes first; each child loads the model, warms up, and
reports `gptmini.LM.generate`'s decode tokens/s (greedy, EOS ignored, prefill excluded). Medians over the repeats.

    flock /tmp/gptmini-heavy.lock python scripts/bench_ab.py --baseline fa4cd59
    python scripts/bench_ab.py --baseline HEAD~3 --models default --formats fp32 int8 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, sys, torch
import gptmini
from gptmini.config import GPTConfig
try:
    from gptmini.decoding import GenerationStats
except ImportError:  # revisions before the engine
    from gptmini.generation import GenerationStats
from gptmini.model import GPT
from gptmini.quantize import prepare_for_decoding
from gptmini.tokenizer import Tokenizer
model, form, tokens, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
quantize = form if form.startswith("int") else None
if model == "gpt2-small":  # random weights in GPT-2 small's shape
    torch.manual_seed(0)
    net = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024)).eval()
    if form == "bf16":
        net = net.to(torch.bfloat16)
    prepare_for_decoding(net, quantize=quantize)
    lm = gptmini.LM(net, Tokenizer(net.config.vocabulary))
else:
    lm = gptmini.load(model, device="cpu", dtype="bfloat16" if form == "bf16" else "float32", quantize=quantize)
lm.generate("The history of the city", max_new_tokens=16, temperature=0, ignore_eos=True)  # warm-up
rates = []
for _ in range(3):
    stats = GenerationStats()
    lm.generate("The history of the city", max_new_tokens=tokens, temperature=0, ignore_eos=True, stats=stats)
    rates.append(stats.decode_tokens_per_s)
print(json.dumps(sorted(rates)[1]))
"""


def child(tree: Path, model: str, form: str, tokens: int, threads: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-c", CHILD, model, form, str(tokens), str(threads)]
    out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", required=True, help="a git revision to compare against")
    parser.add_argument("--models", nargs="+", default=["gpt2-small", "checkpoints/default"])
    parser.add_argument("--formats", nargs="+", default=["fp32", "bf16", "int8", "int4"])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.baseline], check=True
        )
        try:
            trees = {"this tree": ROOT, args.baseline: base}
            rows: dict[tuple[str, str, str], list[float]] = {}
            for rep in range(args.repeats):
                for model in args.models:
                    for form in args.formats:
                        order = list(trees.items())[:: 1 if rep % 2 == 0 else -1]
                        for name, tree in order:
                            rate = child(tree, model, form, args.tokens, args.threads)
                            rows.setdefault((model, form, name), []).append(rate)
                            print(
                                json.dumps({"model": model, "form": form, "tree": name, "tokens_per_s": rate})
                            )
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
    print(f"\n| model | format | this tree tok/s | {args.baseline} tok/s | ratio |")
    print("|---|---|---:|---:|---:|")
    for model in args.models:
        for form in args.formats:
            ours = statistics.median(rows[(model, form, "this tree")])
            theirs = statistics.median(rows[(model, form, args.baseline)])
            print(f"| {model} | {form} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}× |")


if __name__ == "__main__":
    main()
