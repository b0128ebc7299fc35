"""Where a batch-1 decode step's time goes with the native kernels, on a GPT-2 small shape (random weights).

For each weight format, in one process, repeats interleaved (so a noisy neighbour slows every row alike), medians:
  * the read bandwidth of a plain reduction over 1 GiB (the ceiling's numerator in `bench_generate.py`);
  * one whole `DecodeStep` (embeddings, 12 blocks, attention over 120 cached positions, the head) in ms and as
    weight bytes per second;
  * the same weights through the native linears alone, one call per matrix, as weight bytes per second.
The gap between the last two is what the step spends outside the products; the gap between them and the reduction
is what the kernels leave on the table.

    flock /tmp/gptmini-heavy.lock python scripts/bench_native.py              # fp32, bf16, int8, int4
    python scripts/bench_native.py --formats fp32,int8 --repeats 5
    git show HEAD~1:gptmini/native.c > /tmp/old.c && python scripts/bench_native.py --baseline /tmp/old.c
    python scripts/bench_native.py --baseline-streams 4     # this native.c with 4 weight streams a thread
    python scripts/bench_native.py --baseline-ahead 4096    # … with each stream prefetched 4 KiB ahead

`--baseline` builds another native.c (default: this one) and adds its step rows, interleaved with this one's
(before/after a change); `--baseline-streams` and `--baseline-ahead` build it with that many weight streams a
thread and bytes prefetched ahead (0: none) instead of this CPU's defaults.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gptmini import native
from gptmini.config import GPTConfig
from gptmini.decode_step import DecodeStep
from gptmini.kv_cache import KVCache
from gptmini.model import GPT
from gptmini.quantize import prepare_for_decoding


def weight_bytes(module: torch.nn.Module) -> int:
    for name in ("qweight", "codes"):  # int8 rows; int4 codes (+ their scales and zeros)
        if hasattr(module, name):
            scales = module.scale_zero if hasattr(module, "scale_zero") else module.scale
            return getattr(module, name).nbytes + scales.nbytes
    return module.weight.nbytes


def best_median(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", default="fp32,bf16,int8,int4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--baseline", type=Path, help="another native.c whose decode step is timed beside this one"
    )
    parser.add_argument(
        "--baseline-streams", type=int, help="build the baseline with this many weight streams a thread"
    )
    parser.add_argument(
        "--baseline-ahead", type=int, help="build the baseline prefetching this many bytes ahead (0: none)"
    )
    args = parser.parse_args()
    if not native.available():
        raise SystemExit("the native kernels cannot be built here (no C compiler, or GPTMINI_NATIVE=0)")
    baseline = None
    if any(v is not None for v in (args.baseline, args.baseline_streams, args.baseline_ahead)):
        target = Path(tempfile.mkdtemp()) / "baseline.so"
        source = args.baseline or native.SOURCE
        native.build(
            native._compiler(),
            target,
            streams=args.baseline_streams,
            source=source,
            ahead=args.baseline_ahead,
        )
        baseline = native.load(target)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True)
    base = GPT(config).eval()
    rows = {}
    for form in args.formats.split(","):
        model = copy.deepcopy(base).to(torch.bfloat16 if form == "bf16" else torch.float32)
        prepare_for_decoding(model, quantize=form if form in ("int8", "int4") else None)
        cache = KVCache.for_model(model)
        with torch.no_grad():
            model(torch.randint(0, 50257, (1, 120)), cache=cache)
        linears = [m for m in model.modules() if hasattr(m, "out_features") and m is not model.lm_head]
        linears.append(model.lm_head)
        inputs = {m.in_features: torch.randn(1, m.in_features) for m in linears}
        rows[form] = (DecodeStep.for_model(model, cache), linears, inputs, sum(map(weight_bytes, linears)))
    big = torch.randn(256 * 1024 * 1024)
    results: dict[str, list[float]] = {}
    with torch.no_grad():
        for _ in range(args.repeats):
            t = best_median(big.sum, 5)
            results.setdefault("reduction GB/s", []).append(big.nbytes / t / 1e9)
            for form, (step, linears, inputs, nbytes) in rows.items():
                t = best_median(lambda step=step: step(5, 120), 5)
                results.setdefault(f"{form} step ms", []).append(t * 1e3)
                results.setdefault(f"{form} step GB/s", []).append(nbytes / t / 1e9)
                if baseline is not None:
                    lib, step._lib = step._lib, baseline
                    t = best_median(lambda step=step: step(5, 120), 5)
                    step._lib = lib
                    results.setdefault(f"{form} step GB/s, baseline", []).append(nbytes / t / 1e9)
                t = best_median(lambda ls=linears, xs=inputs: [m(xs[m.in_features]) for m in ls], 5)
                results.setdefault(f"{form} linears alone GB/s", []).append(nbytes / t / 1e9)
    print(f"torch {torch.__version__}, {args.threads} threads, GPT-2 small shape, medians of {args.repeats}")
    print("| measure | median | each repeat |\n|---|---:|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} |")


if __name__ == "__main__":
    main()
