"""Training throughput of gptmini against a nanoGPT-style reference step, on the same machine in the same run.

    python scripts/bench_train.py                 # matmul peak, then tokens/s and MFU, with ratios
    python scripts/bench_train.py --curves 300    # also: loss per step, default dtype vs fp32 vs the reference
    python scripts/bench_train.py --curves 100 --curves-of gptmini-gpt2vocab,gptmini-fp32   # only the dtype pair

Config (the issue's): 4 layers, 4 heads, n_embd 256, block 256, batch 8, GPT-2 vocab, CPU, 2 threads.
Each measurement runs in its own subprocess, so allocator state and thread pools never leak between them.
The reference is written here the way nanoGPT's model.py/train.py do it: fp32, full logits for every position,
F.cross_entropy over them, AdamW (not fused on CPU) with decay on matrices, clipping at 1.0.
Contestants: the reference; gptmini-default (what `gptmini train` does: a compact vocabulary of 4,096 tokens, bf16
autocast where the CPU has it, Muon for the blocks' matrices); gptmini-gpt2vocab (all 50,257 ids, same dtype);
gptmini-fp32 (all ids, fp32); gptmini-adamw (all ids, default dtype, AdamW like the reference: the step without
Muon's Newton–Schulz iterations, which MFU does not count).
MFU = tokens/s × (6·N + 12·L·T·C) / (best matmul FLOP/s measured in this run), N counting each row's own head.

`--nanogpt DIR` adds nanoGPT's own `train.py` as a contestant (DIR: a checkout of github.com/karpathy/nanoGPT,
which is not part of this project): it runs in a scratch directory on the same config and the shipped corpus's
GPT-2 tokens, `--device=cpu --compile=False`, one micro-batch per step, and its own per-iteration times are read
from its log. nanoGPT computes in fp32 on the CPU whatever its `--dtype` says.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = dict(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=50257)
BATCH = 8
NANOGPT_REPORTED_TOKENS_PER_S = 885  # the nanoGPT run on this config


# ---- the nanoGPT-style reference ------------------------------------------------------------------------------


def reference_model():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    c = CONFIG

    class CausalSelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(c["n_embd"], 3 * c["n_embd"])
            self.c_proj = nn.Linear(c["n_embd"], c["n_embd"])
            self.n_head = c["n_head"]

        def forward(self, x):
            B, T, C = x.size()
            q, k, v = self.c_attn(x).split(C, dim=2)
            k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(c["n_embd"], 4 * c["n_embd"])
            self.gelu = nn.GELU()
            self.c_proj = nn.Linear(4 * c["n_embd"], c["n_embd"])

        def forward(self, x):
            return self.c_proj(self.gelu(self.c_fc(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(c["n_embd"])
            self.attn = CausalSelfAttention()
            self.ln_2 = nn.LayerNorm(c["n_embd"])
            self.mlp = MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(c["vocab_size"], c["n_embd"])
            self.wpe = nn.Embedding(c["block_size"], c["n_embd"])
            self.h = nn.ModuleList([Block() for _ in range(c["n_layer"])])
            self.ln_f = nn.LayerNorm(c["n_embd"])
            self.lm_head = nn.Linear(c["n_embd"], c["vocab_size"], bias=False)
            self.wte.weight = self.lm_head.weight
            self.apply(self._init)
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c["n_layer"]))

        @staticmethod
        def _init(m):
            if isinstance(m, nn.Linear):
                torch.nn.init.normal_(m.weight, mean=0.0, std=0.02)
                if m.bias is not None:
                    torch.nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                torch.nn.init.normal_(m.weight, mean=0.0, std=0.02)

        def forward(self, idx, targets):
            pos = torch.arange(idx.shape[1], dtype=torch.long)
            x = self.wte(idx) + self.wpe(pos)
            for block in self.h:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return logits, F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1
            )

    model = GPT()
    # Same starting weights as gptmini's model of the same seed, so the loss curves compare step by step.
    from gptmini.config import GPTConfig
    from gptmini.model import GPT as GptminiGPT

    torch.manual_seed(torch.initial_seed())
    theirs = GptminiGPT(GPTConfig(**CONFIG)).state_dict()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            source = theirs["transformer." + name] if "transformer." + name in theirs else theirs[name]
            p.copy_(source[: p.shape[0]] if name in ("wte.weight", "lm_head.weight") else source)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    # nanoGPT: fused AdamW only on CUDA, so the default (foreach) implementation on CPU.
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=6e-4,
        betas=(0.9, 0.95),
    )

    def step(x, y):
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return model, step


# ---- gptmini ---------------------------------------------------------------------------------------------------


def compact_tokenizer():
    """The compact vocabulary `gptmini train` picks by default (`--vocab 4096`: the train split's most frequent)."""
    from gptmini.config import TrainConfig
    from gptmini.data import load_corpus
    from gptmini.tokenizer import Tokenizer

    config = TrainConfig()
    train_tokens, _ = load_corpus([ROOT / "data" / "shakespeare.txt"]).split(config.val_fraction)
    return Tokenizer.for_text_tokens(train_tokens, max_size=config.vocab_limit)


def gptmini_step(dtype_name: str, compact: bool = False, optimizer: str = "muon"):
    import numpy as np
    import torch

    from gptmini.config import GPTConfig, TrainConfig
    from gptmini.devices import keep_freed_memory_on_cpu, resolve_train_dtype
    from gptmini.model import GPT
    from gptmini.optim import make_optimizer
    from gptmini.train import LossModel, train_step

    device = torch.device("cpu")
    keep_freed_memory_on_cpu()  # what `gptmini train` does on CPU
    dtype = resolve_train_dtype(dtype_name, device)
    tcfg = TrainConfig(batch_size=BATCH, max_iters=1, lr=6e-4, optimizer=optimizer)
    config = GPTConfig(**CONFIG)
    if compact:
        tok = compact_tokenizer()
        config = config.replace(vocab_size=tok.n_vocab, vocabulary=tok.vocabulary.tolist())
    gpt = GPT(config)
    loss_model = LossModel(gpt)
    optimizer = make_optimizer(gpt, tcfg, device, dtype=dtype)

    class Fixed:
        def __init__(self):
            self.xy = None

        def batch(self, step, micro=0):
            return self.xy

    source = Fixed()

    def step(x, y):
        if compact:
            # The same text in the model's numbering; rarer tokens become pieces, so cut back to T + 1.
            rows = torch.cat([x[:, :1], y], dim=1).numpy()
            rows = torch.from_numpy(np.stack([tok.from_gpt2(r)[: rows.shape[1]] for r in rows]))
            x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        source.xy = (x, y)
        return train_step(loss_model, optimizer, source, 0, device=device, dtype=dtype, config=tcfg)[0]

    return gpt, step, dtype


def batches(n: int, seed: int = 0):
    """The same random windows of the shipped corpus for every contestant."""
    import numpy as np
    import torch

    from gptmini.data import load_corpus

    tokens = load_corpus([ROOT / "data" / "shakespeare.txt"]).tokens
    rng = np.random.default_rng(seed)
    T = CONFIG["block_size"]
    for _ in range(n):
        ix = rng.integers(0, len(tokens) - T - 1, size=BATCH)
        rows = torch.from_numpy(np.stack([tokens[i : i + T + 1].astype(np.int64) for i in ix]))
        yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


# ---- workers (one per subprocess) -----------------------------------------------------------------------------


def worker(kind: str, steps: int, warmup: int, threads: int, seed: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if kind == "matmul":
        from gptmini.devices import measure_matmul_flops

        cpu = torch.device("cpu")
        shapes = [(2048, 1024, 1024), (2048, 256, 50304)]
        out = {}
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            out[name] = max(measure_matmul_flops(cpu, dt, s, seconds=1.0) for s in shapes)
            # `a @ b` allocating its output each time (page faults included): the naive figure.
            a, b = torch.randn(2048, 1024).to(dt), torch.randn(1024, 1024).to(dt)
            times = []
            for _ in range(20):
                start = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - start)
            out[name + "_naive"] = 2 * 2048 * 1024 * 1024 / statistics.median(times)
        return out
    if kind == "reference":
        _model, step = reference_model()
        dtype = "float32"
    else:
        dtype_name = "float32" if kind == "gptmini-fp32" else "auto"
        optimizer = "adamw" if kind == "gptmini-adamw" else "muon"
        _model, step, dt = gptmini_step(dtype_name, compact=kind == "gptmini-default", optimizer=optimizer)
        dtype = str(dt).removeprefix("torch.")
    times, losses = [], []
    for i, (x, y) in enumerate(batches(warmup + steps, seed)):
        start = time.perf_counter()
        losses.append(step(x, y))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"dtype": dtype, "step_s": statistics.median(times), "times": times, "losses": losses}


