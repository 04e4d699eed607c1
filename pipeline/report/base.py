"""What every report section builds on: ``Report`` (the parts, the folder, the sections so far)
and ``per_part`` (one heading per run, a failing run says why in its place).

The section modules (``curves``, ``tokens``, ``mim``, ``tables``, ``views_study``) import this
module and ``page.py`` imports them, so no module of the report imports one that imports it back.
"""

from __future__ import annotations

import html
import logging
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.plots import pyplot
from pipeline.report.discover import Part

log = logging.getLogger(__name__)


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
        name = self.name(stem)
        fig.savefig(self.dir / name, dpi=90, bbox_inches="tight")
        pyplot().close(fig)
        return self.image(name, alt)

    @staticmethod
    def image(name: str, alt: str) -> str:
        return f'<img src="{html.escape(name)}" alt="{html.escape(alt)}">'

    def link(self, path: Path, text: str | None = None) -> str:
        """A link from the report page to ``path`` (relative, so the folder can be moved)."""
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
