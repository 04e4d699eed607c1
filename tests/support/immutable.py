"""An immutable folder (``chattr +i``), the one kind of unwritable folder that stops root too
(the tests run as root, which file modes do not stop). Skips the test where chattr fails."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def immutable_folder(folder: Path) -> Iterator[Path]:
    """``folder`` (made empty if missing), immutable until the block ends."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i does not work here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
