"""Looking inside a model: attention maps, what each head does, the logit lens, attention during generation.

The first half computes tensors and plain dataclasses from a model; the second half renders them (terminal with
rich, PNG with matplotlib, one self-contained HTML page, JSON). Nothing here changes the fast path:

  * attention weights come from `CausalSelfAttention.keep_attention`, a flag the model checks in Python: when set,
    the layer also computes softmax(Q·Kᵀ/√d_k) in fp32 from the same Q and K it hands to SDPA;
  * the logit lens reads the residual stream through forward hooks, removed afterwards.

Layers and heads are numbered from 0. A token is labelled readably (`token_labels`): spaces `·`, newlines `↵`, a
character split over several GPT-2 tokens shown whole on the token where it starts (the tokens that finish it
show `…`), bytes that are not UTF-8 as `\\xNN`.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gptmini.decoding import AttentionStep
from gptmini.errors import UserError
from gptmini.model import GPT
from gptmini.tokenizer import Tokenizer

# Maps of every layer and head are n_layer·n_head·T² floats: above this many bytes, ask for fewer tokens instead of
# running out of memory (GPT-2 small fits its whole 1,024-token context; GPT-2 XL about 470 tokens).
MAX_MAP_BYTES = 1 << 30
# Head roles: a head is marked when its mean weight on that key is at least this.
ROLE_MARKS = {"previous-token": 0.5, "induction": 0.4, "first-token": 0.5, "self": 0.5}
INDUCTION_LENGTH = (
    40  # random tokens repeated once for the induction score: chance (~1/80) stays far below 0.4
)
INDUCTION_BATCH = 4
DEFAULT_HEADS_TEXT = (
    "The cat sat on the mat. The dog sat on the log. When the cat saw the dog, the cat ran up the tree, and "
    "the dog ran after the cat. Mary and John went to the market; Mary bought bread and John bought milk, and "
    "then John gave the milk to Mary."
)
VISIBLE = {" ": "·", "\n": "↵", "\t": "⇥", "\r": "␍"}
TEMPLATE = Path(__file__).parent / "assets" / "inspect.html"


# ---- readable tokens ----------------------------------------------------------------------------------------


def token_labels(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """One readable label per token: whitespace visible, split characters merged, stray bytes escaped."""
    pieces = [_token_bytes(tokenizer, i) for i in ids]
    data = b"".join(pieces)
    owner = [t for t, piece in enumerate(pieces) for _ in piece]  # byte index → token index
    labels = [""] * len(pieces)
    continues = [False] * len(pieces)  # the token starts inside a character begun by an earlier token
    p = 0
    while p < len(data):
        n = _utf8_length(data, p)
        text = _visible(data[p : p + n].decode("utf-8")) if n else f"\\x{data[p]:02x}"
        n = n or 1
        labels[owner[p]] += text
        for q in range(p + 1, p + n):
            if owner[q] != owner[p]:
                continues[owner[q]] = True
        p += n
    return [("…" if cont else "") + label for label, cont in zip(labels, continues, strict=True)]


def _token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    try:
        return tokenizer.token_bytes(token_id)
    except (KeyError, IndexError, ValueError):  # an id the tokenizer has no text for (e.g. unused padding)
        return f"<{token_id}>".encode()


def _utf8_length(data: bytes, p: int) -> int:
    """Bytes in the valid UTF-8 character starting at `p`, or 0 if none starts there."""
    lead = data[p]
    n = 1 if lead < 0x80 else 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4
    if lead >= 0xF5 or 0x80 <= lead < 0xC2 or p + n > len(data):
        return 0
    try:
        data[p : p + n].decode("utf-8")
    except UnicodeDecodeError:
        return 0
    return n


def _visible(text: str) -> str:
    return "".join(VISIBLE.get(c, f"\\x{ord(c):02x}" if (ord(c) < 32 or ord(c) == 127) else c) for c in text)


# ---- computing ----------------------------------------------------------------------------------------------


@dataclass
class Attention:
    """Attention maps of one text: `weights[layer, head, query, key]`, fp32, rows summing to 1, causal."""

    ids: list[int]
    tokens: list[str]
    weights: torch.Tensor
    dropped: int = 0  # tokens cut from the start of the text (`last`)

    def to_json(self) -> dict[str, Any]:
        # Rounded to 1e-6 (in float64, so they print short): a third of the text of float32's full digits.
        weights = self.weights.double().mul(1e6).round().div(1e6)
        return {"tokens": self.tokens, "ids": self.ids, "attention": weights.tolist()}


@dataclass
class HeadScore:
    layer: int
    head: int
    entropy: float  # nats, mean over queries 1.. (uniform over q+1 keys would be ln(q+1))
    previous_token: float  # mean weight on the key just before the query
    first_token: float  # mean weight on key 0 (an "attention sink")
    self_token: float  # mean weight on the query's own position
    induction: float  # on repeated random tokens: weight on the token after the query's first occurrence
    roles: list[str] = field(default_factory=list)


@dataclass
class HeadScores:
    scores: list[HeadScore]
    text_tokens: int
    induction_length: int

    def to_json(self) -> dict[str, Any]:
        return {
            "text_tokens": self.text_tokens,
            "induction_length": self.induction_length,
            "marks": ROLE_MARKS,
            "heads": [vars(s) for s in self.scores],
        }


@dataclass
class LogitLens:
    """Per layer (`layers[0]` is the embedding) and position: the top next tokens, and p(the actual next token)."""

    ids: list[int]
    tokens: list[str]
    layers: list[str]
    top_ids: torch.Tensor  # [n_layer + 1, T, k]
    top_probs: torch.Tensor  # [n_layer + 1, T, k]
    next_probs: torch.Tensor  # [n_layer + 1, T - 1]: layer l's probability of ids[t + 1] at position t
    top_labels: list[list[list[str]]]  # labels of top_ids
    dropped: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "ids": self.ids,
            "layers": self.layers,
            "top": [
                [
                    [{"token": s, "id": i, "p": p} for s, i, p in zip(labels, ids, probs, strict=True)]
                    for labels, ids, probs in zip(layer_labels, layer_ids, layer_probs, strict=True)
                ]
                for layer_labels, layer_ids, layer_probs in zip(
                    self.top_labels, self.top_ids.tolist(), self.top_probs.tolist(), strict=True
                )
            ],
            "next_prob": self.next_probs.tolist(),
        }


def max_tokens(model: GPT) -> int:
    """The most tokens whose attention maps (every layer and head) fit in `MAX_MAP_BYTES`, at most the context."""
    c = model.config
    return max(2, min(c.block_size, math.isqrt(MAX_MAP_BYTES // (4 * c.n_layer * c.n_head))))


def encode_text(tokenizer: Tokenizer, text: str, cap: int, last: int | None = None) -> tuple[list[int], int]:
    """(ids, tokens dropped from the start): the whole text, or its last `last` tokens; never more than `cap`."""
    ids = tokenizer.encode(text)
    if not ids:
        raise UserError("the text is empty; give some text to inspect")
    if last is not None:
        if last < 1:
            raise UserError(f"--last must be >= 1, got {last}")
        if last > cap:
            raise UserError(f"--last {last} is more than the {cap} tokens this model can be inspected over")
        return ids[-last:], max(0, len(ids) - last)
    if len(ids) > cap:
        raise UserError(
            f"the text has {len(ids)} tokens, more than the {cap} this model can be inspected over; "
            f"pass --last N (N <= {cap}) to look at its last N tokens"
        )
    return ids, 0


@contextlib.contextmanager
def _eval_mode(model: GPT) -> Iterator[None]:
    """Inspection sees the deterministic network: no dropout, no gradients."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: GPT) -> torch.device:
    return model.transformer.wte.weight.device


