"""Where a token dataset lives: fsspec filesystems, member paths, atomic publishing, JSON bytes.

Every read and write of a token dataset goes through fsspec, so a dataset may live on a local
disk or an object store (``s3://...``). Publishing is atomic either way:

- local disk: write a temporary file beside the target, fsync, ``os.replace``;
- object stores, which have no rename: one PUT per object (each PUT is atomic). Writers publish
  a shard's receipt last, so a crash in between leaves a shard that the next run redoes.

JSON is written deterministically (sorted keys, fixed indent), so reruns give identical bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

# Block size for hashing files (hashlib releases the GIL on blocks this large).
HASH_BLOCK = 1 << 22


def dataset_fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """A dataset URL or local path -> (filesystem, root path inside it without a trailing slash)."""
    fs, root = fsspec.core.url_to_fs(str(path))
    return fs, root.rstrip("/") or root


def join(root: str, relative: str) -> str:
    """Path of a dataset member: ``root/relative`` (fsspec paths always use '/')."""
    return f"{root}/{relative}"


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Local disks can rename atomically and lock; object stores cannot."""
    return isinstance(fs, LocalFileSystem)


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    """Parse one JSON file."""
    with fs.open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def dumps(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys) so reruns write byte-identical receipts/manifests."""
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def file_sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Hex sha256 of one file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def publish(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make ``data`` appear at ``path`` all at once (see the module docstring)."""
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
