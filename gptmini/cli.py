"""The `gptmini` command: parse flags, call the library, print. No model logic lives here.

torch is imported inside the commands, never at the top, so `gptmini --help` answers at once.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gptmini import __version__
from gptmini.errors import UserError

if TYPE_CHECKING:
    from concurrent.futures import Future

app = typer.Typer(
    name="gptmini",
    help="A small, hackable GPT: train on any text, generate, chat. Runs on CPU, one GPU, or many.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

CheckpointOpt = Annotated[
    Path | None,
    typer.Option(
        "-c",
        "--checkpoint",
        help="gptmini checkpoint dir or Hugging Face GPT-2 dir [default: checkpoints/default]",
    ),
]
DeviceOpt = Annotated[str, typer.Option(help="auto (cuda > mps > cpu), cpu, cuda, mps")]

# Options several commands share, each defined once (a new sampling flag is one line here and one per command).
TemperatureOpt = Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")]
TopKOpt = Annotated[int | None, typer.Option("--top-k", help="Keep the k most likely tokens.")]
TopPOpt = Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling threshold in (0, 1].")]
MinPOpt = Annotated[float | None, typer.Option("--min-p", help="Drop tokens below min_p × top probability.")]
RepetitionPenaltyOpt = Annotated[float, typer.Option(help="> 1 discourages repeats (1 = off).")]
DecodeDtypeOpt = Annotated[
    str, typer.Option(help="auto (bf16 on CUDA, else fp32), float32, bfloat16, float16")
]
QuantizeOpt = Annotated[
    str,
    typer.Option(
        help="none; int8, int4 (CPU): 8- or 4-bit weights, faster decoding (int4: a larger quality cost; "
        "int4-64 / int4-32: smaller groups, better quality, more bytes)."
    ),
]
LookupOpt = Annotated[
    int,
    typer.Option(
        "--lookup",
        metavar="N",
        help="Prompt-lookup decoding: check up to N tokens copied from earlier in the text per forward pass "
        "(same greedy text, same sampling distribution; faster on text that repeats). 0 = off.",
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="CPU threads [default: every core, and fewer while that is faster, as when another job holds one].",
    ),
]
SaveDtypeOpt = Annotated[
    str | None,
    typer.Option(
        help="Weights of best/ (for inference): float32 (default), bfloat16 or float16 (half the size)."
    ),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gptmini {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    pass


def _use_threads(threads: int | None) -> None:
    """`--threads`: a fixed count for torch and the native step (checked before anything is loaded)."""
    if threads is None:
        return
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    from gptmini.devices import set_threads

    set_threads(threads)


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _read_prompt(prompt: str | None) -> str:
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        return sys.stdin.read()
    return prompt or ""


@app.command()
def generate(
    prompt: Annotated[
        str | None,
        typer.Argument(
            help="Text to continue; '-' reads stdin, as does no prompt when stdin is piped (on a terminal, no "
            "prompt is an unconditional sample from <|endoftext|>)."
        ),
    ] = None,
    checkpoint: CheckpointOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")] = 200,
    temperature: TemperatureOpt = 0.8,
    top_k: TopKOpt = 200,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = 1.0,
    greedy: Annotated[bool, typer.Option("--greedy", help="Same as --temperature 0.")] = False,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop at this text (repeatable).")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep going past <|endoftext|>.")] = False,
    num_samples: Annotated[int, typer.Option("--num-samples", help="Continuations of one prompt.")] = 1,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print tokens as they come.")] = True,
    kv_cache: Annotated[
        bool, typer.Option("--kv-cache/--no-kv-cache", help="--no-kv-cache: reference path.")
    ] = True,
    stats: Annotated[bool, typer.Option("--stats", help="Print timing and memory to stderr.")] = False,
    device: DeviceOpt = "auto",
    dtype: DecodeDtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    compile: Annotated[
        bool, typer.Option("--compile", help="Compile the decode step (slow start; for long runs).")
    ] = False,
    show_attention: Annotated[
        Path | None,
        typer.Option(
            "--show-attention",
            metavar="FILE.html",
            help="Also write a page of what each new token attended to when it was generated.",
        ),
    ] = None,
    lookup: LookupOpt = 0,
    json_object: Annotated[
        bool, typer.Option("--json", help="Structured output: the text is one JSON object.")
    ] = False,
    json_schema: Annotated[
        Path | None,
        typer.Option(
            "--json-schema",
            metavar="FILE",
            help="Structured output: JSON valid under the JSON schema in FILE.",
        ),
    ] = None,
    regex: Annotated[
        str | None,
        typer.Option("--regex", metavar="PATTERN", help="Structured output: text matching PATTERN."),
    ] = None,
    choice: Annotated[
        list[str] | None,
        typer.Option("--choice", help="Structured output: exactly one of these texts (repeatable)."),
    ] = None,
    threads: ThreadsOpt = None,
) -> None:
    """Continue a prompt (greedy, temperature, top-k/top-p/min-p sampling, KV cache, stop strings, structured
    output)."""
    _use_threads(threads)
    import warnings

    from gptmini.config import SamplingConfig
    from gptmini.lookup import check_lookup

    # Sampling flag mistakes are reported before torch is imported or weights are read.
    sampling = SamplingConfig(
        0.0 if greedy else temperature, top_k, top_p, min_p, repetition_penalty, seed, stop or []
    )
    sampling.validate()
    check_lookup(lookup, num_samples)
    shape = _structure(json_object, json_schema, regex, choice)
    if shape is not None and lookup:
        raise UserError(
            "--lookup does not combine with structured output (a draft skips the grammar): drop one"
        )
    if show_attention is not None:
        if num_samples != 1:
            raise UserError("--show-attention shows one sample; drop --num-samples")
        _check_output_path(show_attention)

    import gptmini
    from gptmini.decoding import GenerationStats

    text = _read_prompt(prompt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = gptmini.load(checkpoint, device=device, dtype=dtype, quantize=quantize, compile=compile)
        run_stats = GenerationStats()
        kwargs = dict(
            sampling=sampling,
            max_new_tokens=max_new_tokens,
            ignore_eos=ignore_eos,
            use_cache=kv_cache,
            stats=run_stats,
            lookup=lookup,
            grammar=shape,
        )
        if show_attention is not None:
            from gptmini.inspect import GenerationAttention, check_generation_capture

            check_generation_capture(lm.model, max_new_tokens)
            kwargs["on_attention"] = recorder = GenerationAttention()
        out = sys.stdout
        if num_samples != 1:
            samples = lm.generate(text, num_samples=num_samples, **kwargs)
            for i, sample in enumerate(samples):
                if i:
                    out.write("\n" + "-" * 40 + "\n")
                out.write(text + sample)
            out.write("\n")
        elif stream:
            pieces = lm.stream(text, **kwargs)
            first = next(pieces, "")  # warnings (e.g. a truncated prompt) surface before any output
            _show_warnings(caught)
            out.write(text + first)
            out.flush()
            for piece in pieces:
                out.write(piece)
                out.flush()
            out.write("\n")
        else:
            out.write(text + lm.generate(text, **kwargs) + "\n")
        out.flush()
    _show_warnings(caught)
    if stats:
        _print_generation_stats(lm, run_stats)
    if show_attention is not None:
        from gptmini.inspect import generation_html

        title = f"what each token attended to: {checkpoint or 'checkpoints/default'}"
        _write_output(show_attention, generation_html(recorder, lm.tokenizer, title))


def _structure(
    json_object: bool, json_schema: Path | None, regex: str | None, choice: list[str] | None
) -> str | None:
    """The grammar `generate`'s structured-output flags ask for (at most one of them), or None."""
    asked = [
        name
        for name, value in (
            ("--json", json_object),
            ("--json-schema", json_schema),
            ("--regex", regex),
            ("--choice", choice),
        )
        if value
    ]
    if len(asked) > 1:
        raise UserError(f"{' and '.join(asked)}: ask for one structure at a time")
    if not asked:
        return None
    from gptmini import grammar

    if json_schema is not None:
        try:
            schema = json.loads(json_schema.read_text())
        except OSError as e:
            raise UserError(f"cannot read --json-schema {json_schema}: {e.strerror}") from None
        except ValueError as e:
            raise UserError(f"--json-schema {json_schema} is not JSON: {e}") from None
        return grammar.json_schema(schema)
    if regex is not None:
        return grammar.regex(regex)
    if choice:
        return grammar.one_of(choice)
    return grammar.json_schema(None)


