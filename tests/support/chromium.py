"""Headless Chromium for the report tests: one command line, a screenshot and the rendered DOM."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")  # `apt-get install -y chromium` (.ci/run installs it)

skip_without_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} not installed (apt-get install chromium)"
)


def _browser(profile: Path, height: int) -> list[str]:
    """Headless, no sandbox, GPU, background network or sync; a throwaway profile; 1200 px wide."""
    return [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", f"--window-size=1200,{height}",
    ]  # fmt: skip


def screenshot(url: str, shot: Path, profile: Path, height: int) -> None:
    """Render ``url`` into the PNG ``shot`` (1200 x ``height``)."""
    subprocess.run(
        [*_browser(profile, height), f"--screenshot={shot}", url],
        check=True,
        timeout=120,
        capture_output=True,
    )


def rendered_dom(url: str, profile: Path, height: int) -> str:
    """The page's DOM after Chromium ran it."""
    return subprocess.run(
        [*_browser(profile, height), "--dump-dom", url],
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    ).stdout
