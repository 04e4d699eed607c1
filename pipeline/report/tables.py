"""The report's tables: what each part is, stage=all timings, probe results, where the files are."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from pipeline.report.base import Report
from pipeline.report.discover import Part, read_json
from pipeline.report.views_study import facts as study_facts

WHAT = {
    "all": "stage=all: every stage on one corpus",
    "pack": "image shards (WebDataset tars)",
    "vqkd": "stage 1: VQ-KD tokenizer training",
    "tokenize": "stage 2: token dataset",
    "pretrain": "stage 3: BEiT v2 pretraining",
    "linprobe": "linear probe",
    "finetune": "fine-tuning",
    "views": "benchmark: K stored view seeds vs fresh views (bench_seeds.py)",
    "run": "a run with metrics (stage not recognised)",
}


def _code(text: Any) -> str:
    return f"<code>{html.escape(str(text))}</code>"


def _facts(part: Part) -> str:
    """One line of the part's own numbers, read from its small files."""
    if part.kind == "tokenize":
        manifest = read_json(part.path / "manifest.json") or {}
        tok = manifest.get("tokenizer") if isinstance(manifest.get("tokenizer"), dict) else {}
        bits = [
            f"seeds {manifest.get('seeds')}" if manifest.get("seeds") is not None else "",
            f"codebook {tok.get('codebook_size')}" if tok.get("codebook_size") else "",
            f"{len(manifest.get('shards', []))} shards" if manifest.get("shards") else "",
        ]
        return ", ".join(b for b in bits if b)
    if part.kind == "pack":
        index = read_json(part.path / "index.json") or {}
        images = index.get("images")
        return f"{images} images" if isinstance(images, int) else ""
    if part.kind == "views":
        return study_facts(part)
    if part.kind in ("linprobe", "finetune"):
        res = read_json(part.path / "results.json")
        if isinstance(res, dict) and isinstance(res.get("top1"), (int, float)):
            return f"top-1 {res['top1']:.2f}%"
    preset = part.config.get("preset")
    return f"preset {preset}" if preset else ""


def section_overview(rep: Report) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(p.label)}</td><td>{html.escape(WHAT.get(p.kind, p.kind))}</td>"
        f"<td>{html.escape(_facts(p))}</td><td>{_code(p.path)}</td></tr>"
        for p in rep.parts
    )
    return (
        "<p>Each folder is recognised by its own files (config.yaml, metrics.jsonl, "
        "manifest.json, tokenizer.pth, results.json, summary.json, seeds_k.json).</p>"
        "<table><tr><th>run</th><th>what</th><th>facts</th><th>folder</th></tr>"
        f"{rows}</table>"
    )


def section_timings(rep: Report) -> str:
    out = []
    for part in rep.of_kind("all"):
        summary = read_json(part.path / "summary.json")
        if not isinstance(summary, dict):
            out.append(f"<p class='missing'>{html.escape(part.label)}: summary.json unreadable</p>")
            continue
        rows = "".join(
            f"<tr><td>{html.escape(name)}</td><td>{info.get('seconds', '')}</td>"
            f"<td>{html.escape(str(info.get('status', '')))}</td>"
            f"<td>{_code(info.get('command', ''))}</td></tr>"
            for name, info in summary.get("stages", {}).items()
        )
        out.append(
            f"<h3>{html.escape(part.label)}</h3>"
            "<table><tr><th>stage</th><th>seconds</th><th>status</th><th>rerun alone with</th>"
            f"</tr>{rows}</table><p>Total: {summary.get('seconds', '')} s.</p>"
        )
    return "".join(out)


def _pct(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) and math.isfinite(value) else "–"


def section_results(rep: Report) -> str:
    rows = []
    for part in rep.parts:
        res = read_json(part.path / "results.json") if part.file("results.json") else None
        if not isinstance(res, dict) or "top1" not in res:
            continue
        top5 = res.get("top5")
        classes = res.get("num_classes")
        # top-5 says nothing when there are at most 5 classes
        if isinstance(classes, int) and classes <= 5:
            top5 = None
        rows.append(
            f"<tr><td>{html.escape(part.label)}</td><td>{html.escape(part.kind)}</td>"
            f"<td>{html.escape(str(res.get('backbone', '')))}</td>"
            f"<td>{html.escape(str(res.get('pool', '')))}</td>"
            f"<td>{_pct(res['top1'])}</td><td>{_pct(top5)}</td>"
            f"<td>{classes if classes is not None else ''}</td>"
            f"<td>{res.get('num_train', '')}</td><td>{res.get('num_val', '')}</td></tr>"
        )
    if not rows:
        raise FileNotFoundError("no results.json with top1 in these runs")
    return (
        "<table><tr><th>run</th><th>stage</th><th>backbone</th><th>features</th>"
        "<th>top-1 %</th><th>top-5 %</th><th>classes</th><th>train</th><th>val</th></tr>"
        f"{''.join(rows)}</table>"
    )


def _files_of(part: Part, inside: list[Path]) -> list[Path]:
    """The part's files, without those of parts nested inside it."""
    files = []
    for path in part.path.rglob("*"):
        if path.is_file() and not any(path.is_relative_to(p) for p in inside):
            files.append(path)
    return files


def section_files(rep: Report) -> str:
    items = []
    for part in rep.parts:
        inside = [
            p.path for p in rep.parts if p.path != part.path and p.path.is_relative_to(part.path)
        ]
        inside.append(rep.dir)
        files = _files_of(part, inside)
        size = sum(p.stat().st_size for p in files) / 1e6
        links = ", ".join(rep.link(p) for p in part.notable)
        items.append(
            f"<li><b>{html.escape(part.label)}</b> {_code(part.path)}: {len(files)} files, "
            f"{size:.1f} MB. {links}</li>"
        )
    return f"<ul>{''.join(items)}</ul>"
