"""``pipeline report DIR [DIR ...] [out=<dir>]``: find the runs, write the page, say where it is."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from engine.errors import UserError
from pipeline.report.base import Report
from pipeline.report.discover import discover
from pipeline.report.page import build_page

log = logging.getLogger(__name__)

USAGE = "usage: pipeline report <run dir or seeds_k.json> [...] [out=<dir>]"


def default_out(dirs: list[Path]) -> Path:
    """``<DIR>/report`` for one folder; ``<their common parent>/report`` for several (a file
    given, a views study's JSON, counts as its folder)."""
    dirs = [d.parent if d.is_file() else d for d in dirs]
    if len(dirs) == 1:
        return dirs[0] / "report"
    return Path(os.path.commonpath([str(d) for d in dirs])) / "report"


def write_report(run_dirs: str | Path | list[str | Path], out: str | Path | None = None) -> Path:
    """Write the report of ``run_dirs`` (one or several folders) and return its index.html."""
    dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    if not dirs:
        raise UserError(f"say which run folders to report on; {USAGE}")
    parts = discover(dirs)
    log.info(
        "report: %d run folder(s): %s",
        len(parts),
        ", ".join(f"{p.label} ({p.kind})" for p in parts),
    )
    resolved = [Path(d).expanduser().resolve() for d in dirs]
    out_dir = Path(out).expanduser().resolve() if out else default_out(resolved)
    rep = Report(parts, out_dir)
    title = ", ".join(d.name for d in resolved)
    page = out_dir / "index.html"
    page.write_text(build_page(rep, title))
    log.info("report written to %s (%d sections unavailable)", page, len(rep.problems))
    return page


def main(argv: list[str]) -> int:
    """``pipeline report DIR [DIR ...] [out=<dir>]``: write the report and print its path."""
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    dirs = [a for a in argv if "=" not in a]
    options = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = sorted(set(options) - {"out"})
    if unknown or not dirs:
        raise UserError(f"unknown option(s) {unknown}; {USAGE}" if unknown else USAGE)
    page = write_report(dirs, options.get("out"))
    print(f"wrote: {page}\nnext:\n  open {page}   (or: python -m http.server -d {page.parent})")
    return 0
