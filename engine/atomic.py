"""Atomic file writes: a reader (or a rerun after ``kill -9``) sees the old file or the new one,
never half of one. The one writer of the project's artifacts: checkpoints, exports, token files,
receipts and manifests.

- local disk: write ``.<name>.<random>.tmp`` beside the target, fsync, ``os.replace``. The file
  gets mode ``0o666 & ~umask``, as a plain ``open()`` gives (artifacts are shared with
  teammates). A killed writer can leave such a temporary file; its name says what it is.
- object stores (any other fsspec filesystem), which have no rename: one PUT of the whole
  object, which is atomic. Writers that need an order (a token shard's receipt last) publish in
  that order.
"""

from __future__ import annotations

import os
import tempfile

import fsspec
from fsspec.implementations.local import LocalFileSystem

TMP_SUFFIX = ".tmp"  # a temporary file is ".<name>.<random>" + this


def publish(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make ``data`` appear at ``path`` of ``fs`` all at once (see the module docstring)."""
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=TMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> str:
    """:func:`publish` ``data`` at a local path or fsspec URL (parent folders made); returns it."""
    fs, local = fsspec.core.url_to_fs(str(path))
    publish(fs, local, data)
    return str(path)


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`publish`'s temporary files."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def _umask() -> int:
    # Linux reports the umask without changing it; os.umask can only read it by setting it,
    # which would open a window in which another thread's files get the wrong mode.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
