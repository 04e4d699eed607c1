"""Where a token dataset lives: fsspec filesystems, member paths, hashing, JSON bytes.

Every read and write of a token dataset goes through fsspec, so a dataset may live on a local
disk or an object store (``s3://...``); writes are atomic either way (``engine.atomic.publish``).
JSON is written deterministically (sorted keys, fixed indent), so reruns give identical bytes.
"""

from __future__ import annotations

import hashlib
import json
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