def _show_warnings(caught: list) -> None:
    console = _stderr()
    for w in caught:
        console.print(f"[yellow]warning:[/] {w.message}")
    caught.clear()


def _print_generation_stats(lm, run_stats) -> None:
    from gptmini.devices import peak_memory_bytes

    peak = peak_memory_bytes(lm.device)
    _stderr().print(
        f"[dim]prompt tokens {run_stats.prompt_tokens} · new tokens {run_stats.new_tokens} · "
        f"prefill {run_stats.prefill_s * 1000:.1f} ms · decode {run_stats.decode_tokens_per_s:.1f} tokens/s · "
        f"peak memory {peak / 2**20:.0f} MiB · window slides {run_stats.window_slides}"
        + _lookup_stats(run_stats)
        + "[/]"
    )


def _lookup_stats(run_stats) -> str:
    if not run_stats.lookup_passes:
        return ""
    accepted, drafted = run_stats.lookup_accepted, run_stats.lookup_drafted
    return (
        f" · lookup {accepted}/{drafted} draft tokens accepted ({100 * accepted / drafted:.0f}%) in "
        f"{run_stats.lookup_passes} verify passes"
    )


@app.command()
def info(
    checkpoint: CheckpointOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Parameters by component, FLOPs per token, KV-cache size and config of a checkpoint."""
    import json

    from gptmini.api import default_checkpoint
    from gptmini.loading import read_model_config
    from gptmini.model import GPT

    config, meta = read_model_config(checkpoint or default_checkpoint())
    # Counting needs shapes only: a weightless model on the meta device answers at once, even for GPT-2 XL.
    report = GPT.skeleton(config, device="meta").summary()
    report["checkpoint"] = {k: v for k, v in meta.items() if k not in ("model", "model_config")}
    if json_out:
        typer.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    params = Table(title="Parameters", title_justify="left")
    params.add_column("component")
    params.add_column("parameters", justify="right")
    params.add_column("share", justify="right")
    total = report["parameters"]["total"]
    for name, count in report["parameters"].items():
        params.add_row(name.replace("_", " "), f"{count:,}", f"{100 * count / total:.1f}%")
    console.print(params)
    cost = Table(title="Cost", title_justify="left")
    cost.add_column("quantity")
    cost.add_column("value", justify="right")
    for name, value in report["cost"].items():
        cost.add_row(name.replace("_", " "), f"{value:,}")
    console.print(cost)
    cfg = Table(title="Config", title_justify="left")
    cfg.add_column("key")
    cfg.add_column("value", justify="right")
    for name, value in {**report["checkpoint"], **report["config"]}.items():
        if name == "run" and isinstance(value, dict):  # the training run in one line, not its every setting
            value = f"step {value.get('step')} on {', '.join(value.get('data', {}).get('files', []))}" + (
                f", val loss {value['val_loss']:.4f}" if value.get("val_loss") is not None else ""
            )
        cfg.add_row(name, str(value))
    console.print(cfg)


@app.command("export-hf")
def export_hf_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="gptmini checkpoint directory.")],
    out: Annotated[Path, typer.Argument(help="Directory to write (config.json + model.safetensors).")],
    dtype: Annotated[str, typer.Option(help="Weights dtype: float32, bfloat16, float16.")] = "float32",
) -> None:
    """Write a Hugging Face GPT-2 directory that transformers' GPT2LMHeadModel.from_pretrained loads."""
    from gptmini.devices import DTYPES
    from gptmini.hf import export_hf
    from gptmini.loading import load_checkpoint

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose a new directory")
    model, _ = load_checkpoint(checkpoint)
    export_hf(model, out, dtype=DTYPES[dtype])
    _stderr().print(f"wrote {out}/config.json and {out}/model.safetensors")


@app.command()
def train(
    files: Annotated[
        list[Path] | None, typer.Argument(help="Text files or directories of .txt (optional with --resume).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run directory [default: runs/<corpus>]")
    ] = None,
    preset: Annotated[str | None, typer.Option(help="Model size: tiny, small (default), gpt2.")] = None,
    n_layer: Annotated[int | None, typer.Option(help="Transformer blocks.")] = None,
    n_head: Annotated[int | None, typer.Option(help="Attention heads.")] = None,
    n_embd: Annotated[int | None, typer.Option(help="Width.")] = None,
    block_size: Annotated[int | None, typer.Option(help="Context length in tokens.")] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout probability.")] = None,
    attention_dropout: Annotated[
        float | None,
        typer.Option(
            help="Dropout on the attention probabilities [default: --dropout]; 0 drops out on the residual "
            "branches only, which costs far less time on a CPU."
        ),
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option(
            help="gpt2 (default: GPT-2's layout, exports to Hugging Face) or modern (rotary positions, QK-norm, "
            "ReLU², no biases)."
        ),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per micro-batch.")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.")] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Peak learning rate [default: 5e-3 with muon, 2e-3 with adamw: the one auto picks]."
        ),
    ] = None,
    optimizer: Annotated[
        str | None,
        typer.Option(
            help="auto (default: Muon for the blocks' matrices, AdamW for the rest, where Newton–Schulz costs at "
            "most one forward and backward; else AdamW), muon or adamw."
        ),
    ] = None,
    min_lr_ratio: Annotated[float | None, typer.Option(help="Final lr as a fraction of the peak.")] = None,
    warmup_iters: Annotated[int | None, typer.Option(help="Linear warm-up steps.")] = None,
    max_iters: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    time: Annotated[
        str | None,
        typer.Option(
            "--time",
            help="Wall-clock budget of the whole run, e.g. 90s, 10m, 1h; --resume counts the time already trained "
            "(--time 20m: 20 minutes in all) [default: 10m]",
        ),
    ] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="Decoupled weight decay (matrices only).")
    ] = None,
    grad_clip: Annotated[float | None, typer.Option(help="Clip the gradient norm (0 = off).")] = None,
    ema: Annotated[
        float | None,
        typer.Option(
            help="Evaluate and save (best/ and the run's model) a moving average of the weights with this decay "
            "[default: 0.999; 0 = off: the live weights]."
        ),
    ] = None,
    eval_interval: Annotated[int | None, typer.Option(help="Steps between evals + checkpoints.")] = None,
    eval_iters: Annotated[int | None, typer.Option(help="Val batches per eval.")] = None,
    log_interval: Annotated[int | None, typer.Option(help="Steps between log lines.")] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Last fraction of tokens held out.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for init, batches and dropout.")] = None,
    device: Annotated[str | None, typer.Option(help="auto (cuda > mps > cpu), cpu, cuda, mps")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="auto (bf16 where the hardware has it), float32, bfloat16")
    ] = None,
    compile: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model.")
    ] = None,
    fsdp: Annotated[
        bool | None,
        typer.Option(
            "--fsdp/--no-fsdp",
            help="Under torchrun: shard weights, gradients and optimizer state over the ranks (FSDP).",
        ),
    ] = None,
    save_dtype: SaveDtypeOpt = None,
    encoding_errors: Annotated[
        str | None, typer.Option(help="strict (stop at invalid UTF-8) or replace.")
    ] = None,
    vocab: Annotated[
        str | None,
        typer.Option(
            help="N (default 4096: the train split's N most frequent GPT-2 tokens; rarer ones are spelled with "
            "the tokens they were merged from), corpus (every token the text uses) or gpt2 (all 50,257; needed "
            "for export-hf). A small vocabulary makes a small model train several times faster."
        ),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run saved in --out.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the run saved in --out.")] = False,
    init_from: Annotated[
        Path | None, typer.Option(help="Start from a gptmini checkpoint or Hugging Face GPT-2 dir.")
    ] = None,
    threads: ThreadsOpt = None,
) -> None:
    """Train a GPT on text files (next-token prediction); saves to --out, resumable."""
    _use_threads(threads)
    from gptmini.config import parse_duration

    budget = parse_duration(time) if time is not None else None
    settings = dict(
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        optimizer=optimizer,
        min_lr_ratio=min_lr_ratio,
        warmup_iters=warmup_iters,
        max_iters=max_iters,
        time_budget_s=budget,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        ema=ema,
        eval_interval=eval_interval,
        eval_iters=eval_iters,
        log_interval=log_interval,
        val_fraction=val_fraction,
        seed=seed,
        device=device,
        dtype=dtype,
        compile=compile,
        fsdp=fsdp,
        encoding_errors=encoding_errors,
        vocab=vocab,
        save_dtype=save_dtype,
    )
    shape = dict(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        block_size=block_size,
        dropout=dropout,
        attention_dropout=attention_dropout,
        arch=arch,
    )
    from gptmini.train import train as run_training

    view = _TrainView()
    try:
        result = run_training(
            [str(f) for f in files or []],
            config=settings,
            model=shape,
            preset=preset,
            out=out,
            resume=resume,
            force=force,
            init_from=init_from,
            callback=view,
        )
    finally:
        view.close()
    _end_of_training(view, result)