def attention_weights(model: GPT, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """`[n_layer, n_head, T, T]` (or `[B, n_layer, n_head, T, T]` for a 2-d batch of ids), fp32 on the CPU."""
    idx = torch.as_tensor(ids, dtype=torch.long, device=_device(model))
    batch = idx.dim() == 2
    with _eval_mode(model):
        maps = model.attention_maps(idx if batch else idx[None])
    weights = torch.stack(maps, dim=1).float().cpu()  # [B, L, H, T, T]
    return weights if batch else weights[0]


def attention(model: GPT, tokenizer: Tokenizer, text: str, *, last: int | None = None) -> Attention:
    """Attention maps of `text` (or its last `last` tokens) in every layer and head."""
    ids, dropped = encode_text(tokenizer, text, max_tokens(model), last)
    return Attention(ids, token_labels(tokenizer, ids), attention_weights(model, ids), dropped)


def pattern_scores(weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean entropy and previous/first/self-token weights per head (`[L, H]` each) from `[L, H, T, T]` maps.

    Query 0 can only attend to itself, so the means run over queries 1..T-1.
    """
    T = weights.shape[-1]
    if T < 2:
        raise UserError("head scores need a text of at least 2 tokens")
    q = torch.arange(1, T)
    rows = weights[:, :, 1:]  # [L, H, T-1, T]
    plogp = torch.where(rows > 0, rows * rows.clamp_min(1e-30).log(), torch.zeros_like(rows))
    return {
        "entropy": -plogp.sum(-1).mean(-1),
        "previous_token": weights[:, :, q, q - 1].mean(-1),
        "first_token": weights[:, :, q, 0].mean(-1),
        "self_token": weights[:, :, q, q].mean(-1),
    }


def induction_scores(
    model: GPT,
    *,
    token_range: tuple[int, int],
    bos_id: int | None,
    length: int = INDUCTION_LENGTH,
    batch: int = INDUCTION_BATCH,
    seed: int = 0,
) -> tuple[torch.Tensor, int]:
    """(`[L, H]` induction scores, the length used): the weights of heads that complete a repeated pattern.

    Each sequence is `length` random tokens (from `token_range`, after `bos_id` if given), then the same tokens
    again. A query in the second copy holding token x looks, if it is an induction head, at the token that came
    after x's first occurrence: its score is the mean weight on that key.
    """
    offset = 0 if bos_id is None else 1
    length = max(2, min(length, (model.config.block_size - offset) // 2))
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(*token_range, (batch, length), generator=generator)
    parts = [first, first] if bos_id is None else [torch.full((batch, 1), bos_id), first, first]
    weights = attention_weights(model, torch.cat(parts, dim=1))  # [B, L, H, S, S]
    j = torch.arange(length)
    # query: second occurrence of first[:, j] (at offset + length + j); key: the token after its first occurrence
    return weights[..., offset + length + j, offset + j + 1].mean(dim=(0, -1)), length


def score_heads(
    model: GPT,
    ids: Sequence[int],
    *,
    token_range: tuple[int, int],
    bos_id: int | None,
    seed: int = 0,
) -> HeadScores:
    """Every head's scores: patterns on the text `ids`, induction on repeated random tokens from `token_range`."""
    patterns = pattern_scores(attention_weights(model, ids))
    induction, length = induction_scores(model, token_range=token_range, bos_id=bos_id, seed=seed)
    scores = []
    for layer in range(model.config.n_layer):
        for head in range(model.config.n_head):
            values = {name: float(t[layer, head]) for name, t in patterns.items()}
            score = HeadScore(layer, head, **values, induction=float(induction[layer, head]))
            by_role = {
                "previous-token": score.previous_token,
                "induction": score.induction,
                "first-token": score.first_token,
                "self": score.self_token,
            }
            score.roles = [role for role, value in by_role.items() if value >= ROLE_MARKS[role]]
            scores.append(score)
    return HeadScores(scores, len(ids), length)


def head_scores(model: GPT, tokenizer: Tokenizer, text: str | None = None, *, seed: int = 0) -> HeadScores:
    """`score_heads` on `text` (default: a short English passage); induction on ordinary BPE tokens after EOT."""
    if text is None:  # the built-in passage, cut to what the model can take
        ids = tokenizer.encode(DEFAULT_HEADS_TEXT)[: max_tokens(model)]
    else:
        ids, _ = encode_text(tokenizer, text, max_tokens(model))
    # Model ids below <|endoftext|> are the BPE tokens, in GPT-2's numbering and in a compact vocabulary alike.
    return score_heads(model, ids, token_range=(0, tokenizer.eot_id), bos_id=tokenizer.eot_id, seed=seed)


def residual_streams(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream `[B, T, n_embd]` entering the first block, then leaving each block (n_layer + 1)."""
    streams: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        streams.append(output)

    modules = [model.transformer.drop, *model.transformer.h]
    hooks = [m.register_forward_hook(keep) for m in modules]
    try:
        with _eval_mode(model):
            model.hidden_states(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return streams


def lens_logits(model: GPT, idx: torch.Tensor) -> Iterator[torch.Tensor]:
    """Per residual stream (embedding, then each block), the logits `[B, T, vocab]` it would give if it were last:
    the final LayerNorm and the LM head applied to it. The last one is the model's own output."""
    for stream in residual_streams(model, idx):
        with _eval_mode(model):
            yield model.logits(model.transformer.ln_f(stream))


def logit_lens(
    model: GPT, tokenizer: Tokenizer, text: str, *, top: int = 5, last: int | None = None
) -> LogitLens:
    """The logit lens of `text`: each layer's top `top` next tokens and its probability of the real next one."""
    if top < 1:
        raise UserError(f"--top must be >= 1, got {top}")
    ids, dropped = encode_text(tokenizer, text, model.config.block_size, last)
    idx = torch.tensor([ids], device=_device(model))
    following = idx[0, 1:]
    top_ids, top_probs, next_probs = [], [], []
    for logits in lens_logits(model, idx):
        log_probs = logits[0].float().log_softmax(-1)
        values, indices = log_probs.topk(min(top, log_probs.shape[-1]), dim=-1)
        top_ids.append(indices.cpu())
        top_probs.append(values.exp().cpu())
        next_probs.append(log_probs[torch.arange(len(ids) - 1), following].exp().cpu())
    top_ids_t = torch.stack(top_ids)
    labels = {i: token_labels(tokenizer, [i])[0] for i in top_ids_t.unique().tolist()}
    top_labels = [[[labels[i] for i in row] for row in layer] for layer in top_ids_t.tolist()]
    layers = ["embed"] + [str(i) for i in range(model.config.n_layer)]
    return LogitLens(
        ids,
        token_labels(tokenizer, ids),
        layers,
        top_ids_t,
        torch.stack(top_probs),
        torch.stack(next_probs),
        top_labels,
        dropped,
    )


class GenerationAttention:
    """Records, for each generated token, what the query that produced it attended to (the first sample).

    Pass it as `on_attention` to generation; it keeps `[n_layer, n_head, n_keys]` fp32 per token. The keys are the
    tokens in the window at that step, so a window slide shows as keys that start later.
    """

    def __init__(self) -> None:
        self.window_ids: list[int] = []  # the kept prompt: the keys of the first step
        self.first_key = 0  # index, in the prompt, of window_ids[0] (> 0 when a long prompt was cut)
        self.generated: list[int] = []
        self.key_starts: list[int] = []  # per new token: index of its first key in window_ids + generated
        self.weights: list[torch.Tensor] = []

    def __call__(self, step: AttentionStep) -> None:
        if not self.generated:
            self.window_ids = step.keys[0].tolist()
            self.first_key = step.key_start
        self.key_starts.append(step.key_start - self.first_key)
        self.weights.append(torch.stack([w[0] for w in step.weights]).float().cpu())
        self.generated.append(int(step.tokens[0]))

    @property
    def ids(self) -> list[int]:
        return self.window_ids + self.generated


def check_generation_capture(model: GPT, max_new_tokens: int) -> None:
    """Refuse a `--show-attention` run whose recorded weights would not fit in `MAX_MAP_BYTES`."""
    c = model.config
    need = 4 * max_new_tokens * c.n_layer * c.n_head * c.block_size
    if need > MAX_MAP_BYTES:
        most = MAX_MAP_BYTES // (4 * c.n_layer * c.n_head * c.block_size)
        raise UserError(
            f"--show-attention keeps every head's weights for each new token: at most {most} tokens for this "
            f"model (asked for {max_new_tokens}); lower --max-new-tokens"
        )


# ---- terminal -----------------------------------------------------------------------------------------------

SHORT_TEXT = 20  # tokens: up to this many, `render_attention` draws the whole grid


def _head_view(att: Attention, layer: int, head: int | None) -> tuple[torch.Tensor, str]:
    """The `[T, T]` map of one head (or the mean over heads when `head` is None) and its title."""
    n_layer, n_head = att.weights.shape[:2]
    _check_range(n_layer, n_head, layer, head)
    if head is None:
        return att.weights[layer].mean(0), f"layer {layer}, mean of {n_head} heads"
    return att.weights[layer, head], f"layer {layer}, head {head}"


def check_layer_head(config: Any, layer: int | None, head: int | None) -> None:
    """`--layer` / `--head` within the model's (numbered from 0), said in one line otherwise."""
    _check_range(config.n_layer, config.n_head, layer, head)


def _check_range(n_layer: int, n_head: int, layer: int | None, head: int | None) -> None:
    if layer is not None and not 0 <= layer < n_layer:
        raise UserError(f"--layer must be in 0..{n_layer - 1} (layers count from 0), got {layer}")
    if head is not None and not 0 <= head < n_head:
        raise UserError(f"--head must be in 0..{n_head - 1} (heads count from 0), got {head}")


def _titled(title: str, *renderables: Any) -> Any:
    """A bold title line above tables (a table's own title would wrap to the table's width)."""
    from rich.console import Group
    from rich.text import Text

    return Group(Text(title, style="bold"), *renderables)


def render_attention(att: Attention, layer: int, head: int | None, *, top: int = 3) -> Any:
    """A rich renderable: the shaded query × key grid for a short text, else each token's strongest keys."""
    from rich.table import Table
    from rich.text import Text

    grid, title = _head_view(att, layer, head)
    T = len(att.ids)
    if T <= SHORT_TEXT:
        table = Table()
        table.add_column("query", no_wrap=True)
        for k in range(T):
            table.add_column(str(k), justify="right", no_wrap=True)
        for q in range(T):
            cells = [Text(f"{q} {att.tokens[q]}")]
            for k in range(T):
                w = float(grid[q, k])
                cells.append(Text(f"{round(100 * w):>2}", style=_shade(w)) if k <= q else Text(""))
            table.add_row(*cells)
        return _titled(f"attention, {title} (row: query, column: key; weights ×100)", table)
    table = Table()
    table.add_column("#", justify="right")
    table.add_column("query", no_wrap=True)
    table.add_column("attends to (weight)")
    for q in range(T):
        values, keys = grid[q, : q + 1].topk(min(top, q + 1))
        line = Text()
        for n, (w, k) in enumerate(zip(values.tolist(), keys.tolist(), strict=True)):
            line.append(("  " if n else "") + f"{k} {att.tokens[k]}", style=_shade(w))
            line.append(f" {w:.2f}")
        table.add_row(str(q), att.tokens[q], line)
    return _titled(f"attention, {title}: each token's {top} strongest keys", table)


def _shade(weight: float) -> str:
    """A background from black to bright orange, by weight^0.6 (so weights of a few % still show)."""
    level = max(0.0, min(1.0, weight)) ** 0.6
    r, g, b = round(255 * level), round(140 * level), round(20 * level)
    fg = "black" if level > 0.5 else "white"
    return f"{fg} on rgb({r},{g},{b})"


def render_heads(result: HeadScores) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table()
    for name in ("layer", "head", "entropy", "prev", "first", "self", "induction"):
        table.add_column(name, justify="right")
    table.add_column("looks like")
    for s in result.scores:
        cells = [str(s.layer), str(s.head), f"{s.entropy:.2f}"]
        for role, value in (
            ("previous-token", s.previous_token),
            ("first-token", s.first_token),
            ("self", s.self_token),
            ("induction", s.induction),
        ):
            cells.append(Text(f"{value:.2f}", style="bold green" if role in s.roles else ""))
        table.add_row(*cells, ", ".join(s.roles))
    title = (
        f"heads: patterns on {result.text_tokens} tokens of text, induction on {result.induction_length} random "
        f"tokens repeated; marked: prev ≥ {ROLE_MARKS['previous-token']}, first ≥ {ROLE_MARKS['first-token']}, "
        f"self ≥ {ROLE_MARKS['self']}, induction ≥ {ROLE_MARKS['induction']}"
    )
    return _titled(title, table)


SPARK = "▁▂▃▄▅▆▇█"


def render_lens(lens: LogitLens) -> Any:
    """Rows: positions; columns: layers, each the top next token and its probability (green: the real next one);
    then the top tokens by layer at the last position."""
    from rich.table import Table
    from rich.text import Text

    table = Table()
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("token", no_wrap=True)
    for name in lens.layers:
        table.add_column(name, no_wrap=True)
    table.add_column("actual next: p by layer", no_wrap=True)
    T = len(lens.ids)
    for t in range(T):
        actual = lens.ids[t + 1] if t + 1 < T else None
        cells = [str(t), lens.tokens[t]]
        for layer in range(len(lens.layers)):
            label, p = lens.top_labels[layer][t][0], float(lens.top_probs[layer, t, 0])
            hit = actual is not None and int(lens.top_ids[layer, t, 0]) == actual
            cells.append(Text(f"{label} {p:.2f}", style="bold green" if hit else ""))
        spark = ""
        if actual is not None:
            spark = "".join(SPARK[min(7, int(8 * math.sqrt(float(p))))] for p in lens.next_probs[:, t])
            spark = f"{lens.tokens[t + 1]} {spark} {float(lens.next_probs[-1, t]):.2f}"
        cells.append(spark)
        table.add_row(*cells)
    k = lens.top_ids.shape[-1]
    last = Table()
    last.add_column("layer")
    for n in range(k):
        last.add_column(str(n + 1), no_wrap=True)
    for layer, name in enumerate(lens.layers):
        row = [
            f"{label} {float(p):.2f}"
            for label, p in zip(lens.top_labels[layer][-1], lens.top_probs[layer, -1], strict=True)
        ]
        last.add_row(name, *row)
    return _titled(
        "logit lens: each layer's top next token and its probability (green: it is the actual next token); "
        "last column: the actual next token's probability, bars from the embedding to the last layer (height ∝ √p)",
        table,
        Text(f"\ntop {k} next tokens after the last token ({lens.tokens[-1]}), by layer", style="bold"),
        last,
    )


# ---- PNG ----------------------------------------------------------------------------------------------------

PNG_DPI = 100


def attention_png_size(n_layer: int, n_head: int, n_tokens: int) -> tuple[float, float]:
    """Figure size in inches of `attention_png`: one square panel per head, larger with more tokens to label."""
    panel = 2.2 if n_tokens > 24 else max(2.2, 0.16 * n_tokens + 0.8)
    return (0.6 + panel * n_head, 0.5 + panel * n_layer)


def lens_png_size(n_layers: int, n_tokens: int) -> tuple[float, float]:
    return (2.0 + 0.75 * n_tokens, 1.6 + 0.42 * n_layers)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def attention_png(att: Attention, path: Path) -> tuple[int, int]:
    """A grid of layer × head heatmaps (row: query, column: key) with token labels; returns (width, height) px."""
    plt = _pyplot()
    n_layer, n_head, T = att.weights.shape[0], att.weights.shape[1], len(att.ids)
    size = attention_png_size(n_layer, n_head, T)
    fig, axes = plt.subplots(n_layer, n_head, figsize=size, dpi=PNG_DPI, squeeze=False)
    upper = torch.ones(T, T, dtype=torch.bool).triu(1)
    label = T <= 24
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            grid = att.weights[layer, head].masked_fill(upper, float("nan")).numpy()
            ax.imshow(grid, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {layer} head {head}", fontsize=7)
            if label:
                ax.set_xticks(range(T), att.tokens, rotation=90, fontsize=5)
                ax.set_yticks(range(T), att.tokens, fontsize=5)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
            if layer == n_layer - 1:
                ax.set_xlabel("key", fontsize=6)
            if head == 0:
                ax.set_ylabel("query", fontsize=6)
    fig.subplots_adjust(left=0.5 / size[0] + 0.02, right=0.99, bottom=0.06, top=0.96, wspace=0.5, hspace=0.5)
    _save(fig, path)
    return round(size[0] * PNG_DPI), round(size[1] * PNG_DPI)


def lens_png(lens: LogitLens, path: Path) -> tuple[int, int]:
    """Layers × positions, shaded by p(actual next token), each cell labelled with that layer's top token."""
    plt = _pyplot()
    T, n = len(lens.ids), len(lens.layers)
    size = lens_png_size(n, T)
    fig, ax = plt.subplots(figsize=size, dpi=PNG_DPI)
    grid = torch.full((n, T), float("nan"))
    grid[:, : T - 1] = lens.next_probs
    image = ax.imshow(grid.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    for layer in range(n):
        for t in range(T):
            p = float(lens.top_probs[layer, t, 0])
            ax.text(t, layer, f"{lens.top_labels[layer][t][0]}\n{p:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if (t == T - 1 or grid[layer, t] < 0.5) else "black")  # fmt: skip
    ax.set_xticks(range(T), [f"{tok}" for tok in lens.tokens], rotation=60, fontsize=7)
    ax.set_yticks(range(n), lens.layers, fontsize=7)
    ax.set_xlabel("input token (cell: that layer's top next token and its probability)")
    ax.set_ylabel("layer")
    ax.set_title("logit lens — shade: probability of the actual next token")
    fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
    fig.subplots_adjust(left=0.9 / size[0], right=0.96, bottom=1.1 / size[1], top=1 - 0.4 / size[1])
    _save(fig, path)
    return round(size[0] * PNG_DPI), round(size[1] * PNG_DPI)


def _save(fig: Any, path: Path) -> None:
    import warnings

    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # glyphs the font lacks (CJK) are drawn as boxes, without a warning
        fig.savefig(path, dpi=PNG_DPI)
    plt.close(fig)


def check_png_support() -> None:
    """`--png` needs matplotlib, an optional extra: say what to install, before any model is loaded."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise UserError("--png needs matplotlib: pip install 'gptmini[plot]' (or pip install matplotlib)")


# ---- HTML ---------------------------------------------------------------------------------------------------

WEIGHT_SCALE = 65535  # weights travel as uint16: exact to 1.5e-5, a third of the size of decimal text


def _pack(rows: Sequence[torch.Tensor]) -> tuple[str, list[int]]:
    """Base64 of every row's weights as little-endian uint16, and each row's offset (in weights)."""
    offsets, total = [], 0
    for r in rows:
        offsets.append(total)
        total += r.numel()
    flat = torch.cat([r.reshape(-1) for r in rows]) if rows else torch.zeros(0)
    quantised = (flat.clamp(0, 1) * WEIGHT_SCALE).round().to(torch.int32).numpy().astype("<u2")
    return base64.b64encode(quantised.tobytes()).decode("ascii"), offsets


def _page(data: dict[str, Any]) -> str:
    """The page template with `data` inlined (no `</script>` can end the block early)."""
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    template = TEMPLATE.read_text(encoding="utf-8")
    return template.replace("__TITLE__", html.escape(data["title"])).replace("/*__DATA__*/null", blob)


def _byte_hints(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    return [_token_bytes(tokenizer, i).hex(" ") for i in ids]


def attention_html(att: Attention, tokenizer: Tokenizer, title: str) -> str:
    """One self-contained page: hover or click a token to see its attention in every head; pick layer and head."""
    n_layer, n_head, T = att.weights.shape[0], att.weights.shape[1], len(att.ids)
    # query q's weights over keys 0..q, every layer and head: [L, H, q+1]
    blob, offsets = _pack([att.weights[:, :, q, : q + 1] for q in range(T)])
    notes = _dropped_note(att.dropped)
    return _page(
        {
            "kind": "attention",
            "title": title,
            "n_layer": n_layer,
            "n_head": n_head,
            "tokens": att.tokens,
            "ids": att.ids,
            "bytes": _byte_hints(tokenizer, att.ids),
            "queries": [[q, 0, q + 1, offsets[q]] for q in range(T)],
            "weights": blob,
            "scale": WEIGHT_SCALE,
            "notes": notes,
        }
    )


def generation_html(rec: GenerationAttention, tokenizer: Tokenizer, title: str) -> str:
    """The generated text as a page: each new token shows what it attended to when it was produced."""
    if not rec.generated:
        raise UserError("nothing was generated, so there is no attention to show")
    n_layer, n_head = rec.weights[0].shape[:2]
    blob, offsets = _pack(rec.weights)
    prompt = len(rec.window_ids)
    queries = [[prompt + s, rec.key_starts[s], w.shape[-1], offsets[s]] for s, w in enumerate(rec.weights)]
    slides = sum(1 for a, b in zip(rec.key_starts, rec.key_starts[1:], strict=False) if b > a)
    notes = [f"the window slid {slides} time(s): keys before a token's window are dimmed"] if slides else []
    if rec.first_key:
        notes.append(f"the prompt's first {rec.first_key} tokens did not fit the context and are not shown")
    return _page(
        {
            "kind": "generation",
            "title": title,
            "n_layer": int(n_layer),
            "n_head": int(n_head),
            "tokens": token_labels(tokenizer, rec.ids),
            "ids": rec.ids,
            "bytes": _byte_hints(tokenizer, rec.ids),
            "prompt_tokens": prompt,
            "queries": queries,
            "weights": blob,
            "scale": WEIGHT_SCALE,
            "notes": notes,
        }
    )


def lens_html(lens: LogitLens, title: str) -> str:
    data = lens.to_json()
    return _page(
        {
            "kind": "lens",
            "title": title,
            "tokens": lens.tokens,
            "ids": lens.ids,
            "layers": lens.layers,
            "top": [
                [[[c["token"], round(c["p"], 5), c["id"]] for c in cell] for cell in layer]
                for layer in data["top"]
            ],
            "next_prob": [[round(p, 5) for p in layer] for layer in data["next_prob"]],
            "notes": _dropped_note(lens.dropped),
        }
    )


def _dropped_note(dropped: int) -> list[str]:
    return [f"the text's first {dropped} tokens are left out (--last)"] if dropped else []
