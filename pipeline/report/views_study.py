"""The K-vs-fresh views study of ``benchmarks/bench_seeds.py``: its table, noise line and plot.

The script trains the same student with K stored view seeds (``K=1, 2, 4, 8``) and with a fresh
view every epoch (``fresh``), over a few run seeds, and writes ``seeds_k.json`` (+ ``seeds_k.png``
beside it). The table shows each configuration's mean ± stdev over its run seeds. A K's difference
from fresh counts as inside the noise when it is at most the larger of the two stdevs; with three
run seeds that is a rough yardstick, and the page says so. The plot is the PNG beside the JSON when
there is one, else drawn here: ``draw``/``plot`` are the one home of that plot (the script imports
them).
"""

from __future__ import annotations

import html
import re
import shlex
import shutil
import statistics
from pathlib import Path
from typing import Any

from engine.plots import pyplot
from pipeline.report.base import Report, per_part
from pipeline.report.discover import Part, is_views_study, read_json

Results = dict[str, dict[str, list[float]]]
LABELS = {
    "heldout_mim_acc": "held-out MIM top-1 %",
    "probe_top1": "linear probe top-1 %",
    "pretrain_seconds": "pretrain wall s",
}
COMPARED = ("heldout_mim_acc", "probe_top1")  # the accuracies judged against fresh
BASELINE = "fresh"
SCRIPT = "benchmarks/bench_seeds.py"


def mean_spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample stdev) over run seeds; the stdev of a single run is 0."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def ordered(results: Results) -> Results:
    """The configurations by K, then fresh (the order the script writes them in)."""

    def key(name: str) -> tuple[int, int]:
        match = re.fullmatch(r"K=(\d+)", name)
        return (0, int(match.group(1))) if match else (1, 0)

    return {name: results[name] for name in sorted(results, key=key)}


def draw(results: Results) -> Any:
    """The study's figure: held-out MIM and probe top-1, mean ± stdev per configuration."""
    plt = pyplot()
    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, metric, title in zip(
        axes, ("heldout_mim_acc", "probe_top1"), ("held-out MIM top-1 (%)", "linear probe top-1 (%)"),
        strict=True,
    ):  # fmt: skip
        stats = [mean_spread(results[n][metric]) for n in names]
        ax.errorbar(range(len(names)), [m for m, _ in stats], yerr=[s for _, s in stats],
                    fmt="o", capsize=4)  # fmt: skip
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.suptitle("K stored view seeds vs a fresh view every epoch (mean ± stdev over run seeds)")
    fig.tight_layout()
    return fig


def plot(results: Results, path: Path) -> None:
    """``draw`` saved as the PNG ``bench_seeds.py`` writes beside its JSON."""
    fig = draw(results)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def load(part: Part) -> dict[str, Any]:
    """The study JSON of a ``views`` part, checked again (it may have changed since discovery)."""
    assert part.source is not None
    data = read_json(part.source)
    if not is_views_study(data):
        raise ValueError(f"{part.source} is no longer a views study of {SCRIPT}")
    return data


def _cell(values: list[float], digits: int = 2) -> str:
    mean, spread = mean_spread(values)
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def table(results: Results) -> str:
    """One row per configuration: runs, both accuracies and the pretrain wall time."""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{len(res['heldout_mim_acc'])}</td>"
        f"<td>{_cell(res['heldout_mim_acc'])}</td><td>{_cell(res['probe_top1'])}</td>"
        f"<td>{_cell(res['pretrain_seconds'], 1)}</td></tr>"
        for name, res in results.items()
    )
    heads = "".join(f"<th>{html.escape(LABELS[m])}</th>" for m in LABELS)
    return f"<table><tr><th>views</th><th>run seeds</th>{heads}</tr>{rows}</table>"


def compare(results: Results, metric: str) -> list[tuple[str, float, float, str]]:
    """(config, mean - fresh's mean, the larger stdev, verdict) of each K against fresh.

    The verdict is ``inside`` when the difference is at most the larger stdev, ``outside`` when
    it is more, ``no spread`` when either side has a single run (no stdev to judge by).
    """
    if BASELINE not in results:
        return []
    base = results[BASELINE][metric]
    base_mean, base_spread = mean_spread(base)
    out = []
    for name, res in results.items():
        if name == BASELINE:
            continue
        mean, spread = mean_spread(res[metric])
        diff, larger = mean - base_mean, max(spread, base_spread)
        if min(len(res[metric]), len(base)) < 2:
            verdict = "no spread"
        else:
            verdict = "inside" if abs(diff) <= larger else "outside"
        out.append((name, diff, larger, verdict))
    return out