def _end_of_training(view: _TrainView, result) -> None:
    """The summary table, and exit 1 (diverged) or 130 (interrupted). Under torchrun only rank 0's view saw the
    run start: the other ranks exit with the same code, silently."""
    shown = bool(view.start)
    if shown:
        view.summary(result)
    if result.reason == "diverged":
        if shown:
            print(f"error: {result.message}", file=sys.stderr)
        sys.exit(1)
    if result.reason == "interrupted":
        if shown:
            _stderr().print(result.message)
        sys.exit(130)


class _TrainView:
    """Renders TrainEvents: a progress bar (step, loss, lr, tokens/s, MFU, ETA) and eval lines above it."""

    def __init__(self) -> None:
        self.console = _stderr()
        self.progress = None
        self.task = None
        self.peak_flops = None
        self.start: dict = {}
        self.tokens_per_s: list[float] = []

    def __call__(self, event) -> None:
        if event.kind == "start":
            self._on_start(event)
        elif event.kind == "log" and self.progress is not None:
            info = event.info
            self.tokens_per_s.append(info["tokens_per_s"])
            mfu = info["flops_per_s"] / self.peak_flops if self.peak_flops else 0.0
            self.progress.update(
                self.task,
                completed=min(info["progress"], 1.0),
                description=(
                    f"step {event.step} · loss {info['train_loss']:.3f} · lr {info['lr']:.2e} · "
                    f"{info['tokens_per_s']:,.0f} tok/s · MFU {mfu:.0%}"
                ),
            )
        elif event.kind == "eval":
            info = event.info
            tag = "final (full val split)" if info.get("final") else "val"
            best = " [green]best[/]" if info.get("best") else ""
            self.console.print(
                f"step {event.step:>6} · {tag} loss {info['val_loss']:.4f} · ppl {info['val_ppl']:.1f} · "
                f"[bold]{info['val_bpb']:.4f} bits/byte[/]{best}"
            )
            if self.progress is not None and "progress" in info:
                self.progress.update(self.task, completed=min(info["progress"], 1.0))
        elif event.kind == "end" and self.progress is not None and event.info["reason"] in ("done", "time"):
            self.progress.update(self.task, completed=1.0)

    def _on_start(self, event) -> None:
        import torch
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from gptmini.devices import measure_matmul_flops

        info = self.start = event.info
        device = torch.device(info["device"])
        dtype = getattr(torch, info["dtype"])
        ranks = info.get("world_size", 1)
        # tokens/s counts every rank's tokens: MFU is against all of their (alike) devices.
        self.peak_flops = measure_matmul_flops(device, dtype, seconds=0.3) * ranks
        m = info["model"]
        verb = "resuming" if info["resumed"] else "training"
        budget = []
        if info["max_iters"]:
            budget.append(f"{info['max_iters']:,} steps")
        if info["time_budget_s"]:
            budget.append(f"{info['time_budget_s']:g} s")
        where = f"{info['device']} {info['dtype']}"
        if ranks > 1:
            where += f" × {ranks} ranks" + (" (FSDP)" if info["train"].get("fsdp") else "")
        self.console.print(
            f"{verb} {info['params'] / 1e6:.1f}M params ({m['n_layer']} layers, {m['n_head']} heads, "
            f"{m['n_embd']} wide, context {m['block_size']}) on {where} · "
            f"{info['train_tokens']:,} train / {info['val_tokens']:,} val tokens · budget {' or '.join(budget)} · "
            f"optimizer {info['train']['optimizer']}"
            + (f" ({info['optimizer_choice']})" if info.get("optimizer_choice") else "")
            + f" · → {info['out']}"
        )
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(f"step {event.step}", total=1.0)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()

    def summary(self, result) -> None:
        from rich.table import Table

        table = Table(title="Training run", title_justify="left")
        table.add_column("quantity")
        table.add_column("value", justify="right")
        table.add_row("stopped because", result.reason)
        table.add_row("steps", f"{result.step:,}")
        table.add_row("tokens seen", f"{result.tokens_seen:,}")
        table.add_row("wall time", f"{result.elapsed_s:,.1f} s")
        if self.tokens_per_s:
            table.add_row(
                "tokens/s (median)", f"{sorted(self.tokens_per_s)[len(self.tokens_per_s) // 2]:,.0f}"
            )
        if result.train_loss is not None:
            table.add_row("last train loss", f"{result.train_loss:.4f}")
        if result.final is not None:
            table.add_row("val loss (full split)", f"{result.final.loss:.4f}")
            table.add_row("val perplexity", f"{result.final.ppl:.2f}")
            table.add_row("val bits per byte", f"{result.final.bpb:.4f}")
        if result.best_val_loss is not None:
            table.add_row("best val loss", f"{result.best_val_loss:.4f}")
        table.add_row("checkpoint", f"{result.out}  (best: {result.out}/best)")
        self.console.print(table)


