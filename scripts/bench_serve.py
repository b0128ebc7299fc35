"""Serving benchmark: `gptmini serve` under 1, 4, 8 and 16 concurrent streaming clients, beside llama.cpp's
`llama-server` (f32 and q8_0 GGUF converted from the same GPT-2 directory) and `transformers serve
--continuous-batching`, in the same run.

Each client is `openai.AsyncOpenAI` on loopback asking for 128 new tokens (greedy, EOS ignored where the server
allows it). Per level: aggregate tokens/s (all tokens / wall time), time to first token p50/p99, inter-token
latency p50/p99 (gaps between a stream's chunks). One client is also compared with `gptmini generate`'s decode
tokens/s on the same model (the lone request must not pay for the batch), and the KV cache per slot is reported.

    python scripts/bench_serve.py --configs gptmini-fp32 llamacpp-f32 gptmini-int8 llamacpp-q8_0 --levels 1 8 16
    python scripts/bench_serve.py --configs gptmini-fp32 --levels 1 8

llama.cpp is built and the GGUF files converted by `../shared/tools/llamacpp.sh` (cached outside the repo; set
LLAMACPP_SH to another copy). `transformers serve` needs `pip install accelerate` besides transformers. Both are
bench-only peers: gptmini never imports or ships them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = (
    "gptmini-fp32",
    "gptmini-int8",
    "gptmini-default",
    "llamacpp-f32",
    "llamacpp-q8_0",
    "transformers-cb",
)
LLAMACPP_SH = Path(os.environ.get("LLAMACPP_SH", ROOT.parent / "shared" / "tools" / "llamacpp.sh"))
PROMPT = "The history of the city begins in the valley where the river"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_gpt2_dir(path: Path) -> Path:
    """A GPT-2 small with random weights, saved as a Hugging Face directory with tokenizer files."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(path)
    write_gpt2_tokenizer(path)
    return path


def write_gpt2_tokenizer(path: Path) -> list[str]:
    """Write vocab.json / merges.txt / tokenizer_config.json for GPT-2's BPE into `path`; return id → token string.

    They are written from the GPT-2 ranks gptmini ships (no download): every multi-byte token is a merge of the two
    tokens it was merged from, in rank order, spelled in GPT-2's byte-to-unicode alphabet.
    """
    from gptmini.tokenizer import EOT, EOT_ID, _gpt2_ranks, byte_level, merged_from

    ranks = _gpt2_ranks()
    vocab = {byte_level(token): rank for token, rank in ranks.items()}
    vocab[EOT] = EOT_ID
    merges = ["#version: 0.2"]
    for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            a, b = merged_from(token)
            merges.append(f"{byte_level(a)} {byte_level(b)}")
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "GPT2Tokenizer", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
        ),
        encoding="utf-8",
    )
    by_id = [""] * (EOT_ID + 1)
    for token, i in vocab.items():
        by_id[i] = token
    return by_id


class Running:
    def __init__(self, cmd: list[str], port: int, env: dict[str, str]) -> None:
        self.port = port
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (read on failure, closed with the process)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{port}"

    def wait_ready(self, path: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"server exited: {self.log.read().decode(errors='replace')[-3000:]}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit("server not ready in time")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_client(client: openai.AsyncOpenAI, model: str, tokens: int, extra: dict) -> dict:
    start = time.perf_counter()
    stamps = []
    usage = None
    stream = await client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        if getattr(chunk, "usage", None):
            usage = chunk.usage.completion_tokens
    return {"start": start, "stamps": stamps, "tokens": usage or len(stamps)}


async def level(url: str, model: str, clients: int, tokens: int, extra: dict) -> dict:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_client(client, model, tokens, extra) for _ in range(clients)))
        wall = time.perf_counter() - t0
    ttft = [r["stamps"][0] - r["start"] for r in results if r["stamps"]]
    itl = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:], strict=False)]
    total = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "tokens_per_s": total / wall,
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "itl_p50": pct(itl, 50),
        "itl_p99": pct(itl, 99),
        "tokens": total,
    }


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def generate_tokens_per_s(
    checkpoint: Path,
    quantize: str | None,
    tokens: int,
    threads: int,
    device: str = "cpu",
    dtype: str = "auto",
) -> tuple[float, int]:
    """`gptmini generate`'s decode tokens/s on the same model (greedy, EOS ignored, median of 3), and the KV-cache
    bytes one serving slot holds."""
    import torch

    import gptmini
    from gptmini.decoding import GenerationStats

    torch.set_num_threads(threads)
    lm = gptmini.load(checkpoint, device=device, dtype=dtype, quantize=quantize)
    rates = []
    for _ in range(3):
        stats = GenerationStats()
        lm.generate(PROMPT, max_new_tokens=tokens, temperature=0, ignore_eos=True, stats=stats)
        rates.append(stats.decode_tokens_per_s)
    from gptmini.engine import Engine

    return statistics.median(rates), Engine(lm, parallel=1).cache_bytes_per_slot()


