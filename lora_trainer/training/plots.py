"""The loss curve as OUT/loss.png, from train_log.jsonl (matplotlib, drawn without a screen)."""

from __future__ import annotations

import json
from pathlib import Path

from ..fileio import atomic_path


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss(log_path: Path, png_path: Path) -> Path | None:
    """Draw loss per step (raw and a moving average) and the validation loss where it was computed;
    None when matplotlib or the log is missing."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no backend or figure manager to set up
    except ImportError:
        return None
    log_path = Path(log_path)
    if not log_path.is_file():
        return None
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    trained = [r for r in rows if "loss" in r]  # the step-0 row holds only the validation loss
    steps = [r["step"] for r in trained]
    losses = [r["loss"] for r in trained]
    validated = [r for r in rows if "val_loss" in r]
    fig = Figure(figsize=(7, 4), dpi=100)
    # fixed margins: tight_layout draws the whole figure once more to measure the labels, which
    # took as long as drawing it
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.96)
    ax = fig.add_subplot()
    ax.plot(steps, losses, color="#9ab", linewidth=0.8, label="loss")
    ax.plot(steps, _smooth(losses, max(1, len(losses) // 20)), color="#c33", linewidth=1.6, label="moving average")
    if validated:
        ax.plot([r["step"] for r in validated], [r["val_loss"] for r in validated], color="#27a", linewidth=1.4,
                marker="o", markersize=4, label="validation loss (held-out images)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")  # "best" searches every position against every point
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(png_path)