@app.command("eval")
def eval_cmd(
    files: Annotated[list[Path] | None, typer.Argument(help="Text files or directories to score.")] = None,
    checkpoint: CheckpointOpt = None,
    split: Annotated[
        str, typer.Option(help="all: the whole text; val: the part its training held out.")
    ] = "all",
    json_out: Annotated[bool, typer.Option("--json", help="Print {loss, ppl, bpb, tokens, bytes}.")] = False,
    stride: Annotated[
        int | None,
        typer.Option(help="Overlapping windows: step between window starts [default: block size]."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    device: DeviceOpt = "auto",
    dtype: Annotated[str, typer.Option(help="float32 (exact) or bfloat16/auto (faster).")] = "float32",
    encoding_errors: Annotated[str, typer.Option(help="strict or replace.")] = "strict",
    quantize: Annotated[
        str,
        typer.Option(help="none; int8, int4, int4-64, int4-32 (CPU): score what `generate --quantize` runs."),
    ] = "none",
    threads: ThreadsOpt = None,
) -> None:
    """Loss, perplexity and bits per byte of a checkpoint on any text (every position scored)."""
    _use_threads(threads)
    import json

    from gptmini.api import default_checkpoint
    from gptmini.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(
        checkpoint or default_checkpoint(),
        [str(f) for f in files or []],
        split=split,
        stride=stride,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        encoding_errors=encoding_errors,
        quantize=None if quantize == "none" else quantize,
    )
    if json_out:
        typer.echo(json.dumps(result.to_dict()))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{checkpoint or default_checkpoint()} on {split}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("loss (nats/token)", f"{result.loss:.4f}")
    table.add_row("perplexity", f"{result.ppl:.2f}")
    table.add_row("bits per byte", f"{result.bpb:.4f}")
    table.add_row("tokens scored", f"{result.tokens:,}")
    table.add_row("UTF-8 bytes", f"{result.bytes:,}")
    Console().print(table)


@app.command()
def plot(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `gptmini train`.")],
    png: Annotated[
        Path | None, typer.Option("--png", help="Where to write the PNG [default: RUN_DIR/loss.png]")
    ] = None,
    terminal: Annotated[
        bool, typer.Option("--terminal", help="Draw in the terminal even if matplotlib is here.")
    ] = False,
) -> None:
    """Train/val loss curves of a run: a PNG with matplotlib installed, else drawn in the terminal."""
    import importlib.util

    from gptmini.plotting import curves, plot_png, plot_text, read_metrics

    series = curves(read_metrics(run_dir))
    if not terminal and importlib.util.find_spec("matplotlib") is not None:
        path = png or run_dir / "loss.png"
        plot_png(series, path, str(run_dir))
        _stderr().print(f"wrote {path}")
        return
    typer.echo(plot_text(series))


inspect_app = typer.Typer(
    help="Look inside a model: attention maps, what each head does, the logit lens (terminal, PNG, HTML, JSON).",
    no_args_is_help=True,
)
app.add_typer(inspect_app, name="inspect")
InspectTextArg = Annotated[str | None, typer.Argument(help="Text to look at; '-' or omitted reads stdin.")]
InspectDtypeOpt = Annotated[str, typer.Option(help="float32 (exact), bfloat16 or float16.")]
LastOpt = Annotated[
    int | None, typer.Option("--last", help="Only the text's last N tokens (for a text too long to inspect).")
]
PngOpt = Annotated[Path | None, typer.Option("--png", help="Write a PNG (needs matplotlib).")]
HtmlOpt = Annotated[Path | None, typer.Option("--html", help="Write one self-contained, offline HTML page.")]


def _check_output_path(path: Path | None) -> None:
    if path is not None and str(path) != "-" and not path.parent.is_dir():
        raise UserError(f"cannot write {path}: the directory {path.parent} does not exist")


def _write_output(path: Path, text: str) -> None:
    """Write a file and say so on stderr; `-` writes to stdout."""
    if str(path) == "-":
        sys.stdout.write(text + "\n")
        return
    path.write_text(text, encoding="utf-8")
    _stderr().print(f"wrote {path}")


def _load_for_inspection(checkpoint: Path | None, device: str, dtype: str, png: Path | None = None, *outputs):
    from gptmini.inspect import check_png_support

    if png is not None:
        check_png_support()
    for path in (png, *outputs):
        _check_output_path(path)
    import gptmini

    return gptmini.load(checkpoint, device=device, dtype=dtype)


@inspect_app.command("attention")
def inspect_attention(
    text: InspectTextArg = None,
    checkpoint: CheckpointOpt = None,
    layer: Annotated[
        int | None, typer.Option(help="Layer shown in the terminal (default: the last; layers count from 0).")
    ] = None,
    head: Annotated[
        int | None, typer.Option(help="Head shown in the terminal (default: the mean of the layer's heads).")
    ] = None,
    png: PngOpt = None,
    html: HtmlOpt = None,
    json_out: Annotated[
        Path | None,
        typer.Option(
            "--json", help="Write {tokens, ids, attention: layer × head × query × key} ('-': stdout)."
        ),
    ] = None,
    last: LastOpt = None,
    device: DeviceOpt = "auto",
    dtype: InspectDtypeOpt = "float32",
    threads: ThreadsOpt = None,
) -> None:
    """Attention maps: per token, the earlier tokens it attends to, in every layer and head."""
    _use_threads(threads)

    from gptmini.inspect import attention_html, attention_png, check_layer_head, render_attention

    lm = _load_for_inspection(checkpoint, device, dtype, png, html, json_out)
    check_layer_head(lm.config, layer, head)
    att = lm.attention(_read_prompt(text), last=last)
    _inspection_outputs(
        lambda: render_attention(att, lm.config.n_layer - 1 if layer is None else layer, head),
        json_out,
        att.to_json,
        html=html,
        page=lambda: attention_html(att, lm.tokenizer, f"attention: {checkpoint or 'checkpoints/default'}"),
        png=png,
        draw=lambda path: attention_png(att, path),
    )


def _inspection_outputs(
    table: Callable[[], Any],
    json_out: Path | None,
    data: Callable[[], Any],
    *,
    html: Path | None = None,
    page: Callable[[], str] | None = None,
    png: Path | None = None,
    draw: Callable[[Path], Any] | None = None,
) -> None:
    """Print the table (unless --json goes to stdout), then write whichever of --json / --html / --png were asked
    for; each is rendered only when asked for."""
    import json

    if json_out is None or str(json_out) != "-":
        from rich.console import Console

        Console(highlight=False).print(table())
    if json_out is not None:
        _write_output(json_out, json.dumps(data()))
    if html is not None:
        _write_output(html, page())
    if png is not None:
        draw(png)
        _stderr().print(f"wrote {png}")


@inspect_app.command("heads")
def inspect_heads(
    checkpoint: CheckpointOpt = None,
    text: Annotated[
        str | None,
        typer.Option("--text", help="Text the patterns are measured on (default: a short English passage)."),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the scores as JSON ('-': stdout).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random tokens of the induction test.")] = 0,
    device: DeviceOpt = "auto",
    dtype: InspectDtypeOpt = "float32",
    threads: ThreadsOpt = None,
) -> None:
    """What each head does: entropy, previous-token, first-token, self and induction scores; roles marked."""
    _use_threads(threads)

    from gptmini.inspect import render_heads

    lm = _load_for_inspection(checkpoint, device, dtype, None, json_out)
    scores = lm.head_scores(text, seed=seed)
    _inspection_outputs(lambda: render_heads(scores), json_out, scores.to_json)


@inspect_app.command("lens")
def inspect_lens(
    text: InspectTextArg = None,
    checkpoint: CheckpointOpt = None,
    top: Annotated[int, typer.Option(help="Top next tokens kept per layer and position.")] = 5,
    png: PngOpt = None,
    html: HtmlOpt = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the lens as JSON ('-': stdout).")
    ] = None,
    last: LastOpt = None,
    device: DeviceOpt = "auto",
    dtype: InspectDtypeOpt = "float32",
    threads: ThreadsOpt = None,
) -> None:
    """The logit lens: each layer's residual stream decoded into next-token probabilities."""
    _use_threads(threads)

    from gptmini.inspect import lens_html, lens_png, render_lens

    lm = _load_for_inspection(checkpoint, device, dtype, png, html, json_out)
    lens = lm.logit_lens(_read_prompt(text), top=top, last=last)
    _inspection_outputs(
        lambda: render_lens(lens),
        json_out,
        lens.to_json,
        html=html,
        page=lambda: lens_html(lens, f"logit lens: {checkpoint or 'checkpoints/default'}"),
        png=png,
        draw=lambda path: lens_png(lens, path),
    )


@app.command()
def chat(
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "-c",
            "--checkpoint",
            help="gptmini or Hugging Face GPT-2 dir (default: checkpoints/default-chat, else checkpoints/default)",
        ),
    ] = None,
    temperature: TemperatureOpt = 0.8,
    top_k: TopKOpt = 200,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = 1.0,
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", "-n", help="Maximum tokens per reply.")
    ] = 200,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible replies.")] = None,
    lookup: LookupOpt = 0,
    history: Annotated[
        Path | None,
        typer.Option(
            "--history", help="Input history file (default: $GPTMINI_HISTORY or ~/.gptmini_history)"
        ),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DecodeDtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    threads: ThreadsOpt = None,
) -> None:
    """Multi-turn chat: replies streamed, history kept and trimmed to the context, /help for commands.

    With piped stdin, each line is one user turn and the replies go to stdout.
    """
    _use_threads(threads)
    from gptmini.chat import ChatSettings, run_chat

    settings = ChatSettings(
        temperature, top_k, top_p, min_p, repetition_penalty, seed, max_new_tokens, lookup
    )
    code = run_chat(
        checkpoint,
        settings=settings,
        system=system,
        device=device,
        dtype=dtype,
        quantize=quantize,
        history_file=history,
    )
    raise typer.Exit(code)


