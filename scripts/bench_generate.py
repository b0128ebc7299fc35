"""Decode speed of gptmini against transformers' GPT2LMHeadModel.generate(use_cache=True), same weights for every row.

Greedy, batch 1, a fixed thread count. One process measures every row but CTranslate2's (a child process each
run: its polling threads slowed whatever ran next), rows interleaved within each repeat (so a noisy neighbour slows
all rows alike), and reports medians:
  * decode tokens/s: new tokens after the first, over the time after the prefill (prefill excluded);
  * per-token latency at positions 100–200 and 800–900: a prompt of 100 (800) tokens, then 100 timed steps.
transformers' steps are timed by a logits processor that stamps the clock at every step. CTranslate2 (fp32 and
int8, converted from the same Hugging Face directory; `pip install ctranslate2`, bench-only) is timed per streamed
token. The ceiling column is read bandwidth, measured at the start of every repeat (the best of a reduction and two
fp32 matrix-vector products over 1 GiB, far past the last-level cache; median over the repeats), over the bytes of
weights each row's format reads per token (LM head included): batch-1 decoding cannot beat it.

    flock /tmp/gptmini-heavy.lock python scripts/bench_generate.py            # both shapes, all rows
    python scripts/bench_generate.py --shapes narrow --repeats 1 --tokens 64  # quick look
    python scripts/bench_generate.py --checkpoint DIR   # a trained model: also greedy agreement and bits/byte
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gptmini import native
from gptmini.config import GPTConfig, SamplingConfig
from gptmini.decoding import GenerationStats
from gptmini.generation import generate_tokens
from gptmini.hf import export_hf
from gptmini.model import GPT
from gptmini.quantize import prepare_for_decoding

SHAPES = {
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "narrow": dict(n_layer=4, n_head=4, n_embd=256, block_size=1024),
}
GREEDY = SamplingConfig(temperature=0.0)


def gptmini_rows(base: GPT) -> dict[str, tuple[GPT, dict]]:
    """name → (model, generate_tokens kwargs); every model is a copy of the same fp32 weights."""

    def bf16(compile: bool = False) -> GPT:
        return prepare_for_decoding(copy.deepcopy(base).to(torch.bfloat16), compile=compile)

    fp32 = prepare_for_decoding(copy.deepcopy(base))  # what `gptmini generate` runs: packed linears
    return {
        "gptmini fp32": (fp32, {}),
        "gptmini bf16": (bf16(), {}),
        "gptmini int8": (prepare_for_decoding(copy.deepcopy(base), quantize="int8"), {}),
        "gptmini int4": (prepare_for_decoding(copy.deepcopy(base), quantize="int4"), {}),  # groups of 128
        "gptmini int4-32": (prepare_for_decoding(copy.deepcopy(base), quantize="int4-32"), {}),
        "gptmini fp32 --compile": (copy.deepcopy(base), dict(compile=True)),
        "gptmini bf16 --compile": (bf16(compile=True), dict(compile=True)),
        "gptmini fp32 --no-kv-cache": (fp32, dict(use_cache=False)),
    }


def gptmini_decode(model: GPT, prompt: list[int], n: int, kwargs: dict) -> tuple[float, list[float]]:
    """(decode tokens/s, per-step seconds) of one greedy run."""
    stats = GenerationStats()
    for _ in generate_tokens(
        model, prompt, max_new_tokens=n, sampling=GREEDY, stats=stats, record_step_times=True, **kwargs
    ):
        pass
    return stats.decode_tokens_per_s, stats.step_times


class StepClock:
    """A transformers logits processor that only records when each step's logits arrive."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return scores


def hf_decode(hf, prompt: list[int], n: int) -> tuple[float, list[float]]:
    from transformers import LogitsProcessorList

    clock = StepClock()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=True,
            pad_token_id=50256,
            logits_processor=LogitsProcessorList([clock]),
        )
    return rate(clock.stamps)


def rate(stamps: list[float]) -> tuple[float, list[float]]:
    """(tokens/s, per-step seconds) from the clock times at which successive tokens arrived."""
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    return (len(steps) / sum(steps) if steps else float("nan")), steps


