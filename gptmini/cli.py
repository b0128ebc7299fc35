"""The `gptmini` command: parse flags, call the library, print. No model logic lives here.

torch is imported inside the commands, never at the top, so `gptmini --help` answers at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from gptmini import __version__
from gptmini.errors import UserError

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
        str | None, typer.Argument(help="Text to continue; '-' or omitted reads stdin.")
    ] = None,
    checkpoint: CheckpointOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")] = 200,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Keep the k most likely tokens.")] = 200,
    top_p: Annotated[
        float | None, typer.Option("--top-p", help="Nucleus sampling threshold in (0, 1].")
    ] = None,
    min_p: Annotated[
        float | None, typer.Option("--min-p", help="Drop tokens below min_p × top probability.")
    ] = None,
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages repeats (1 = off).")] = 1.0,
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
    dtype: Annotated[
        str, typer.Option(help="auto (bf16 on CUDA, else fp32), float32, bfloat16, float16")
    ] = "auto",
    quantize: Annotated[
        str, typer.Option(help="none, or int8: int8 weights for faster CPU decoding (small quality cost).")
    ] = "none",
    compile: Annotated[
        bool, typer.Option("--compile", help="Compile the decode step (slow start; for long runs).")
    ] = False,
) -> None:
    """Continue a prompt (greedy, temperature, top-k/top-p/min-p sampling, KV cache, stop strings)."""
    import warnings

    from gptmini.config import SamplingConfig

    # Sampling flag mistakes are reported before torch is imported or weights are read.
    SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty, seed).validate()

    import gptmini
    from gptmini.generation import GenerationStats

    text = _read_prompt(prompt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = gptmini.load(checkpoint, device=device, dtype=dtype, quantize=quantize, compile=compile)
        run_stats = GenerationStats()
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            temperature=0.0 if greedy else temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop or (),
            ignore_eos=ignore_eos,
            use_cache=kv_cache,
            stats=run_stats,
        )
        out = sys.stdout
        if num_samples > 1:
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
        f"peak memory {peak / 2**20:.0f} MiB · window slides {run_stats.window_slides}[/]"
    )


@app.command()
def info(
    checkpoint: CheckpointOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Parameters by component, FLOPs per token, KV-cache size and config of a checkpoint."""
    import json

    from gptmini.api import default_checkpoint
    from gptmini.checkpoint import read_model_config
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
        cfg.add_row(name, str(value))
    console.print(cfg)


@app.command("export-hf")
def export_hf_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="gptmini checkpoint directory.")],
    out: Annotated[Path, typer.Argument(help="Directory to write (config.json + model.safetensors).")],
    dtype: Annotated[str, typer.Option(help="Weights dtype: float32, bfloat16, float16.")] = "float32",
) -> None:
    """Write a Hugging Face GPT-2 directory that transformers' GPT2LMHeadModel.from_pretrained loads."""
    from gptmini.checkpoint import load_checkpoint
    from gptmini.devices import DTYPES
    from gptmini.hf import export_hf

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose a new directory")
    model, _ = load_checkpoint(checkpoint)
    export_hf(model, out, dtype=DTYPES[dtype])
    _stderr().print(f"wrote {out}/config.json and {out}/model.safetensors")


def _not_yet(command: str) -> None:
    raise UserError(f"`gptmini {command}` is not yet available in this version")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train() -> None:
    """Pretrain a model on text files (next-token prediction)."""
    _not_yet("train")


@app.command("eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def eval_cmd() -> None:
    """Loss, perplexity and bits per byte of a checkpoint on any text."""
    _not_yet("eval")


@app.command()
def chat(
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "-c",
            "--checkpoint",
            help="gptmini or Hugging Face GPT-2 dir [default: checkpoints/default-chat, else checkpoints/default]",
        ),
    ] = None,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Keep the k most likely tokens.")] = 200,
    top_p: Annotated[
        float | None, typer.Option("--top-p", help="Nucleus sampling threshold in (0, 1].")
    ] = None,
    min_p: Annotated[
        float | None, typer.Option("--min-p", help="Drop tokens below min_p × top probability.")
    ] = None,
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages repeats (1 = off).")] = 1.0,
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", "-n", help="Maximum tokens per reply.")
    ] = 200,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible replies.")] = None,
    history: Annotated[
        Path | None,
        typer.Option("--history", help="Input history file [default: $GPTMINI_HISTORY or ~/.gptmini_history]"),
    ] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Multi-turn chat: replies streamed, history kept and trimmed to the context, /help for commands.

    With piped stdin, each line is one user turn and the replies go to stdout.
    """
    from gptmini.chat import ChatSettings, run_chat

    settings = ChatSettings(temperature, top_k, top_p, min_p, repetition_penalty, seed, max_new_tokens)
    code = run_chat(checkpoint, settings=settings, system=system, device=device, history_file=history)
    raise typer.Exit(code)


# Typer ≥ 0.20 vendors its own click; older versions use click. Take the classes from whichever Typer uses.
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2, never a traceback."""
    try:
        app(args=argv, standalone_mode=False)
    except UserError as e:
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