@app.command()
def finetune(
    data: Annotated[
        Path, typer.Argument(help='JSONL, one {"messages": [{"role", "content"}, ...]} per line.')
    ],
    checkpoint: CheckpointOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run directory (default: runs/<data>-chat)")
    ] = None,
    max_iters: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    time: Annotated[
        str | None,
        typer.Option(
            "--time",
            help="Wall-clock budget of the whole run, e.g. 90s, 10m, 1h; --resume counts the time already trained "
            "(default: 10m)",
        ),
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default: 5e-4).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Conversations per micro-batch.")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.")] = None,
    warmup_iters: Annotated[int | None, typer.Option(help="Linear warm-up steps (default: 20).")] = None,
    eval_interval: Annotated[int | None, typer.Option(help="Steps between evals + checkpoints.")] = None,
    eval_iters: Annotated[int | None, typer.Option(help="Val batches per eval.")] = None,
    log_interval: Annotated[int | None, typer.Option(help="Steps between log lines.")] = None,
    val_fraction: Annotated[
        float | None, typer.Option(help="Last fraction of the conversations held out (default: 0.1).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for batches and dropout.")] = None,
    device: Annotated[str | None, typer.Option(help="auto (cuda > mps > cpu), cpu, cuda, mps")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="auto (bf16 where the hardware has it), float32, bfloat16")
    ] = None,
    save_dtype: SaveDtypeOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run saved in --out.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the run saved in --out.")] = False,
    threads: ThreadsOpt = None,
) -> None:
    """Turn a model into a chat model: train on conversations, loss on the assistant's replies only."""
    _use_threads(threads)
    from gptmini.config import parse_duration
    from gptmini.finetune import finetune as run_finetune

    settings = dict(
        max_iters=max_iters,
        time_budget_s=parse_duration(time) if time is not None else None,
        lr=lr,
        batch_size=batch_size,
        grad_accum=grad_accum,
        warmup_iters=warmup_iters,
        eval_interval=eval_interval,
        eval_iters=eval_iters,
        log_interval=log_interval,
        val_fraction=val_fraction,
        seed=seed,
        device=device,
        dtype=dtype,
        save_dtype=save_dtype,
    )
    view = _TrainView()
    try:
        result = run_finetune(
            data, checkpoint=checkpoint, out=out, config=settings, resume=resume, force=force, callback=view
        )
    finally:
        view.close()
    _end_of_training(view, result)
    _stderr().print(f"chat with it: gptmini chat -c {result.out}")


