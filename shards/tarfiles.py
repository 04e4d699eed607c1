"""Deterministic tar members: the same bytes in give the same tar out, on any machine.

Image shards (``shards/pack.py``) and token shards (``shards/writer.py``) are compared byte for
byte across runs and worker counts, so neither may record a clock, a user or a umask.
"""

from __future__ import annotations

import io
import tarfile


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append ``data`` as regular file ``name`` with fixed metadata (mtime 0, mode 0644, root)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
