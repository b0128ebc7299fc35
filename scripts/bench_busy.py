"""Decode speed on a busy machine: the default thread choice against fixed thread counts, in one run.

A new user's machine is rarely idle. With another process spinning on one core (`taskset -c CORE`, a shell busy
loop), each row decodes with `gptmini.LM.generate` in a child process (greedy, EOS ignored, tokens/s after the
prefill): the default (`threads=None`: every core, fewer while that is faster), then `--threads 1`, then every
core fixed; the same rows again on the quiet machine. Rows interleave within each repeat; medians are reported,
with the default's ratio to the better fixed count (the target: >= 0.7x under load, ~1.0x quiet).

    flock /tmp/gptmini-heavy.lock python scripts/bench_busy.py
    python scripts/bench_busy.py --checkpoint DIR --quantize int8 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, sys
import gptmini
from gptmini.decoding import GenerationStats
checkpoint, quantize, threads, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
lm = gptmini.load(checkpoint, device="cpu", threads=None if threads == "default" else int(threads),
                  quantize=None if quantize == "none" else quantize)
lm.generate("The", max_new_tokens=8, temperature=0, ignore_eos=True)  # warm-up
stats = GenerationStats()
lm.generate("To be, or not to be", max_new_tokens=tokens, temperature=0, ignore_eos=True, stats=stats)
print(json.dumps(stats.decode_tokens_per_s))
"""


@contextlib.contextmanager
def busy_core(core: int | None) -> Iterator[None]:
    """A shell loop spinning on `core` for the duration (None: a quiet machine)."""
    if core is None:
        yield
        return
    proc = subprocess.Popen(["taskset", "-c", str(core), "sh", "-c", "while :; do :; done"])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def rate(checkpoint: str, quantize: str, threads: str, tokens: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    cmd = [sys.executable, "-c", CHILD, checkpoint, quantize, threads, str(tokens)]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "default"))
    parser.add_argument("--quantize", default="none")
    parser.add_argument("--tokens", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy-core", type=int, default=(os.cpu_count() or 2) - 1)
    args = parser.parse_args()
    cores = str(os.cpu_count() or 1)
    rows: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for load, core in (("busy", args.busy_core), ("quiet", None)):
            with busy_core(core):
                for threads in ("default", "1", cores):
                    r = rate(args.checkpoint, args.quantize, threads, args.tokens)
                    rows.setdefault((load, threads), []).append(r)
                    print(json.dumps({"load": load, "threads": threads, "tokens_per_s": r}), flush=True)
    print(f"\n| machine | default | --threads 1 | --threads {cores} | default / best fixed |")
    print("|---|---:|---:|---:|---:|")
    for load in ("busy", "quiet"):
        med = {t: statistics.median(rows[(load, t)]) for t in ("default", "1", cores)}
        best = max(med["1"], med[cores])
        print(
            f"| {load} | {med['default']:.0f} | {med['1']:.0f} | {med[cores]:.0f} | {med['default'] / best:.2f}× |"
        )


if __name__ == "__main__":
    main()