def ct2_runners(hf_dir: Path, threads: int) -> dict[str, Callable]:
    """CTranslate2 generators (fp32, int8) converted from the same Hugging Face directory; {} without ctranslate2.

    Each run happens in a child process of its own: CTranslate2's threads keep polling after a run, and slowed the
    rows timed after them in the same process (the 4×256 shape's gptmini int8 from ~850 to ~250 tokens/s)."""
    try:
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        print("ctranslate2 is not installed (pip install ctranslate2): its rows are skipped", file=sys.stderr)
        return {}
    from bench_serve import write_gpt2_tokenizer  # the tokenizer files CTranslate2's converter reads

    spelled = write_gpt2_tokenizer(hf_dir)
    runners = {}
    for compute in ("float32", "int8"):
        out = hf_dir / f"ct2-{compute}"
        TransformersConverter(str(hf_dir)).convert(str(out), quantization=compute, force=True)
        name = f"CTranslate2 {'fp32' if compute == 'float32' else compute}"
        job = dict(model=str(out), compute=compute, threads=threads)
        runners[name] = lambda p, n, job=job: ct2_in_child(job | dict(prompt=[spelled[i] for i in p], n=n))
    return runners


def ct2_in_child(job: dict) -> tuple[float, list[float]]:
    """`ct2_decode` of `job` in a fresh process (`--ct2-child`), after a 4-token warm-up there."""
    done = subprocess.run(
        [sys.executable, __file__, "--ct2-child"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=True,
    )
    tokens_per_s, steps = json.loads(done.stdout.splitlines()[-1])
    return tokens_per_s, steps


def ct2_child() -> None:
    import ctranslate2

    job = json.loads(sys.stdin.read())
    gen = ctranslate2.Generator(
        job["model"], device="cpu", compute_type=job["compute"], intra_threads=job["threads"]
    )
    ct2_decode(gen, job["prompt"], 4)
    print(json.dumps(ct2_decode(gen, job["prompt"], job["n"])))


def ct2_decode(generator, prompt: list[str], n: int) -> tuple[float, list[float]]:
    """(decode tokens/s, per-step seconds) of one greedy CTranslate2 run of exactly n new tokens."""
    stamps = []
    for _ in generator.generate_tokens(prompt, max_length=n, min_length=n, sampling_topk=1):
        stamps.append(time.perf_counter())
    return rate(stamps)


def read_bandwidth(threads: int, mib: int = 1024, repeats: int = 2) -> dict[str, float]:
    """GB/s of reads of a tensor far larger than the last-level cache, best of `repeats` each.

    A plain reduction and fp32 matrix-vector products (the read a batch-1 decode step does), by torch.mv and by
    gptmini's native kernel: on some CPUs a product streams faster than a reduction (Sapphire Rapids: 21 vs 17
    GB/s), and the native kernel's several streams a thread faster than torch.mv, so the ceiling takes the best.
    """
    torch.set_num_threads(threads)
    x = torch.ones(mib * 2**20 // 4)
    m = x.view(-1, 8192)  # [32768, 8192] at 1 GiB
    v = torch.ones(8192)
    reads = {"reduction": x.sum, "matrix-vector": lambda: torch.mv(m, v)}
    if native.available():
        reads["native matrix-vector"] = lambda: native.linear(v[None], m, wtype=0, out_features=m.shape[0])
    best = dict.fromkeys(reads, math.inf)
    for _ in range(repeats):
        for kind, read in reads.items():
            t = time.perf_counter()
            read()
            best[kind] = min(best[kind], time.perf_counter() - t)
    return {kind: x.nbytes / seconds / 1e9 for kind, seconds in best.items()}


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one batch-1 decode step reads: every linear as stored (LM head included), one embedding row.

    Packed fp32/bf16 and int4 weights are tensors; fbgemm's int8 weights are opaque, one byte each plus a per-row
    scale. Biases and LayerNorms are counted; the KV cache is not (it is per position, and small at 256 tokens).
    """
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            total += module.weight[0].nbytes  # one row per token
            continue
        if not hasattr(module, "in_features") or not hasattr(module, "out_features"):
            total += sum(p.nbytes for p in module.parameters(recurse=False))  # LayerNorms
            continue
        packed = getattr(module, "_packed", None)
        native_weight = getattr(
            module, "qweight", getattr(module, "codes", None)
        )  # the native int8 / int4 rows
        if native_weight is not None:
            total += native_weight.nbytes
        elif isinstance(packed, torch.Tensor):
            total += packed.numel() * packed.element_size()
        elif packed is not None:  # fbgemm's packed int8 matrix
            total += module.in_features * module.out_features
        else:
            total += module.weight.nbytes
        for name in ("scale_zero", "scale", "bias"):
            t = getattr(module, name, None)
            if isinstance(t, torch.Tensor):
                total += t.nbytes
    return total


def median(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else float("nan")


def bench_shape(
    name: str, base: GPT, hf, hf_dir: Path, args: argparse.Namespace
) -> tuple[list[dict], list[dict[str, float]]]:
    """Every row's median tokens/s against this shape's ceiling, and the read bandwidths behind it (one per repeat,
    measured before its rows: this machine's bandwidth moves with its neighbours)."""
    rows = gptmini_rows(base)
    runners = {"transformers fp32": lambda p, n: hf_decode(hf, p, n)}
    if not args.no_ct2:
        runners.update(ct2_runners(hf_dir, args.threads))
    for row, (model, kwargs) in rows.items():
        runners[row] = lambda p, n, m=model, k=kwargs: gptmini_decode(m, p, n, k)
    if args.rows:
        wanted = args.rows.split(",")  # a name ending in "$" must match whole
        runners = {
            r: run
            for r, run in runners.items()
            if r == "transformers fp32" or any(r == w[:-1] if w.endswith("$") else w in r for w in wanted)
        }
    # The ceiling of each row: read bandwidth over the bytes of weights a token reads in that row's format.
    fp32_bytes = weight_bytes_per_token(base)
    int8_bytes = weight_bytes_per_token(rows["gptmini int8"][0])
    weight_bytes = {row: weight_bytes_per_token(model) for row, (model, _) in rows.items()}
    weight_bytes |= {
        "transformers fp32": fp32_bytes,
        "CTranslate2 fp32": fp32_bytes,
        "CTranslate2 int8": int8_bytes,
    }
    for row in ("gptmini fp32 --compile", "gptmini bf16 --compile"):  # plain weights, packed by inductor
        weight_bytes[row] = weight_bytes_per_token(base) // (2 if "bf16" in row else 1)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 50257, (args.prompt_tokens,), generator=gen).tolist()
    long_prompt = torch.randint(0, 50257, (800,), generator=gen).tolist()

    def n_tokens(row: str, n: int) -> int:
        return max(8, n // 8) if "no-kv-cache" in row else n  # the reference path is O(T²): fewer tokens

    print(f"[{name}] warming up (compiles the --compile rows)", file=sys.stderr, flush=True)
    for row, run in runners.items():
        t = time.perf_counter()
        run(prompt, 4)
        print(f"  {row}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)

    speed: dict[str, list[float]] = {r: [] for r in runners}
    early: dict[str, list[float]] = {r: [] for r in runners}
    late: dict[str, list[float]] = {r: [] for r in runners}
    reads: list[dict[str, float]] = []
    for rep in range(args.repeats):
        reads.append(read_bandwidth(args.threads))
        for row, run in runners.items():
            speed[row].append(run(prompt, n_tokens(row, args.tokens))[0])
            if not args.no_latency:
                early[row].append(median(run(long_prompt[:100], n_tokens(row, 101))[1]))
                late[row].append(median(run(long_prompt, n_tokens(row, 101))[1]))
        print(f"[{name}] repeat {rep + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    hf_speed = median(speed["transformers fp32"])
    bandwidth = median([max(r.values()) for r in reads]) * 1e9  # B/s: the better of the two reads, per repeat
    rows_out = [
        dict(
            shape=name,
            row=row,
            tokens_per_s=median(speed[row]),
            ratio=median(speed[row]) / hf_speed,
            weight_mb=weight_bytes[row] / 1e6,
            ceiling=bandwidth / weight_bytes[row],
            ms_100_200=1000 * median(early[row]),
            ms_800_900=1000 * median(late[row]),
        )
        for row in runners
    ]
    return rows_out, reads


@torch.inference_mode()
def quality(base: GPT, text: str, max_tokens: int = 16384) -> list[dict]:
    """Bits per byte of each variant on the last 10% of `text` (the val split of `gptmini train`), and how far
    greedy continuations of prompts taken from it agree with fp32."""
    from gptmini.tokenizer import Tokenizer

    tok = Tokenizer(base.config.vocabulary)
    ids = tok.encode(text[-len(text) // 10 :])[: max_tokens + 1]
    n_bytes = len(tok.decode_bytes(ids[1:]))
    block = base.config.block_size
    prompts = [ids[i : i + 32] for i in range(0, min(len(ids) - 32, 32 * 64), 32 * 4)][:16]
    variants = {name: model for name, (model, kwargs) in gptmini_rows(base).items() if not kwargs}
    out, reference = [], None
    for name, model in variants.items():
        nll = 0.0
        for start in range(0, len(ids) - 1, block):
            chunk = torch.tensor([ids[start : start + block + 1]])
            _, loss = model(chunk[:, :-1], chunk[:, 1:])
            nll += loss.item() * (chunk.shape[1] - 1)
        greedy = [
            [t[0] for t in generate_tokens(model, p, max_new_tokens=64, sampling=GREEDY)] for p in prompts
        ]
        reference = reference or greedy
        agree = [
            next((i for i, (a, b) in enumerate(zip(g, r, strict=True)) if a != b), 64)
            for g, r in zip(greedy, reference, strict=True)
        ]
        out.append(
            dict(
                row=name,
                bits_per_byte=nll / (n_bytes * math.log(2)),
                identical=sum(a == 64 for a in agree),
                prompts=len(prompts),
                mean_agree=statistics.mean(agree),
            )
        )
    return out


def time_to_first_token(repeats: int, checkpoint: Path | None = None) -> dict[str, float]:
    """Cold `gptmini generate` until its first stdout byte vs a bare `python -c "import torch"` (medians, s).

    On `checkpoint` (the shipped default model, say), else on a random model of the default shape."""
    import subprocess

    from gptmini.checkpoint import save_checkpoint
    from gptmini.config import preset

    def first_byte(cmd: list[str]) -> float:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        proc.stdout.read(1)
        elapsed = time.perf_counter() - t
        proc.stdout.read()
        proc.wait()
        return elapsed

    with tempfile.TemporaryDirectory() as tmp:
        if checkpoint is None:
            torch.manual_seed(0)
            save_checkpoint(GPT(preset("small")), tmp)  # the CPU default shape: 4 layers, 128 wide
        ckpt = str(checkpoint or tmp)
        generate = [sys.executable, "-m", "gptmini", "generate", "Hello", "-c", ckpt, "-n", "1", "--greedy"]
        import_torch = [sys.executable, "-c", "import torch; print(1)"]
        runs = {"gptmini generate": [], "import torch": []}
        for _ in range(repeats):
            runs["gptmini generate"].append(first_byte(generate))
            runs["import torch"].append(first_byte(import_torch))
    return {k: median(v) for k, v in runs.items()}


LLAMACPP_PAIRS = {
    "gptmini fp32": "f32",
    "gptmini bf16": "bf16",
    "gptmini int8": "q8_0",
    "gptmini int4": "q4_0",
}


def llamacpp_rows(shape: str, hf_dir: Path, rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """llama.cpp beside this shape's rows, in the same run: `llama-bench` decode (tg) and prefill (pp512) of GGUF
    files converted from the same weights, against gptmini's decode row and its engine prefill of 512 tokens."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_prefill import gguf_of, gptmini_rate, llamacpp_bench
    from bench_serve import write_gpt2_tokenizer

    import gptmini
    from gptmini.steps import Passes

    write_gpt2_tokenizer(hf_dir)  # the converter needs the tokenizer files
    ours = {r["row"]: r["tokens_per_s"] for r in rows}
    out = []
    for row, kind in LLAMACPP_PAIRS.items():
        if row not in ours:
            continue
        tg, pp = llamacpp_bench(gguf_of(hf_dir, kind), args.tokens, 512, args.threads, args.repeats)
        quantize = row.split()[-1] if "int" in row else None
        lm = gptmini.load(
            hf_dir, device="cpu", quantize=quantize, dtype="bfloat16" if "bf16" in row else "float32"
        )
        passes = Passes(lm.model, 1)
        gptmini_rate(passes, 16)  # warm-up
        ours_pp = statistics.median(gptmini_rate(passes, 512) for _ in range(args.repeats))
        out.append(
            dict(shape=shape, pair=f"{row[8:]} / {kind}", ours=ours[row], tg=tg, ours_pp=ours_pp, pp=pp)
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="gpt2-small,narrow", help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--tokens", type=int, default=256, help="new tokens per speed run")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-latency", action="store_true", help="skip the latency-vs-position runs")
    parser.add_argument(
        "--checkpoint", type=Path, help="trained gptmini checkpoint: its weights, plus quality"
    )
    parser.add_argument("--quality-text", type=Path, default=Path("data/shakespeare.txt"))
    parser.add_argument(
        "--ttft", action="store_true", help="only time a cold `gptmini generate` to first token"
    )
    parser.add_argument("--quality-only", action="store_true", help="with --checkpoint: skip the speed rows")
    parser.add_argument("--no-ct2", action="store_true", help="skip the CTranslate2 rows")
    parser.add_argument(
        "--rows",
        help="comma list: only the rows whose name contains one of these, or is one ending in $ (transformers "
        "always runs)",
    )
    parser.add_argument(
        "--llamacpp",
        action="store_true",
        help="also llama.cpp on the same weights (tg / pp512 by llama-bench, built by ../shared/tools/llamacpp.sh)",
    )
    parser.add_argument("--ct2-child", action="store_true", help=argparse.SUPPRESS)  # see ct2_in_child
    args = parser.parse_args()
    if args.ct2_child:
        ct2_child()
        return
    if args.ttft:
        ttft = time_to_first_token(max(args.repeats, 5), args.checkpoint)
        ratio = ttft["gptmini generate"] / ttft["import torch"]
        print(
            f"cold gptmini generate → first token {ttft['gptmini generate']:.2f} s; "
            f"python -c 'import torch' {ttft['import torch']:.2f} s; ratio {ratio:.2f}×"
        )
        return
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    results, qual, peers = [], [], []
    reads: dict[str, list[dict[str, float]]] = {}  # per shape, per repeat
    shapes = ["checkpoint"] if args.checkpoint else args.shapes.split(",")
    for name in shapes:
        if args.checkpoint:
            from gptmini.loading import load_checkpoint

            base, _ = load_checkpoint(args.checkpoint)
        else:
            torch.manual_seed(0)
            base = GPT(GPTConfig(**SHAPES[name])).eval()
        if base.config.vocabulary is not None and not args.quality_only:
            print(
                "a compact-vocabulary checkpoint has no transformers twin: speed rows skipped",
                file=sys.stderr,
            )
        elif not args.quality_only:
            with tempfile.TemporaryDirectory() as tmp:
                export_hf(base, tmp)
                hf = transformers.GPT2LMHeadModel.from_pretrained(tmp).eval()
                rows, reads[name] = bench_shape(name, base, hf, Path(tmp), args)
                results += rows
                if args.llamacpp:
                    peers += llamacpp_rows(name, Path(tmp), rows, args)
        if args.checkpoint and args.quality_text.exists():
            qual = quality(base, args.quality_text.read_text(encoding="utf-8"))

    if results:
        print(
            f"\ntorch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, greedy, "
            f"batch 1, medians of {args.repeats}; decode tokens/s over {args.tokens} new tokens "
            f"({max(8, args.tokens // 8)} for --no-kv-cache), prefill excluded\n"
            f"read bandwidth ({args.threads} threads, 1 GiB, best of 2, before each repeat's rows; GB/s reduction / "
            "fp32 matrix-vector by torch.mv / by gptmini's kernel): "
            + "; ".join(
                f"{name} " + ", ".join(" / ".join(f"{gb:.1f}" for gb in r.values()) for r in shape_reads)
                for name, shape_reads in reads.items()
            )
            + "; ceiling = the median of each repeat's better read / weight bytes per token\n"
        )
        header = f"| {'shape':<10} | {'row':<28} | {'tokens/s':>9} | {'vs transformers':>15} | {'MB/token':>8} | {'ceiling tok/s':>13} | {'of ceiling':>10} | {'ms/token @100–200':>17} | {'ms/token @800–900':>17} | {'late/early':>10} |"
        print(header)
        print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
        for r in results:
            print(
                f"| {r['shape']:<10} | {r['row']:<28} | {r['tokens_per_s']:>9.1f} | {r['ratio']:>14.2f}× | "
                f"{r['weight_mb']:>8.1f} | {r['ceiling']:>13.1f} | {r['tokens_per_s'] / r['ceiling']:>9.0%} | "
                f"{r['ms_100_200']:>17.2f} | {r['ms_800_900']:>17.2f} | {r['ms_800_900'] / r['ms_100_200']:>10.2f} |"
            )
    if peers:
        print(
            "\n| shape | gptmini / llama.cpp | decode tok/s | llama-bench tg | ratio | prefill 512 tok/s | pp512 | ratio |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for p in peers:
            print(
                f"| {p['shape']} | {p['pair']} | {p['ours']:.1f} | {p['tg']:.1f} | {p['ours'] / p['tg']:.2f}× | "
                f"{p['ours_pp']:.0f} | {p['pp']:.0f} | {p['ours_pp'] / p['pp']:.2f}× |"
            )
    if qual:
        print(f"\nquality on {args.quality_text} (bits per byte; greedy 64-token continuations vs fp32)\n")
        print("| row | bits/byte | vs fp32 | identical continuations | mean tokens before divergence |")
        print("|---|---|---|---|---|")
        ref = qual[0]["bits_per_byte"]
        for q in qual:
            print(
                f"| {q['row']} | {q['bits_per_byte']:.4f} | {100 * (q['bits_per_byte'] / ref - 1):+.2f}% | "
                f"{q['identical']}/{q['prompts']} | {q['mean_agree']:.1f} |"
            )


if __name__ == "__main__":
    main()