@app.command()
def serve(
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "-c",
            "--checkpoint",
            help="gptmini or Hugging Face GPT-2 dir (default: checkpoints/default-chat, else checkpoints/default)",
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    parallel: Annotated[
        int, typer.Option(help="Requests decoded together in one batch (KV-cache rows).")
    ] = 4,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for a row; more get 429.")] = 64,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key", envvar="GPTMINI_API_KEY", help="Require 'Authorization: Bearer KEY' (repeatable)."
        ),
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option("--cors-origin", help="Allow browser calls from this origin (repeatable)."),
    ] = None,
    ui: Annotated[bool, typer.Option("--ui/--no-ui", help="Serve the web chat page at /.")] = True,
    device: DeviceOpt = "auto",
    dtype: DecodeDtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    threads: ThreadsOpt = None,
    drain_timeout: Annotated[
        float, typer.Option(help="Seconds Ctrl-C / SIGTERM waits for in-flight requests.")
    ] = 30.0,
    max_body: Annotated[int, typer.Option(help="Largest request body in bytes; larger get 413.")] = 1 << 20,
    stall_timeout: Annotated[
        float,
        typer.Option(help="Seconds a stream may go unread before its request is cancelled (its row freed)."),
    ] = 30.0,
    model_name: Annotated[
        str | None, typer.Option(help="Model id in /v1/models and responses (default: the directory name).")
    ] = None,
    lookup: Annotated[
        int,
        typer.Option(
            help="Prompt-lookup decoding for requests that do not set 'lookup': up to N draft tokens copied from "
            "earlier in the text, checked per pass (0: off). Same output; faster on text that repeats."
        ),
    ] = 0,
    quiet: Annotated[
        bool, typer.Option("--quiet", help="No access log (one line per request on stderr).")
    ] = False,
) -> None:
    """OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions (streaming), /metrics, a web chat page.

    Concurrent requests decode together (continuous batching). Ctrl-C or SIGTERM drains, then exits.
    """
    import socket

    if parallel < 1:
        raise UserError(f"--parallel must be >= 1, got {parallel}")
    if max_queue < 0:
        raise UserError(f"--max-queue must be >= 0, got {max_queue}")
    if not stall_timeout > 0:
        raise UserError(f"--stall-timeout must be > 0 seconds, got {stall_timeout}")
    if not 0 < port < 65536:
        raise UserError(f"--port must be in 1..65535, got {port}")
    if drain_timeout < 0 or max_body < 1:
        raise UserError("--drain-timeout must be >= 0 and --max-body >= 1")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    from gptmini.config import check_quantize_name

    check_quantize_name(quantize)
    from gptmini.lookup import check_lookup

    check_lookup(lookup)
    from importlib.util import find_spec

    # Found, not imported: the HTTP stack is imported below, while the model loads.
    missing = next((m for m in ("fastapi", "prometheus_client", "uvicorn") if find_spec(m) is None), None)
    if missing is not None:
        raise UserError(
            f"gptmini serve needs FastAPI, uvicorn and prometheus-client ({missing} is missing): "
            "pip install 'gptmini[serve]'"
        )
    from gptmini.chat import default_chat_checkpoint
    from gptmini.loading import read_model_config

    path = checkpoint or default_chat_checkpoint()
    read_model_config(path)  # a missing or damaged checkpoint is reported now, not after the server started
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As uvicorn's own socket: a port whose last connections linger in TIME_WAIT after a clean stop is free
        # (a port another server listens on still is not).
        if os.name != "nt":
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UserError(
                f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host"
            ) from None
    keys = [k for k in (api_key or []) if k]
    if host not in ("127.0.0.1", "localhost", "::1") and not keys:
        _stderr().print(
            f"[yellow]warning:[/] listening on {host} without --api-key: anyone who can reach it can use it"
        )
    # The weights load on a thread from here on, while FastAPI and uvicorn import (GIL-free file reads and copies
    # overlap them); the server's /health says 503 until this load and the engine are done.
    early = _load_in_background(path, device=device, dtype=dtype, quantize=quantize, threads=threads)
    from gptmini.server import ServeSettings
    from gptmini.server import serve as run_server

    settings = ServeSettings(
        checkpoint=path,
        device=device,
        dtype=dtype,
        quantize=None if quantize == "none" else quantize,
        threads=threads,
        parallel=parallel,
        max_queue=max_queue,
        api_keys=keys,
        cors_origins=list(cors_origin or []),
        ui=ui,
        max_body_bytes=max_body,
        model_name=model_name,
        lookup=lookup,
        access_log=not quiet,
        stall_timeout=stall_timeout,
    )
    raise typer.Exit(run_server(settings, host=host, port=port, drain_timeout=drain_timeout, lm=early))


def _load_in_background(path: Path, **options: Any) -> Future:
    """`gptmini.load(path, **options)` on a daemon thread; its model or its error comes through the Future."""
    import threading
    from concurrent.futures import Future

    import gptmini.api  # imported here, not on the thread, so the two threads never import the same modules

    if options.get("quantize") == "none":
        options["quantize"] = None
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(gptmini.api.load(path, **options))
        except BaseException as e:  # handed to the server, which reports it and exits 2
            future.set_exception(e)

    threading.Thread(target=run, name="gptmini-load", daemon=True).start()
    return future


# Typer ≥ 0.20 vendors its own click; older versions use click. Take the classes from whichever Typer uses.
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2, never a traceback."""
    try:
        app(args=argv, standalone_mode=False)
    except UserError as e:
        if not getattr(e, "already_reported", False):  # under torchrun, by the rank that failed first
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `gptmini`: show the help
            print(e.format_message())
            sys.exit(0)
        command = e.ctx.command_path if e.ctx else "gptmini"
        print(f"error: {e.format_message()} (see `{command} --help`)", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `gptmini generate ... | head` closed the pipe: not an error
        sys.stderr.close()
        sys.exit(0)
