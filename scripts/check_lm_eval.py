"""lm-evaluation-harness against `gptmini serve`, checked document by document against an independent reference.

    python scripts/check_lm_eval.py                          # the shipped models
    python scripts/check_lm_eval.py --hf                     # … and a GPT-2 against lm-eval's own hf backend
    python scripts/check_lm_eval.py -c runs/mine --text my.txt

Starts a real `gptmini serve` on a free loopback port and points lm-eval's `local-completions` model at it with
`tokenizer_backend=remote` (lm-eval tokenizes through the server's /tokenize, /detokenize and /tokenizer_info:
the only way for a compact-vocabulary model, which no Hugging Face tokenizer can load; lm-eval's default, "auto",
must pick it by itself), once sending prompts as token ids (`tokenized_requests=True`, batched, two requests at a
time) and once as strings (`tokenized_requests=False`, the server tokenizes). Three local tasks are written to a temporary folder (YAML over JSON lines, no download):

- a multiple-choice task (lm-eval's `loglikelihood`: `echo` + `logprobs` + `max_tokens: 1`, the context's tokens
  counted by the client and sliced off the echoed `token_logprobs`),
- a perplexity task (`loglikelihood_rolling`: each text scored in disjoint windows of `max_length - 2` tokens, the
  first after `<|endoftext|>`, the others after the tokens before them), with texts of up to 4 windows,
- a generation task (`generate_until`, greedy, stopping at any of six stop strings — a newline, `.`, `!`, `?`, `;`,
  `:` — or `<|endoftext|>`, which lm-eval adds: seven in all, past OpenAI's old limit of four).

The reference does not go through the server: `gptmini.load(checkpoint).model`'s forward over the same tokens,
log-softmax, summed over the scored tokens (the windows laid out here from lm-eval's documented rule); for
generation, greedy decoding by full recomputation. Every request's summed log-prob (a choice's; a window's, so a
text of k windows within k * tol) must agree within `--tol`, every generated text exactly; the exit code is 1
otherwise. `--hf` adds a random GPT-2 (Hugging Face directory with tokenizer files, GPT-2's
whole vocabulary): the served model is also scored by lm-eval's own `hf` backend (transformers), and
`tokenizer_backend=huggingface` is tried too.

Needs lm-eval 0.4.10 or later (`pip install "lm-eval[api]"`; `accelerate` too for `--hf`: both are in the `test`
extra), never a runtime dependency. `tests/test_lm_eval.py` runs this on both shipped models and (`--hf`'s part,
fewer modes) on a random GPT-2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench_serve import Running, free_port, write_gpt2_tokenizer  # noqa: E402 (the scripts' folder first)

HELD_OUT = ROOT.parent / "shared" / "data" / "paradise-lost.txt"  # never trained on
FALLBACK_TEXT = ROOT / "data" / "shakespeare.txt"
EOT = "<|endoftext|>"

MC_TASK, PPL_TASK, GEN_TASK = "gptmini_mc", "gptmini_ppl", "gptmini_gen"
GEN_STOPS = ["\n", ".", "!", "?", ";", ":"]  # lm-eval adds the EOS text: seven stop strings in all


# ---- the tasks --------------------------------------------------------------------------------------------------


def verse_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if len(line.split()) >= 6]


def write_tasks(folder: Path, text: str, *, n_mc: int = 12, n_gen: int = 4, gen_tokens: int = 32) -> Path:
    """Three lm-eval tasks over `text` (JSON lines + YAML in `folder`); returns the include path."""
    lines = text.splitlines()
    verses = verse_lines(text)
    mc, gen, ppl = [], [], []
    for i in range(n_mc):
        line, before = verses[2 * i + 1], verses[2 * i]
        words = line.split()
        cut = len(words) // 2
        rests = [" ".join(verses[(2 * i + 1 + 7 * k) % len(verses)].split()[cut:]) for k in range(4)]
        gold = i % 4
        rests[0], rests[gold] = rests[gold], rests[0]
        mc.append({"context": before + "\n" + " ".join(words[:cut]), "choices": rests, "gold": gold})
    for i in range(n_gen):
        gen.append({"context": "\n".join(lines[40 + 3 * i : 42 + 3 * i]) + "\n", "target": lines[42 + 3 * i]})
    # Short and long texts: the longest spans several windows of the served model's context.
    start = 0
    for n in (3, 9, 26, 70):
        ppl.append({"text": "\n".join(lines[start : start + n])})
        start += n
    for name, docs in (("mc", mc), ("gen", gen), ("ppl", ppl)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")

    def metrics(name: str, aggregation: str, higher_is_better: bool) -> str:
        return (
            f"  - metric: {name}\n    aggregation: {aggregation}\n    higher_is_better: {higher_is_better}\n"
        )

    def task(name: str, data: str, body: str) -> None:
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(folder / data))}\n"
            f"  cache_dir: {json.dumps(str(folder / 'cache'))}\n"
            f"test_split: test\n{body}",
            encoding="utf-8",
        )

    task(
        MC_TASK,
        "mc.jsonl",
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: gold\nmetric_list:\n"
        + metrics("acc", "mean", True)
        + metrics("acc_norm", "mean", True),
    )
    task(
        PPL_TASK,
        "ppl.jsonl",
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n"
        + metrics("word_perplexity", "weighted_perplexity", False)
        + metrics("byte_perplexity", "weighted_perplexity", False)
        + metrics("bits_per_byte", "bits_per_byte", False),
    )
    task(
        GEN_TASK,
        "gen.jsonl",
        "output_type: generate_until\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{target}}'\n"
        f"generation_kwargs:\n  until: {json.dumps(GEN_STOPS)}\n  max_gen_toks: {gen_tokens}\n  do_sample: false\n"
        "metric_list:\n" + metrics("exact_match", "mean", True),
    )
    return folder


# ---- the server -------------------------------------------------------------------------------------------------


@contextmanager
def serve(checkpoint: Path | str, *args: str, timeout: float = 120) -> Iterator[str]:
    """A real `gptmini serve` process of this checkout on a free loopback port; yields its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "gptmini", "serve", "-c", str(checkpoint), "--device", "cpu"]
    cmd += ["--threads", "1", "--port", str(port), "--quiet", "--no-ui", *args]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    server = Running(cmd, port, env)
    try:
        server.wait_ready("/health", timeout)
        yield server.url
    finally:
        server.stop()