def nanogpt_train(checkout: Path, steps: int, warmup: int, threads: int, seed: int) -> dict:
    """nanoGPT's own train.py on CONFIG: median seconds per iteration from its `iter N: ... time Tms` lines."""
    import os
    import re
    import tempfile

    import numpy as np

    from gptmini.data import load_corpus

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        for name in (
            "train.py",
            "model.py",
            "configurator.py",
        ):  # train.py reads configurator.py from its cwd
            (work / name).symlink_to(checkout.resolve() / name)
        data = work / "data" / "bench"
        data.mkdir(parents=True)
        train_tokens, val_tokens = load_corpus([ROOT / "data" / "shakespeare.txt"]).split(0.1)
        np.asarray(train_tokens, dtype=np.uint16).tofile(data / "train.bin")
        np.asarray(val_tokens, dtype=np.uint16).tofile(data / "val.bin")
        flags = dict(
            dataset="bench", device="cpu", compile=False, dtype="float32", batch_size=BATCH,
            block_size=CONFIG["block_size"], n_layer=CONFIG["n_layer"], n_head=CONFIG["n_head"],
            n_embd=CONFIG["n_embd"], dropout=0.0, bias=True, gradient_accumulation_steps=1,
            max_iters=warmup + steps, log_interval=1, eval_interval=10**9, eval_iters=1, out_dir="out",
        )  # fmt: skip
        cmd = [sys.executable, "train.py", *(f"--{k}={v}" for k, v in flags.items())]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"nanoGPT's train.py failed:\n{proc.stderr[-2000:]}")
    times = {
        int(i): float(ms) / 1e3
        for i, ms in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", proc.stdout)
    }
    timed = [t for i, t in sorted(times.items()) if i > warmup]  # iteration 0 includes its first evaluation
    return {"dtype": "float32", "step_s": statistics.median(timed), "times": timed, "losses": []}


