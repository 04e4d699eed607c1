"""The report page: sections for what the runs hold, figures beside it, one HTML file.

Each section is built on its own and only when some part has what it shows (no section, and no
claim, about stages that are not there). A section that fails to build says why in its place and
the rest of the page is still written.
"""

from __future__ import annotations

import html
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.report.discover import Part

log = logging.getLogger(__name__)

STYLE = """
body { font-family: sans-serif; max-width: 1150px; margin: 1em auto; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
h3 { margin-bottom: 0.3em; }
img { max-width: 100%; } table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
.missing { color: #a33; } .small { font-size: 0.8em; color: #555; } code { font-size: 0.85em; }
"""


class Report:
    """Collects sections of HTML; figures go to ``self.dir`` under unique names."""

    def __init__(self, parts: list[Part], out_dir: Path) -> None:
        self.parts = parts
        self.dir = out_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sections: list[tuple[str, str, str]] = []  # (id, title, html)
        self.problems: list[str] = []
        self._names: set[str] = set()

    def of_kind(self, *kinds: str) -> list[Part]:
        return [p for p in self.parts if p.kind in kinds]

    def name(self, stem: str, suffix: str = ".png") -> str:
        """A file name in the report folder not used yet by this report."""
        name, i = f"{stem}{suffix}", 2
        while name in self._names:
            name, i = f"{stem}-{i}{suffix}", i + 1
        self._names.add(name)
        return name

    def figure(self, fig: Any, stem: str, alt: str) -> str:
        """Save a matplotlib figure as ``<stem>.png`` and return its <img> tag."""
        import matplotlib.pyplot as plt

        name = self.name(stem)
        fig.savefig(self.dir / name, dpi=90, bbox_inches="tight")
        plt.close(fig)
        return self.image(name, alt)

    @staticmethod
    def image(name: str, alt: str) -> str:
        return f'<img src="{html.escape(name)}" alt="{html.escape(alt)}">'

    def link(self, path: Path, text: str | None = None) -> str:
        """A link from the report page to ``path`` (relative, so the folder can be moved)."""
        import os

        href = os.path.relpath(path, self.dir)
        return f'<a href="{html.escape(href)}">{html.escape(text or path.name)}</a>'

    def section(self, sid: str, title: str, build: Callable[[], str]) -> None:
        """Run ``build``; on error, show the reason in place of the section."""
        try:
            body = build()
        except Exception as err:  # noqa: BLE001 - a report shows what it can
            log.warning("report section %s failed: %s", sid, err)
            log.debug("%s", traceback.format_exc())
            reason = f"{type(err).__name__}: {err}"
            self.problems.append(f"{title}: {reason}")
            body = f'<p class="missing">Not available: {html.escape(reason)}</p>'
        self.sections.append((sid, title, body))


def per_part(rep: Report, parts: list[Part], build: Callable[[Part], str]) -> str:
    """``build`` for each part under its own heading; a failing part says why, the rest stay."""
    out = []
    for part in parts:
        try:
            body = build(part)
        except Exception as err:  # noqa: BLE001 - one broken run does not hide the others
            log.warning("report: %s: %s", part.label, err)
            rep.problems.append(f"{part.label}: {err}")
            body = f"<p class='missing'>Not available: {html.escape(f'{type(err).__name__}: {err}')}</p>"
        out.append(
            f"<h3>{html.escape(part.label)} <span class='small'>({part.kind})</span></h3>{body}"
        )
    return "".join(out)


# (id, title, the kinds of part it needs, the builder); imported lazily (matplotlib, torch).
def _plan() -> list[tuple[str, str, tuple[str, ...], Callable[[Report], str]]]:
    from pipeline.report import curves, mim, tables, tokens, views_study

    return [
        ("overview", "What is here", (), tables.section_overview),
        ("timings", "Timings", ("all",), tables.section_timings),
        ("curves", "Training curves", ("*metrics",), curves.section_curves),
        ("codebook", "Codebook usage", ("tokenize",), tokens.section_codebook),
        ("token-maps", "Views and token maps", ("tokenize",), tokens.section_token_maps),
        ("token-sets", "Tokenizers on the same views", ("*token_sets",), tokens.section_token_sets),
        ("mim", "MIM predictions", ("pretrain",), mim.section_mim),
        ("linprobe", "Linear probe", ("linprobe", "finetune"), tables.section_results),
        ("views-study", "K stored views vs fresh views", ("views",), views_study.section_study),
        ("files", "Where the files are", (), tables.section_files),
    ]


def _wanted(rep: Report, needs: tuple[str, ...]) -> bool:
    if not needs:
        return True
    if needs == ("*metrics",):
        return any(p.file("metrics.jsonl") for p in rep.parts)
    if needs == ("*token_sets",):
        from shards.manifest import named_sets

        return any(named_sets(str(p.path)) for p in rep.of_kind("tokenize"))
    if needs == ("pretrain",):
        return any(p.file("checkpoint.pth") for p in rep.of_kind("pretrain"))
    if needs == ("linprobe", "finetune"):
        return any(p.file("results.json") for p in rep.parts)
    return bool(rep.of_kind(*needs))


def build_page(rep: Report, title: str) -> str:
    """Build every wanted section (a progress bar on a terminal) and return the page."""
    from tqdm import tqdm

    plan = [entry for entry in _plan() if _wanted(rep, entry[2])]
    bar = tqdm(plan, desc="report", unit="section", file=sys.stderr, disable=None)
    for sid, name, _, build in bar:
        bar.set_postfix_str(name)
        log.debug("report: %s", name)
        rep.section(sid, name, lambda build=build: build(rep))
    nav = " · ".join(f'<a href="#{sid}">{html.escape(t)}</a>' for sid, t, _ in rep.sections)
    body = "".join(
        f'<section id="{sid}"><h2>{html.escape(t)}</h2>{content}</section>'
        for sid, t, content in rep.sections
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>BEiT v2 run report: {html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>"
        "<h1>BEiT v2 from precomputed tokens: run report</h1>"
        f"<p>{nav}</p>{body}</body></html>"
    )