# ---- lm-eval ----------------------------------------------------------------------------------------------------


def run_lm_eval(model: str, model_args: dict[str, Any], include: Path, tasks: list[str]) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` on the local tasks: {task: {"metrics": …, "samples": […]}}, each sample with
    its requests' arguments as tuples (`arguments_list`)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        task_manager=TaskManager(
            include_path=str(include), include_defaults=False
        ),  # not its 14,000 task files
        log_samples=True,
        bootstrap_iters=0,
        random_seed=0,
        verbosity="ERROR",
    )
    got = {}
    for t in tasks:
        samples = sorted(out["samples"][t], key=lambda s: s["doc_id"])
        for s in samples:
            s["arguments_list"] = arguments(s)
        got[t] = {"metrics": out["results"][t], "samples": samples}
    return got


# ---- the reference ----------------------------------------------------------------------------------------------


class Reference:
    """Log-likelihoods and greedy text straight from the model's forward (no server, no engine, no cache).

    `max_length`: lm-eval's model argument for the API models (prompts of at most max_length - 1 tokens, then the
    one generated token): rolling windows predict max_length - 2 tokens each."""

    def __init__(self, lm: Any, max_length: int) -> None:
        self.lm = lm
        self.tok = lm.tokenizer
        self.vocab = lm.config.vocab_size
        self.max_length = max_length
        self.ends = {self.tok.eot_id, *getattr(self.tok, "special_ids", {}).values()}

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, allow_special={EOT})  # as the server reads a completions prompt

    def logprobs(self, ids: list[int]) -> Any:
        """[len(ids), vocab]: row i is the distribution of the token after ids[: i + 1]."""
        import torch

        with torch.no_grad():
            logits = self.lm.model(torch.tensor([ids], device=self.lm.device))[0][0]
        return torch.log_softmax(logits[:, : self.vocab].double(), dim=-1)

    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Sum of log p(continuation | context), and whether every continuation token is the most likely."""
        logp = self.logprobs(context + continuation)[len(context) - 1 : -1]
        picked = [logp[i, t].item() for i, t in enumerate(continuation)]
        greedy = all(logp[i].argmax().item() == t for i, t in enumerate(continuation))
        return math.fsum(picked), greedy

    def choice(self, context: str, continuation: str) -> tuple[float, bool]:
        """A (context, continuation) request as any causal LM in lm-eval reads it: the context's trailing spaces
        move to the continuation, whose tokens are the whole text's past the context's."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return self.score(ctx, whole[len(ctx) :])

    def windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """The text's tokens in disjoint windows of W = max_length - 2 predicted tokens: the first after
        <|endoftext|>, each later one after the W + 1 - len(window) tokens before it. (context, predicted)."""
        tokens, width = self.encode(text), self.max_length - 2
        out, start = [], 0
        while start < len(tokens):
            end = min(start + width, len(tokens))
            context = [self.tok.eot_id] if start == 0 else tokens[max(0, end - width - 1) : start]
            out.append((context, tokens[start:end]))
            start = end
        return out

    def rolling(self, text: str) -> float:
        return math.fsum(self.score(c, p)[0] for c, p in self.windows(text))

    def survives_text(self, text: str) -> bool:
        """Whether each window, sent as text (`tokenized_requests=False`: lm-eval decodes the window's ids and the
        server encodes the text again), comes back as the same tokens. A window that starts or ends inside a word
        may not (BPE of a piece of a word is not always the word's tokens cut there): lm-eval then counts the
        context with one tokenization and the server scores another, whatever the server does."""
        return all(self.encode(self.tok.decode(c + p)) == c + p for c, p in self.windows(text))

    def greedy(self, context: str, until: list[str], max_tokens: int) -> str:
        """Greedy text by recomputing the whole sequence each token, cut at the first stop string; an end token
        (<|endoftext|>, a chat model's control tokens) ends it."""
        ids, out = self.encode(context), []
        for _ in range(max_tokens):
            nxt = int(self.logprobs(ids + out)[-1].argmax())
            if nxt in self.ends:
                break
            out.append(nxt)
            text = self.tok.decode(out)
            hits = [text.index(s) for s in until if s in text]
            if hits:
                return text[: min(hits)]
        return self.tok.decode(out)


# ---- comparison -------------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    label: str
    # (task, metric, "lm-eval's value vs the reference's", largest |difference| of a request's log-prob)
    rows: list[tuple[str, str, str, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    compared: dict[str, int] = field(default_factory=dict)  # documents compared, per task


def compare(
    label: str, got: dict[str, Any], ref: Reference, tol: float, *, as_text: bool = False
) -> Comparison:
    """lm-eval's logged answers (`got`, from `run_lm_eval`) against the reference, document by document. `tol`:
    per request (a choice; a rolling window), so a text scored in k windows may differ by k * tol."""
    c = Comparison(label)
    if MC_TASK in got:
        worst, right, n = 0.0, 0, 0
        for s in got[MC_TASK]["samples"]:
            scores = []
            for (context, continuation), resp in zip(s["arguments_list"], s["resps"], strict=True):
                ll, greedy = resp[0]
                want_ll, want_greedy = ref.choice(context, continuation)
                scores.append(want_ll)
                worst = max(worst, abs(ll - want_ll))
                if abs(ll - want_ll) > tol or bool(greedy) != want_greedy:
                    c.failures.append(
                        f"{label} {MC_TASK} doc {s['doc_id']} {continuation!r}: lm-eval ({ll:.6f}, {greedy}) "
                        f"vs reference ({want_ll:.6f}, {want_greedy})"
                    )
            right += max(range(len(scores)), key=scores.__getitem__) == s["doc"]["gold"]
            n += 1
        c.compared[MC_TASK] = n
        acc = got[MC_TASK]["metrics"]["acc,none"]
        c.rows.append((MC_TASK, "acc", f"{acc:.4f} vs {right / n:.4f}", worst))
        if abs(acc - right / n) > 1e-9:
            c.failures.append(f"{label} {MC_TASK}: acc {acc} vs reference {right / n}")
    if PPL_TASK in got:
        worst, total, n_bytes = 0.0, 0.0, 0
        for s in got[PPL_TASK]["samples"]:
            text, ll = s["doc"]["text"], s["resps"][0][0]
            want, windows = ref.rolling(text), len(ref.windows(text))
            total += want
            n_bytes += len(text.encode("utf-8"))
            if as_text and not ref.survives_text(text):
                c.notes.append(
                    f"{label} {PPL_TASK} doc {s['doc_id']}: not compared (a window's text re-encodes to other "
                    f"tokens; lm-eval's tokenized_requests=False cannot score it exactly): {ll:.6f} vs {want:.6f}"
                )
                continue
            worst = max(worst, abs(ll - want) / windows)
            c.compared[PPL_TASK] = c.compared.get(PPL_TASK, 0) + 1
            if abs(ll - want) > tol * windows:
                c.failures.append(
                    f"{label} {PPL_TASK} doc {s['doc_id']} ({len(ref.encode(text))} tokens, {windows} windows): "
                    f"lm-eval {ll:.6f} vs reference {want:.6f}"
                )
        bpb = got[PPL_TASK]["metrics"]["bits_per_byte,none"]
        want_bpb = -total / n_bytes / math.log(2)
        c.rows.append((PPL_TASK, "bits_per_byte", f"{bpb:.6f} vs {want_bpb:.6f}", worst))
    if GEN_TASK in got:
        same = 0
        for s in got[GEN_TASK]["samples"]:
            context, kwargs = s["arguments_list"][0]
            text = s["resps"][0][0]
            want = ref.greedy(context, [*kwargs["until"], EOT], kwargs["max_gen_toks"])
            same += text == want
            if text != want:
                c.failures.append(
                    f"{label} {GEN_TASK} doc {s['doc_id']}: lm-eval {text!r} vs reference {want!r}"
                )
        n = c.compared[GEN_TASK] = len(got[GEN_TASK]["samples"])
        c.rows.append((GEN_TASK, "same text", f"{same}/{n}", 0.0))
    return c


def cross(
    label: str, a: dict[str, Any], b: dict[str, Any], ref: Reference, tol: float, as_text: bool
) -> Comparison:
    """Two lm-eval runs (`local-completions` on the server, lm-eval's own `hf` backend) answer alike: every logged
    response within `tol` per request (the caller passes twice `compare`'s: each run is within it of the reference,
    on either side), the generated texts equal."""
    c = Comparison(label)
    for task in a:
        worst = 0.0
        for sa, sb in zip(a[task]["samples"], b[task]["samples"], strict=True):
            windows = len(ref.windows(sa["doc"]["text"])) if task == PPL_TASK else 1
            if task == PPL_TASK and as_text and not ref.survives_text(sa["doc"]["text"]):
                continue  # as `compare`
            for ra, rb in zip(sa["resps"], sb["resps"], strict=True):
                x, y = ra[0], rb[0]
                if isinstance(x, str):
                    if x != y:
                        c.failures.append(f"{label} {task} doc {sa['doc_id']}: {x!r} vs {y!r}")
                    continue
                x, y = (x[0], y[0]) if isinstance(x, (list, tuple)) else (x, y)
                worst = max(worst, abs(x - y) / windows)
                if abs(x - y) > tol * windows:
                    c.failures.append(f"{label} {task} doc {sa['doc_id']}: {x:.6f} vs {y:.6f}")
        metric = {MC_TASK: "acc,none", PPL_TASK: "bits_per_byte,none", GEN_TASK: "exact_match,none"}[task]
        values = f"{a[task]['metrics'][metric]:.6f} vs {b[task]['metrics'][metric]:.6f}"
        c.rows.append((task, metric.split(",")[0], values, worst))
    return c


def arguments(sample: dict[str, Any]) -> list[tuple[Any, ...]]:
    """A logged sample's request arguments as tuples (lm-eval logs them as {gen_args_i: {arg_j: …}})."""
    args = sample["arguments"]
    if isinstance(args, dict):
        return [tuple(a[f"arg_{j}"] for j in range(len(a))) for a in args.values()]
    return [tuple(a) for a in args]


# ---- the runs ---------------------------------------------------------------------------------------------------

TASKS = (MC_TASK, PPL_TASK, GEN_TASK)
# lm-eval's local-completions, each way it can call: prompts as token ids (several per request, two requests at a
# time) or as text (one or two per request); the tokenizer the server's (`remote`) or the Hugging Face directory's
# own (`hf-*`: for a served Hugging Face directory only).
MODES = {
    "remote-ids": {
        "tokenizer_backend": "remote",
        "tokenized_requests": True,
        "batch_size": 4,
        "num_concurrent": 2,
    },
    "remote-text": {"tokenizer_backend": "remote", "tokenized_requests": False, "batch_size": 1},
    "hf-ids": {"tokenizer_backend": "huggingface", "tokenized_requests": True, "batch_size": 4},
    "hf-text": {"tokenizer_backend": "huggingface", "tokenized_requests": False, "batch_size": 2},
}


def local_completions(url: str, checkpoint: Path | str, max_length: int, mode: str) -> dict[str, Any]:
    args = {
        "base_url": url + "/v1/completions",
        "model": Path(checkpoint).name,
        "max_length": max_length,
        "max_retries": 1,
        **MODES[mode],
    }
    if args["tokenizer_backend"] == "huggingface":
        args["tokenizer"] = str(checkpoint)  # a Hugging Face directory with tokenizer files
    return args


def auto_backend(label: str, url: str) -> Comparison:
    """local-completions left to its default (`tokenizer_backend="auto"`, lm-eval 0.4.10 on) finds the server's
    tokenizer endpoints and takes the remote tokenizer."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    c = Comparison(label)
    picked = LocalCompletionsAPI(base_url=url + "/v1/completions", model="m").tokenizer_backend
    c.rows.append(("(model)", "tokenizer", f"{picked} vs remote", 0.0))
    if picked != "remote":
        c.failures.append(f"{label}: lm-eval chose tokenizer_backend={picked}, not remote")
    return c


def check_served(
    checkpoint: Path | str,
    text: str,
    *,
    tol: float = 1e-4,
    modes: tuple[str, ...] = ("remote-ids", "remote-text"),
    hf_backend: bool = False,
    tasks: tuple[str, ...] = TASKS,
) -> list[Comparison]:
    """lm-eval's local-completions on `gptmini serve -c checkpoint` in each of `modes`, against the reference;
    `hf_backend` (a Hugging Face GPT-2 directory): lm-eval's own `hf` model too, against the reference and the
    server."""
    import gptmini

    lm = gptmini.load(checkpoint, device="cpu")
    max_length = lm.config.block_size
    ref = Reference(lm, max_length)
    name = Path(checkpoint).name
    out, runs = [], {}
    with tempfile.TemporaryDirectory() as tmp, serve(checkpoint) as url:
        include = write_tasks(Path(tmp), text)
        out.append(auto_backend(f"{name}/auto", url))
        for mode in modes:
            args = local_completions(url, checkpoint, max_length, mode)
            runs[mode] = got = run_lm_eval("local-completions", args, include, list(tasks))
            out.append(compare(f"{name}/{mode}", got, ref, tol, as_text=mode.endswith("-text")))
        if hf_backend:
            # Its windows predict max_length tokens (the API models' max_length - 2): the same windows.
            args = {
                "pretrained": str(checkpoint),
                "device": "cpu",
                "dtype": "float32",
                "max_length": max_length - 2,
            }
            got = run_lm_eval("hf", args | {"batch_size": 1}, include, list(tasks))
            out.append(compare(f"{name}/lm-eval hf", got, ref, tol))
            for mode, served in runs.items():
                out.append(cross(f"{name}/{mode} vs hf", served, got, ref, 2 * tol, mode.endswith("-text")))
    return out


def report(comparisons: list[Comparison]) -> str:
    lines = [f"{'run':<28} {'task':<12} {'metric':<14} {'lm-eval vs reference':<26} max |diff| per request"]
    for c in comparisons:
        for task, metric, values, worst in c.rows:
            lines.append(f"{c.label:<28} {task:<12} {metric:<14} {values:<26} {worst:.2e}")
    for c in comparisons:
        lines += c.notes + c.failures
    return "\n".join(lines)


def write_random_gpt2(path: Path, *, n_positions: int = 128) -> Path:
    """A small GPT-2 with random weights and GPT-2's whole vocabulary, saved as a Hugging Face directory with
    tokenizer files (written from the ranks gptmini ships: no download)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=64, n_positions=n_positions, vocab_size=50257, initializer_range=0.3
    )
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(path)
    write_gpt2_tokenizer(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-c", "--checkpoint", action="append", help="repeatable (default: the shipped models)"
    )
    parser.add_argument("--text", type=Path, help=f"text to build the tasks from (default: {HELD_OUT.name})")
    parser.add_argument(
        "--tol", type=float, default=1e-4, help="largest |difference| of a request's log-prob"
    )
    parser.add_argument(
        "--hf",
        action="store_true",
        help="also a random GPT-2 Hugging Face directory, against lm-eval's hf backend",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(1)  # the reference (and the hf backend) beside the server, on a shared machine
    checkpoints = args.checkpoint or [ROOT / "checkpoints" / "default", ROOT / "checkpoints" / "default-chat"]
    text_path = args.text or (HELD_OUT if HELD_OUT.exists() else FALLBACK_TEXT)
    text = text_path.read_text(encoding="utf-8")
    t0 = time.perf_counter()
    comparisons = []
    for ckpt in checkpoints:
        comparisons += check_served(ckpt, text, tol=args.tol)
    if args.hf:
        with tempfile.TemporaryDirectory() as tmp:
            gpt2 = write_random_gpt2(Path(tmp) / "gpt2-random")
            comparisons += check_served(gpt2, text, tol=args.tol, modes=tuple(MODES), hf_backend=True)
    print(report(comparisons))
    print(f"{text_path.name}; {time.perf_counter() - t0:.1f} s")
    return 1 if any(c.failures for c in comparisons) else 0


if __name__ == "__main__":
    sys.exit(main())
