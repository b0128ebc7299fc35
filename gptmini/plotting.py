"""Loss curves of a run: a PNG with matplotlib (an optional extra), or characters in the terminal without it.

Torch-free: `gptmini plot` reads only `metrics.jsonl`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from gptmini.errors import UserError

METRICS_FILE = "metrics.jsonl"  # one JSON object per log/eval line, written by the training loop


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `run_dir/metrics.jsonl` (unreadable lines, e.g. one cut by a kill, are skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not Path(run_dir).is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    if not path.exists():
        raise UserError(f"{run_dir} has no {METRICS_FILE}; pass a directory written by `gptmini train`")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def curves(records: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """(step, value) series of train loss and val loss from metrics records."""
    train = [
        (r["step"], r["train_loss"]) for r in records if r.get("tokens_per_s") and _ok(r.get("train_loss"))
    ]
    val = [(r["step"], r["val_loss"]) for r in records if _ok(r.get("val_loss"))]
    if not train and not val:
        raise UserError("metrics.jsonl holds no losses yet; let the run log a few steps first")
    return {"train loss": train, "val loss": val}


def _ok(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def plot_png(series: dict[str, list[tuple[float, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (name, points), style in zip(series.items(), ("-", "o-"), strict=False):
        if points:
            ax.plot(*zip(*points, strict=False), style, label=name, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_text(series: dict[str, list[tuple[float, float]]], width: int = 72, height: int = 18) -> str:
    """A character plot: `·` train loss, `●` val loss, y axis in nats/token, x axis in steps."""
    points = [p for pts in series.values() for p in pts]
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    if y_hi - y_lo < 1e-9:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    x_span = max(x_hi - x_lo, 1)
    grid = [[" "] * width for _ in range(height)]
    for (_, pts), mark in zip(series.items(), ("·", "●"), strict=False):
        for x, y in pts:
            col = round((x - x_lo) / x_span * (width - 1))
            row = round((y_hi - y) / (y_hi - y_lo) * (height - 1))
            grid[row][col] = mark
    lines = []
    for i, row in enumerate(grid):
        label = y_hi - (y_hi - y_lo) * i / (height - 1)
        lines.append(f"{label:7.3f} │{''.join(row)}")
    lines.append(" " * 8 + "└" + "─" * width)
    left, right = f"{x_lo:g}", f"step {x_hi:g}"
    lines.append(" " * 9 + left + " " * max(1, width - len(left) - len(right)) + right)
    lines.append(" " * 9 + "· train loss   ● val loss   (nats/token)")
    return "\n".join(lines)
