"""The report page: sections for what the runs hold, figures beside it, one HTML file.

Each section is built on its own and only when some part has what it shows (no section, and no
claim, about stages that are not there). A section that fails to build says why in its place and
the rest of the page is still written.
"""

from __future__ import annotations

import html
import logging
import sys
from collections.abc import Callable

from tqdm import tqdm

from pipeline.report import curves, mim, tables, tokens, views_study
from pipeline.report.base import Report
from shards.dataset import TokenDatasetDir

log = logging.getLogger(__name__)

STYLE = """
body { font-family: sans-serif; max-width: 1150px; margin: 1em auto; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
h3 { margin-bottom: 0.3em; }
img { max-width: 100%; } table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
.missing { color: #a33; } .small { font-size: 0.8em; color: #555; } code { font-size: 0.85em; }
"""


# (id, title, the kinds of part it needs, the builder)
def _plan() -> list[tuple[str, str, tuple[str, ...], Callable[[Report], str]]]:
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
        return any(TokenDatasetDir(str(p.path)).named_sets() for p in rep.of_kind("tokenize"))
    if needs == ("pretrain",):
        return any(p.file("checkpoint.pth") for p in rep.of_kind("pretrain"))
    if needs == ("linprobe", "finetune"):
        return any(p.file("results.json") for p in rep.parts)
    return bool(rep.of_kind(*needs))


def build_page(rep: Report, title: str) -> str:
    """Build every wanted section (a progress bar on a terminal) and return the page."""
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
