"""Training curves of every part with a ``metrics.jsonl``, and its final numbers.

Stages log ``kind=step`` records while training and one ``kind=epoch`` record per epoch (means
over the epoch, plus evaluation figures); see engine/metrics.py. The curves draw step records,
with the epoch means over them; keys only epoch records carry (evaluation codebook usage,
perplexity) get their own per-epoch panels. The "final" line reads the last epoch only: its epoch
record, and for keys it lacks, the mean of that epoch's step records, so every number on the line
describes the same epoch.
"""

from __future__ import annotations

import html
import json
import statistics
from pathlib import Path
from typing import Any

from engine.plots import Panel, plot_metrics
from pipeline.report.base import Report, per_part
from pipeline.report.discover import Part

# Record fields that are bookkeeping, not metrics.
SKIP = {"epoch", "step", "iter", "seconds", "lr", "samples_per_s", "images_per_s"}
SKIP |= {"bad_images", "skipped_images", "skipped"}
GROUPS = {
    "loss": ("loss",),
    "accuracy / cosine": ("acc", "cos", "top"),
    "codebook usage": ("usage", "used"),
    "perplexity": ("perplex",),
}


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a line being written (or broken) is skipped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _numeric(record: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in SKIP
    }


def final_numbers(records: list[dict[str, Any]]) -> tuple[str, dict[str, float]]:
    """(what the numbers describe, key -> value) for the last epoch of a run."""
    steps = [r for r in records if r.get("kind", "step") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    if epochs:
        last = epochs[-1]
        values = _numeric(last)
        epoch = last.get("epoch")
        of_epoch = [r for r in steps if r.get("epoch") == epoch]
        for key in {k for r in of_epoch for k in _numeric(r)} - set(values):
            values[key] = statistics.fmean(_numeric(r)[key] for r in of_epoch if key in _numeric(r))
        label = (
            f"final epoch ({int(epoch) + 1} of {len(epochs)})"
            if epoch is not None
            else "final epoch"
        )
        return label, values
    with_epoch = [r for r in steps if "epoch" in r]
    if with_epoch:
        epoch = with_epoch[-1]["epoch"]
        of_epoch = [r for r in with_epoch if r["epoch"] == epoch]
        keys = {k for r in of_epoch for k in _numeric(r)}
        values = {
            k: statistics.fmean(_numeric(r)[k] for r in of_epoch if k in _numeric(r)) for k in keys
        }
        return f"epoch {int(epoch) + 1}, mean of its {len(of_epoch)} logged steps", values
    if steps:
        return f"last logged step ({steps[-1].get('step', len(steps) - 1)})", _numeric(steps[-1])
    return "no records", {}


def panels(records: list[dict[str, Any]]) -> list[Panel]:
    """One panel per metric group: step curves (+ epoch means), then epoch-only keys."""
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    step_keys = {k for r in steps for k in _numeric(r)}
    epoch_keys = {k for r in epochs for k in _numeric(r)} - step_keys
    out = []
    for name, words in GROUPS.items():
        in_steps = sorted(k for k in step_keys if any(w in k for w in words))
        in_epochs = sorted(k for k in epoch_keys if any(w in k for w in words))
        if in_steps:
            means = any(k in r for r in epochs for k in in_steps)
            out.append(Panel(name, tuple(in_steps), "step", "step", with_epoch_means=means))
        if in_epochs:
            out.append(Panel(f"{name} (per epoch)", tuple(in_epochs), "epoch", "epoch"))
    return out


def part_curves(rep: Report, part: Part) -> str:
    metrics = part.file("metrics.jsonl")
    assert metrics is not None
    records = read_records(metrics)
    if not records:
        return "<p class='missing'>metrics.jsonl is empty (the run has not logged yet).</p>"
    chosen = panels(records)
    parts = []
    if chosen:
        name = rep.name(f"curves-{part.slug}")
        plot_metrics(metrics, rep.dir / name, chosen, cols=min(3, len(chosen)))
        parts.append(rep.image(name, f"{part.label} training curves"))
    else:
        parts.append("<p class='missing'>no step or epoch records with metrics to draw.</p>")
    label, values = final_numbers(records)
    line = ", ".join(f"{k} {v:.4g}" for k, v in sorted(values.items()))
    parts.append(f"<p class='small'>{html.escape(label)}: {html.escape(line)}</p>")
    if (part.path / "tensorboard").is_dir():
        command = f"tensorboard --logdir {part.path / 'tensorboard'}"
        parts.append(f"<p class='small'>Live curves: <code>{html.escape(command)}</code></p>")
    return "".join(parts)


def section_curves(rep: Report) -> str:
    parts = [p for p in rep.parts if p.file("metrics.jsonl")]
    return per_part(rep, parts, lambda part: part_curves(rep, part))