def noise_line(results: Results, metric: str) -> str:
    """Which K differ from fresh by more than the run-seed spread, as one plain-text sentence."""
    label = LABELS[metric]
    if BASELINE not in results:
        return f"{label}: no {BASELINE} configuration to compare against."
    groups: dict[str, list[str]] = {"inside": [], "outside": [], "no spread": []}
    for name, diff, larger, verdict in compare(results, metric):
        groups[verdict].append(f"{name} ({diff:+.2f}; larger stdev {larger:.2f})")
    said = {
        "inside": "inside the run-seed spread",
        "outside": "outside the run-seed spread",
        "no spread": "not judged (one run seed, no spread)",
    }
    bits = [f"{said[v]}: {', '.join(items)}" for v, items in groups.items() if items]
    base = _cell(results[BASELINE][metric])
    return f"{label} vs {BASELINE} ({base}): {'; '.join(bits) or 'no K to compare'}."


def rebuilt_command(args: dict[str, Any]) -> str:
    """The script's command line from the ``args`` it recorded (values are ``str(value)``)."""
    words = [".venv/bin/python", SCRIPT]
    for key, value in args.items():
        text = str(value)
        if text == "None":
            continue
        if text.startswith("[") and text.endswith("]"):
            values = [v.strip().strip("'\"") for v in text[1:-1].split(",") if v.strip()]
        else:
            values = [text]
        words += [f"--{key.replace('_', '-')}", *values]
    return shlex.join(words)


def commands(data: dict[str, Any]) -> str:
    """The command(s) the JSON records, else the one rebuilt from its args, said as such."""
    recorded = data.get("command")
    if isinstance(recorded, str):
        recorded = [recorded]
    if isinstance(recorded, list) and recorded and all(isinstance(c, str) for c in recorded):
        code = html.escape("\n".join(recorded))
        return f"<p>Made by:</p><pre><code>{code}</code></pre>"
    return (
        "<p class='small'>The JSON records no command (written before the script recorded its "
        "own); the equivalent command, rebuilt from the arguments it recorded:</p>"
        f"<pre><code>{html.escape(rebuilt_command(data['args']))}</code></pre>"
    )


def facts(part: Part) -> str:
    """The overview's line: configurations, run seeds, images and epochs."""
    data = read_json(part.source) if part.source else None
    if not is_views_study(data):
        return ""
    results = data["results"]
    runs = max(len(r["heldout_mim_acc"]) for r in results.values())
    args = data["args"]
    bits = [f"{len(results)} configurations x {runs} run seeds"]
    bits += [f"{args[k]} {k}" for k in ("images", "epochs") if k in args]
    return ", ".join(bits)


def _context(data: dict[str, Any]) -> str:
    """Tokenize time and machine load, when recorded: what the wall times carry."""
    bits = []
    tokenize = data.get("tokenize_seconds_8_seeds")
    if isinstance(tokenize, (int, float)):
        bits.append(
            f"tokenizing the stored seeds once took {tokenize:.1f} s (not in the pretrain times)"
        )
    load = data.get("load_after")
    if isinstance(load, list) and all(isinstance(v, (int, float)) for v in load):
        bits.append(f"load average when it finished: {' '.join(f'{v:.2f}' for v in load)}")
    return f"<p class='small'>{html.escape('; '.join(bits))}.</p>" if bits else ""


def figure(rep: Report, part: Part, results: Results) -> str:
    """The PNG beside the JSON (copied next to the page), else the same plot drawn here."""
    assert part.source is not None
    png = part.source.with_suffix(".png")
    alt = "K stored view seeds vs fresh views: held-out MIM and probe top-1"
    stem = f"views-study-{part.slug}"
    if png.is_file():
        name = rep.name(stem)
        shutil.copyfile(png, rep.dir / name)
        return f"{rep.image(name, alt)}<p class='small'>The plot saved beside the JSON.</p>"
    img = rep.figure(draw(results), stem, alt)
    return f"{img}<p class='small'>Drawn from the JSON (no {html.escape(png.name)} beside it).</p>"


def study(rep: Report, part: Part) -> str:
    data = load(part)
    results = ordered(data["results"])
    runs = sorted({len(r["heldout_mim_acc"]) for r in results.values()})
    lines = "".join(f"<li>{html.escape(noise_line(results, m))}</li>" for m in COMPARED)
    return (
        f"<p>{html.escape(SCRIPT)}: the same student with K stored view seeds or a fresh view "
        f"every epoch; mean ± stdev over {'/'.join(map(str, runs))} run seeds "
        f"({rep.link(part.source)}).</p>{table(results)}"
        "<p>What is inside the noise: a K's difference from fresh (in points) counts as inside "
        "the run-seed spread when it is at most the larger of the two stdevs. With this few run "
        "seeds, outside is a hint to rerun with more, not a significant effect.</p>"
        f"<ul>{lines}</ul>{_context(data)}{figure(rep, part, results)}{commands(data)}"
    )


def section_study(rep: Report) -> str:
    return per_part(rep, rep.of_kind("views"), lambda part: study(rep, part))
