"""A run's curves as a PNG (from ``metrics.jsonl``), and the headless pyplot every figure uses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.metrics import read_metrics


@dataclass(frozen=True)
class Panel:
    """One axes: ``keys`` of the records of ``kind`` against ``x`` (``step`` or ``epoch``)."""

    title: str
    keys: tuple[str, ...]
    kind: str = "step"
    x: str = "step"
    # also draw the epoch means of the same keys over the step curve
    with_epoch_means: bool = False


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the headless backend: every figure of the project is drawn with it.

    Imported when a figure is drawn, not at the top: pyplot costs ~0.5 s, and the backend choice
    is process-wide (a module that imports this one must not switch a user's session to Agg).
    """
    import matplotlib  # see the docstring: only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")

    return plt


def plot_metrics(metrics: str | Path, out: str | Path, panels: list[Panel], cols: int = 3) -> Path:
    """Draw ``panels`` from ``metrics`` into ``out``; returns ``out``."""
    plt = pyplot()
    records = read_metrics(metrics)
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.6 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        chosen = [r for r in records if r.get("kind") == panel.kind]
        for key in panel.keys:
            points = [(r[panel.x] + (panel.x == "epoch"), r[key]) for r in chosen if key in r]
            if points:
                ax.plot(
                    *zip(*points, strict=True), "o-" if panel.kind == "epoch" else "-", label=key
                )
        if panel.with_epoch_means:
            for key in panel.keys:
                means = [
                    (r["step"], r[key]) for r in records if r.get("kind") == "epoch" and key in r
                ]
                if means:
                    ax.plot(*zip(*means, strict=True), "o-", label=f"{key} (epoch mean)")
        if len(panel.keys) > 1 or panel.with_epoch_means:
            ax.legend(fontsize=8)
        ax.set(title=panel.title, xlabel=panel.x)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return Path(out)
