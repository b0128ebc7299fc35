"""Prompt-lookup decoding (`--lookup N`) against plain decoding: decode tokens/s, one process, rows interleaved
within each repeat, medians.

Workloads (each: greedy and sampled at temperature 0.8, top-k 200, as `gptmini generate` samples by default):
  * ordinary: a scene opening the model continues freely;
  * quoted passage: a Hamlet passage, then its first line again — text that a model able to copy continues by
    copying, the case prompt lookup is for.
Models: the shipped default model, and (with --copier DIR) the same model fine-tuned for three minutes on passages
that each appear twice (`--train-copier` writes it), so it has learnt to continue a passage it has seen; the
default model itself rarely copies a quotation, so on it the quoted passage is mostly "ordinary" text.
Each row also says how much of the output came from kept draft tokens and (greedy) whether the text is identical.
The verify pass's cost: ms of one cached forward of 1 + k tokens against one decode step, here and on a GPT-2
small shape (random weights), which is what a refused draft costs.

    flock /tmp/gptmini-heavy.lock python scripts/bench_lookup.py --train-copier runs/lookup-copier   # once, 3 min
    flock /tmp/gptmini-heavy.lock python scripts/bench_lookup.py --copier runs/lookup-copier/best
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import gptmini
from gptmini import lookup
from gptmini.config import GPTConfig, SamplingConfig
from gptmini.decode_step import DecodeStep
from gptmini.decoding import GenerationStats
from gptmini.generation import generate_tokens
from gptmini.kv_cache import KVCache
from gptmini.model import GPT
from gptmini.quantize import prepare_for_decoding

QUOTE = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
    "And by opposing end them. To die: to sleep;\n"
    "No more; and by a sleep to say we end\n"
    "The heart-ache and the thousand natural shocks\n"
    "That flesh is heir to, 'tis a consummation\n"
    "Devoutly to be wish'd.\n\n"
)
PROMPTS = {
    "ordinary": "ROMEO:\nWhat light through yonder window breaks?",
    "quoted passage": QUOTE + QUOTE.split("\n")[0] + "\n",
}
SAMPLINGS = {"greedy": dict(temperature=0.0), "T=0.8 top-k 200": dict(temperature=0.8, top_k=200)}


def train_copier(out: Path, seconds: int) -> None:
    """Fine-tune the default model on Shakespeare passages written twice each (a passage, a blank line, it again)."""
    text = Path("data/shakespeare.txt").read_text(encoding="utf-8")
    lines = text[200_000:1_700_000].split("\n")
    passages = ["\n".join(lines[i : i + 6]).strip() for i in range(0, len(lines) - 6, 6)]
    corpus = "".join(f"{p}\n\n{p}\n\n" for p in passages if len(p) > 80)
    out.mkdir(parents=True, exist_ok=True)
    (out / "doubled.txt").write_text(corpus, encoding="utf-8")
    cmd = [sys.executable, "-m", "gptmini", "train", str(out / "doubled.txt"), "--out", str(out), "--force"]
    cmd += [
        "--init-from",
        "checkpoints/default",
        "--time",
        f"{seconds}s",
        "--lr",
        "1e-3",
        "--warmup-iters",
        "20",
    ]
    cmd += ["--device", "cpu"]
    print(" ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)


# each verify pass's net as the drafter books it (`Drafter.pass_net`), in plain steps saved
PASSES: list[float] = []


def _booking_verified(verified):
    def wrapper(self: lookup.Drafter, kept: int, seconds: float | None = None) -> None:
        PASSES.append(self.pass_net(kept, seconds))
        verified(self, kept, seconds)

    return wrapper


lookup.Drafter.verified = _booking_verified(lookup.Drafter.verified)


def decode(model: GPT, prompt: list[int], n: int, sampling: SamplingConfig, lookup: int):
    """Stats, the tokens, and the steps the passes saved (the drafter's own booking; negative: lost)."""
    stats = GenerationStats()
    PASSES.clear()
    out = [
        t[0]
        for t in generate_tokens(
            model, prompt, max_new_tokens=n, sampling=sampling, stats=stats, lookup=lookup
        )
    ]
    return stats, out, sum(PASSES)


def bench_model(name: str, lm, args: argparse.Namespace) -> list[dict]:
    rows = []
    for prompt_name, text in PROMPTS.items():
        prompt = lm.tokenizer.encode(text)
        for sampling_name, fields in SAMPLINGS.items():
            speeds: dict[int, list[float]] = {n: [] for n in args.lookup}
            kept: dict[int, list[float]] = {n: [] for n in args.lookup}
            saved: dict[int, list[float]] = {n: [] for n in args.lookup}
            texts: dict[int, list[int]] = {}
            for rep in range(args.repeats):
                sampling = SamplingConfig(**fields, seed=rep)
                for n in args.lookup:
                    stats, out, net = decode(lm.model, prompt, args.tokens, sampling, n)
                    speeds[n].append(stats.decode_tokens_per_s)
                    saved[n].append(net / stats.new_tokens)
                    kept[n].append(stats.lookup_accepted / stats.new_tokens)
                    texts.setdefault(n, out)
            plain = statistics.median(speeds[0])
            for n in args.lookup:
                rows.append(
                    dict(
                        model=name,
                        prompt=prompt_name,
                        sampling=sampling_name,
                        lookup=n,
                        tokens_per_s=statistics.median(speeds[n]),
                        ratio=statistics.median(speeds[n]) / plain,
                        kept=statistics.median(kept[n]),
                        saved=statistics.mean(saved[n]),
                        identical=(texts[n] == texts[0]) if fields["temperature"] == 0 else None,
                    )
                )
            print(f"[{name}] {prompt_name}, {sampling_name} done", file=sys.stderr, flush=True)
    return rows


@torch.inference_mode()
def pass_cost(model: GPT, ks: list[int], repeats: int, position: int = 100) -> dict[int, float]:
    """Median ms of one cached forward of 1 + k tokens at `position` (k = 0: the plain path's decode step), as
    generation runs it: one native call where the kernels are built (`DecodeStep.forward`), else the model's."""
    cache = KVCache.for_model(model)
    ids = torch.randint(0, model.config.vocab_size, (1, position + max(ks) + 1))
    model(ids[:, :position], cache=cache)
    native_step = DecodeStep.for_model(model, cache)
    out = {}
    for k in ks:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            if native_step is not None:
                native_step.forward(ids[0, position : position + 1 + k].tolist(), position)
            else:
                model(ids[:, position : position + 1 + k], cache=cache, start_pos=position)
            times.append(time.perf_counter() - t)
        out[k] = 1000 * statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/default"))
    parser.add_argument("--copier", type=Path, help="the fine-tuned copier (see --train-copier)")
    parser.add_argument(
        "--train-copier", type=Path, metavar="DIR", help="write the copier run to DIR and exit"
    )
    parser.add_argument("--train-seconds", type=int, default=180)
    parser.add_argument("--lookup", type=lambda s: [0, *map(int, s.split(","))], default=[0, 4, 8])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-pass-cost", action="store_true")
    args = parser.parse_args()
    if args.train_copier:
        train_copier(args.train_copier, args.train_seconds)
        return
    torch.set_num_threads(args.threads)
    models = {"default": args.checkpoint}
    if args.copier:
        models["copier"] = args.copier
    rows = []
    for name, path in models.items():
        lm = gptmini.load(path, device="cpu")  # as `gptmini generate` loads it: fp32, packed linears
        for _ in range(2):  # warm-up
            decode(
                lm.model, lm.tokenizer.encode(QUOTE), 32, SamplingConfig(temperature=0.0), max(args.lookup)
            )
        rows += bench_model(name, lm, args)

    print(
        f"\ntorch {torch.__version__}, {args.threads} threads, batch 1, fp32, {args.tokens} new tokens, "
        f"medians of {args.repeats} (sampled rows: seeds 0..{args.repeats - 1}); decode tokens/s, prefill excluded; "
        "kept = share of the new tokens that were kept draft tokens; booked = the passes' net as the drafter books "
        "it (kept + 1 tokens minus each pass's time in plain steps), over the plain run's steps: the ratio it "
        "predicts, free of the machine's drift between rows\n"
    )
    print(
        "| model | prompt | sampling | lookup | tokens/s | vs plain | booked | kept | greedy text identical |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        same = "" if r["identical"] is None else ("yes" if r["identical"] else "NO")
        print(
            f"| {r['model']} | {r['prompt']} | {r['sampling']} | {r['lookup'] or 'off'} | {r['tokens_per_s']:.0f} | "
            f"{r['ratio']:.2f}× | {1 / (1 - r['saved']):.2f}× | {100 * r['kept']:.0f}% | {same} |"
        )
    if args.no_pass_cost:
        return
    ks = [0, 1, 2, 4, 8]
    print("\nverify pass cost: ms per cached forward of 1 + k tokens at position 100 (k = 0: a plain step)\n")
    print("| model | " + " | ".join(f"k={k}" for k in ks) + " |")
    print("|---|" + "---:|" * len(ks))
    lm = gptmini.load(args.checkpoint, device="cpu")
    shapes = {"default (4×192)": lm.model}
    torch.manual_seed(0)
    shapes["GPT-2 small shape"] = prepare_for_decoding(
        GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024)).eval()
    )
    for name, model in shapes.items():
        cost = pass_cost(model, ks, repeats=max(args.repeats, 5) * 4)
        print(f"| {name} | " + " | ".join(f"{cost[k]:.2f}" for k in ks) + " |")


if __name__ == "__main__":
    main()