def llamacpp_gguf(hf_dir: Path, kind: str) -> Path:
    """The GGUF file of `hf_dir` in `kind` (f32 or q8_0), converted by llamacpp.sh once and kept beside it."""
    out = hf_dir.with_name(f"{hf_dir.name}-{kind}.gguf")
    if not out.exists():
        subprocess.run(["bash", str(LLAMACPP_SH), "convert", str(hf_dir), str(out), kind], check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--levels", nargs="+", type=int, default=[1, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="where the servers run (int8 is CPU-only)"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    gpt2 = write_gpt2_dir(work / "gpt2-small-random")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    rows = []
    for name in args.configs:
        port = free_port()
        if name.startswith("gptmini"):
            ckpt = ROOT / "checkpoints" / "default" if name == "gptmini-default" else gpt2
            quantize = "int8" if name == "gptmini-int8" else None
            cmd = [
                sys.executable,
                "-m",
                "gptmini",
                "serve",
                "-c",
                str(ckpt),
                "--device",
                args.device,
                "--port",
                str(port),
                "--threads",
                str(args.threads),
                "--parallel",
                str(args.parallel),
                "--no-ui",
            ]
            cmd += ["--quantize", quantize] if quantize else []
            dtype = "float32" if name == "gptmini-fp32" else "auto"  # auto is bf16 on CUDA
            cmd += ["--dtype", dtype]
            ready, model, extra = "/health", ckpt.name, {"ignore_eos": True}
        elif name.startswith("llamacpp"):
            ckpt, quantize = gpt2, None
            gguf = llamacpp_gguf(gpt2, name.split("-")[1])
            bin_dir = Path(subprocess.check_output(["bash", str(LLAMACPP_SH), "build"], text=True).strip())
            cmd = [str(bin_dir / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
            cmd += ["-t", str(args.threads), "-np", str(args.parallel), "-c", str(1024 * args.parallel)]
            ready, model, extra = "/health", gguf.name, {"ignore_eos": True}
        else:
            ckpt, quantize = gpt2, None
            cmd = [
                "transformers",
                "serve",
                str(gpt2),
                "--continuous-batching",
                "--device",
                args.device,
                "--dtype",
                "float32",
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
            ]
            ready, model, extra = "/health", str(gpt2), {}
        server = Running(cmd, port, env)
        try:
            server.wait_ready(ready)
            asyncio.run(level(server.url, model, 1, 8, extra))  # warm-up (lazy loads, first kernels)
            rss_idle = server.rss_mib()
            for clients in args.levels:
                row = {"config": name, **asyncio.run(level(server.url, model, clients, args.tokens, extra))}
                row["rss_mib"] = server.rss_mib()
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            server.stop()
        if not name.startswith("gptmini"):
            rows.append({"config": name, "rss_idle_mib": rss_idle})
        else:
            rate, slot = generate_tokens_per_s(ckpt, quantize, args.tokens, args.threads, args.device, dtype)
            rows.append(
                {
                    "config": name,
                    "generate_tokens_per_s": rate,
                    "rss_idle_mib": rss_idle,
                    "kv_mib_per_slot": slot / 2**20,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    print("\n| config | clients | tokens/s | × 1 client | TTFT p50 / p99 ms | ITL p50 / p99 ms |")
    print("|---|---:|---:|---:|---|---|")
    single = {r["config"]: r["tokens_per_s"] for r in rows if r.get("clients") == 1}
    for r in rows:
        if "clients" not in r:
            continue
        x = r["tokens_per_s"] / single[r["config"]] if r["config"] in single else float("nan")
        print(
            f"| {r['config']} | {r['clients']} | {r['tokens_per_s']:.1f} | {x:.2f} | "
            f"{r['ttft_p50'] * 1e3:.0f} / {r['ttft_p99'] * 1e3:.0f} | {r['itl_p50'] * 1e3:.1f} / {r['itl_p99'] * 1e3:.1f} |"
        )
    for r in rows:
        if "rss_idle_mib" in r:
            loaded = [x["rss_mib"] for x in rows if x["config"] == r["config"] and "rss_mib" in x]
            print(
                f"{r['config']}: RSS idle {r['rss_idle_mib']:.0f} MiB, after its largest level {max(loaded):.0f} MiB"
            )
    for r in rows:
        if "generate_tokens_per_s" in r:
            one = single.get(r["config"], float("nan"))
            print(
                f"{r['config']}: gptmini generate {r['generate_tokens_per_s']:.1f} tokens/s; one client "
                f"{one:.1f} ({one / r['generate_tokens_per_s']:.2f}×); KV cache {r['kv_mib_per_slot']:.1f} MiB "
                f"per slot; idle RSS {r['rss_idle_mib']:.0f} MiB"
            )
    by = {(r["config"], r.get("clients")): r["tokens_per_s"] for r in rows if "clients" in r}
    pairs = [
        ("gptmini-fp32", "llamacpp-f32"),
        ("gptmini-int8", "llamacpp-q8_0"),
        ("gptmini-fp32", "transformers-cb"),
    ]
    for clients in sorted({r["clients"] for r in rows if "clients" in r}):
        for ours_name, peer in pairs:
            ours, theirs = by.get((ours_name, clients)), by.get((peer, clients))
            if ours and theirs:
                print(f"{clients} clients: {ours_name} / {peer} = {ours / theirs:.2f}×")


if __name__ == "__main__":
    main()