def run_worker(kind: str, args) -> dict:
    if kind == "nanogpt":
        return nanogpt_train(Path(args.nanogpt), args.steps, args.warmup, args.threads, args.seed)
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    cmd += ["--threads", str(args.threads), "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{kind} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def flops_per_token(vocab_size: int = CONFIG["vocab_size"]) -> int:
    import torch

    from gptmini.config import GPTConfig
    from gptmini.model import GPT

    with torch.device("meta"):
        model = GPT(GPTConfig(**{**CONFIG, "vocab_size": vocab_size}))
    # 6·N + 12·L·T·C with N = the weights each token multiplies through (blocks + LM head), as the issue defines.
    return model.flops_per_token(training=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per contestant (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each contestant, interleaved")
    parser.add_argument("--curves", type=int, default=0, help="also log the loss of the first N steps")
    parser.add_argument(
        "--curves-of",
        default="gptmini-gpt2vocab,gptmini-fp32,gptmini-adamw,reference",
        help="contestants whose loss curves to log (the first two are compared: default dtype vs fp32)",
    )
    parser.add_argument("--nanogpt", metavar="DIR", help="a nanoGPT checkout: also time its own train.py")
    args = parser.parse_args()
    if args.nanogpt and not (Path(args.nanogpt) / "train.py").is_file():
        parser.error(f"--nanogpt {args.nanogpt}: no train.py there; give a checkout of karpathy/nanoGPT")
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup, args.threads, args.seed)))
        return

    peak = run_worker("matmul", args)
    best = max(peak["fp32"], peak["bf16"])
    print(
        f"matmul ({args.threads} threads, output buffer reused): fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s; allocating `a @ b`: fp32 {peak['fp32_naive'] / 1e9:.0f}, "
        f"bf16 {peak['bf16_naive'] / 1e9:.0f} GFLOP/s",
        flush=True,
    )
    fpt = flops_per_token()
    compact_vocab = compact_tokenizer().n_vocab
    fpt_by_kind = {"gptmini-default": flops_per_token(compact_vocab)}
    tokens_per_step = BATCH * CONFIG["block_size"]
    kinds = ["reference", "gptmini-default", "gptmini-gpt2vocab", "gptmini-fp32", "gptmini-adamw"]
    kinds += ["nanogpt"] if args.nanogpt else []
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    for _ in range(args.repeats):
        for kind in kinds:
            results[kind].append(run_worker(kind, args))
    rows = {}
    for kind in kinds:
        step_s = statistics.median(r["step_s"] for r in results[kind])
        tps = tokens_per_step / step_s
        f = fpt_by_kind.get(kind, fpt)
        rows[kind] = (results[kind][0]["dtype"], step_s, tps, tps * f / best, tps * f / peak["fp32"])
    ref_tps = rows["reference"][2]
    print(
        f"config {CONFIG}, batch {BATCH}; {fpt / 1e6:.1f} MFLOP per token (6N + 12LTC); gptmini-default = what "
        f"`gptmini train` does: compact vocabulary ({compact_vocab:,} tokens, {fpt_by_kind['gptmini-default'] / 1e6:.1f} "
        "MFLOP per token) and bf16 autocast where the CPU has it"
    )
    measured = "nanogpt" in rows  # nanoGPT's own train.py ran in this run: ratios against it too
    print(
        f"{'step':<18}{'dtype':<10}{'s/step':>8}{'tokens/s':>10}{'MFU(best)':>11}{'MFU(fp32)':>11}{'× ref':>8}"
        + (f"{'× nanoGPT':>11}" if measured else "")
    )
    for kind in kinds:
        dtype, step_s, tps, mfu, mfu32 = rows[kind]
        print(
            f"{kind:<18}{dtype:<10}{step_s:>8.3f}{tps:>10.0f}{mfu:>11.3f}{mfu32:>11.3f}{tps / ref_tps:>8.2f}"
            + (f"{tps / rows['nanogpt'][2]:>11.2f}" if measured else "")
        )
    if not measured:
        print(
            f"vs nanoGPT's reported {NANOGPT_REPORTED_TOKENS_PER_S} tokens/s (another machine): "
            + ", ".join(f"{k} {rows[k][2] / NANOGPT_REPORTED_TOKENS_PER_S:.2f}×" for k in kinds[1:])
        )
    if args.curves:
        args.steps, args.warmup = args.curves, 0
        curve_kinds = args.curves_of.split(",")
        curves = {kind: run_worker(kind, args)["losses"] for kind in curve_kinds}
        print("\nloss per step (same batches, same initial weights)")
        first, second = curve_kinds[:2]
        print(f"{'steps':<12}" + "".join(f"{k:>18}" for k in curve_kinds) + f"{'|1st - 2nd|':>16}")
        bucket = max(1, args.curves // 15)
        for start in range(0, args.curves, bucket):
            means = {k: statistics.fmean(curves[k][start : start + bucket]) for k in curve_kinds}
            diff = abs(means[first] - means[second])
            print(
                f"{start:>4}-{min(start + bucket, args.curves) - 1:<7}"
                + "".join(f"{means[k]:>18.4f}" for k in curve_kinds)
                + f"{diff:>16.4f}"
            )
        diffs = [abs(a - b) for a, b in zip(curves[first], curves[second], strict=False)]
        print(
            f"max |{first} − {second}| over {args.curves} steps: {max(diffs):.4f} nats "
            f"(mean {statistics.fmean(diffs):.4f})"
        )


if __name__ == "__main__":
    main()
