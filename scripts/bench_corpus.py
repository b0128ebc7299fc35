"""Peak memory and tokenising speed of `gptmini train` as the corpus grows (issue 15, item 7).

    python scripts/bench_corpus.py                     # 5, 50 and 100 MB of text
    python scripts/bench_corpus.py --sizes 200,500,1000 --train-flags "--val-fraction 0.002"

The final evaluation scores the whole val split, which dominates the time from ~100 MB (30 M val tokens at 1 GB);
`--train-flags` passes a smaller `--val-fraction` (or anything else) to `gptmini train` for the large sizes. The val
memmap's pages that evaluation reads stay resident: ~62 MB per GB of text at the default 10 %.

Each corpus repeats data/shakespeare.txt (5 MB), every copy after the first with its paragraphs in another (seeded)
order, so the copies differ while the text stays English of one kind. For each size, in fresh processes with an
empty token cache:

- `gptmini train FILE --max-iters 1`: its peak resident memory (the process's ru_maxrss, file-backed pages of the
  token memmaps included) and wall time — tokenising, vocabulary counting, the compact-vocabulary remap, one step
  and the final evaluation on the whole val split;
- tokenising alone (`gptmini.data.load_corpus`: reading, UTF-8 checks, content hash, BPE, the uint16 cache), in MB
  of text per second, against one pass of tiktoken's `encode_ordinary_batch` over the same pieces of the same text
  with the same number of threads (the BPE work alone, nothing else); best of `--rounds`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "data" / "shakespeare.txt"
MB = 1_000_000

# Run in a child: load_corpus into an empty cache, and the tiktoken pass over the same pieces, each timed, best of
# ROUNDS (the machine may be shared: the quickest round is the one least disturbed). The encoding is built first, so
# neither pays for loading the BPE ranks.
TOKENISE = """
import json, os, shutil, sys, time
from pathlib import Path
from gptmini.data import _decoded_blocks, cache_root, load_corpus, split_for_tokenizer
from gptmini.tokenizer import _gpt2_encoding
path, rounds = Path(sys.argv[1]), int(sys.argv[2])
encoding, threads = _gpt2_encoding(), max(1, os.cpu_count() or 1)

def tiktoken_pass():
    took, tail = 0.0, ""
    for text in _decoded_blocks(path, "strict"):
        pieces, tail = split_for_tokenizer(tail + text)
        start = time.perf_counter()
        encoding.encode_ordinary_batch(pieces, num_threads=threads)
        took += time.perf_counter() - start
    start = time.perf_counter()
    encoding.encode_ordinary_batch([tail], num_threads=threads)
    return took + time.perf_counter() - start

ours, reference = [], []
for _ in range(rounds):
    shutil.rmtree(cache_root(), ignore_errors=True)
    start = time.perf_counter()
    corpus = load_corpus([path])
    ours.append(time.perf_counter() - start)
    reference.append(tiktoken_pass())
print(json.dumps({"ours_s": min(ours), "tiktoken_s": min(reference), "threads": threads}))
"""


def make_corpus(path: Path, size_mb: float) -> int:
    """Write about `size_mb` MB of text to `path` (whole paragraphs); returns its size in bytes."""
    source = SOURCE.read_text(encoding="utf-8")
    paragraphs = source.split("\n\n")
    target, written, copy = int(size_mb * MB), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            order = list(paragraphs)
            if copy:
                random.Random(copy).shuffle(order)
            for paragraph in order:
                chunk = paragraph + "\n\n"
                f.write(chunk)
                written += len(chunk.encode("utf-8"))
                if written >= target:
                    break
            copy += 1
    return path.stat().st_size


def peak_rss(command: list[str], env: dict[str, str]) -> tuple[int, float, int, str]:
    """(exit code, wall seconds, peak RSS in bytes, stdout) of `command` run as a child of this process.

    os.wait4 gives that one child's rusage, so each command's peak is its own.
    """
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=env, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        took = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            sys.stderr.write(err.read()[-2000:])
        return proc.returncode, took, usage.ru_maxrss * 1024, out.read()


def gpt2_tokens(cache: Path) -> int:
    """The GPT-2 tokens of the corpus a run tokenised into `cache` (from the token cache's metadata)."""
    metas = [json.loads(p.read_text()) for p in (cache / "tokens").glob("*.json")]
    return next(m["n_tokens"] for m in metas if "n_bytes" in m)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="5,50,100", help="corpus sizes in MB, comma-separated")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where corpora and caches go (default: a temp dir)"
    )
    parser.add_argument(
        "--train-flags", default="", help="more flags for `gptmini train`, e.g. --val-fraction 0.002"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="tokenising timings: best of this many rounds (0: skip them)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the corpora and caches")
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gptmini-bench-corpus-"))
    work.mkdir(parents=True, exist_ok=True)
    base_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows = []
    try:
        for size in sizes:
            corpus = work / f"corpus-{size:g}MB.txt"
            n_bytes = make_corpus(corpus, size)
            env = {**base_env, "GPTMINI_CACHE_DIR": str(work / f"cache-{size:g}-train")}
            train = [sys.executable, "-m", "gptmini", "train", str(corpus), "--max-iters", "1"]
            train += [
                "--out",
                str(work / f"run-{size:g}"),
                "--force",
                "--device",
                "cpu",
                *args.train_flags.split(),
            ]
            code, train_s, rss, _ = peak_rss(train, env)
            if code != 0:
                raise SystemExit(f"gptmini train failed on {corpus} (exit {code})")
            env = {**base_env, "GPTMINI_CACHE_DIR": str(work / f"cache-{size:g}-tokenise")}
            tok = {"ours_s": math.nan, "tiktoken_s": math.nan, "threads": os.cpu_count()}
            tok_rss = math.nan
            if args.rounds > 0:
                tokenise = [sys.executable, "-c", TOKENISE, str(corpus), str(args.rounds)]
                code, _, tok_rss, out = peak_rss(tokenise, env)
                if code != 0:
                    raise SystemExit(f"tokenising {corpus} failed (exit {code})")
                tok = json.loads(out.strip().splitlines()[-1])
            row = {
                "size_mb": n_bytes / MB,
                "train_rss_mb": rss / MB,
                "train_s": train_s,
                "tokenise_rss_mb": tok_rss / MB,
                "tokens": gpt2_tokens(work / f"cache-{size:g}-train"),
                "ours_mb_s": n_bytes / MB / tok["ours_s"],
                "tiktoken_mb_s": n_bytes / MB / tok["tiktoken_s"],
                "threads": tok["threads"],
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            for cache in work.glob(f"cache-{size:g}-*"):
                shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(work / f"run-{size:g}", ignore_errors=True)
            corpus.unlink()
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    first = rows[0]["train_rss_mb"] if rows else 0.0
    flags = f" {args.train_flags}" if args.train_flags else ""
    threads = rows[0]["threads"] if rows else "?"
    print(f"`gptmini train FILE --max-iters 1{flags}` (empty cache); tokenising alone, {threads} threads\n")
    print(
        "| text MB | tokens | peak RSS MB | vs first | train s | tokenise RSS MB | tokenise MB/s | tiktoken MB/s | ratio |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['size_mb']:.0f} | {r['tokens']:,} | {r['train_rss_mb']:.0f} | {r['train_rss_mb'] - first:+.0f} "
            f"| {r['train_s']:.0f} | {r['tokenise_rss_mb']:.0f} | {r['ours_mb_s']:.1f} | {r['tiktoken_mb_s']:.1f} "
            f"| {r['ours_mb_s'] / r['tiktoken_mb_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
