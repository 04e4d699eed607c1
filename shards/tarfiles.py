"""Tar members written deterministically, and read back fast.

Image shards (``shards/pack.py``) and token shards (``shards/writer.py``) are compared byte for
byte across runs and worker counts, so neither may record a clock, a user or a umask
(:func:`add_member`). A token shard holds four small members per image; :func:`read_members`
reads a whole tar held in memory with a header parser of a few lines, several times faster than
``tarfile`` on thousands of small members (BENCHMARKS.md, "Control plane at ImageNet scale");
:func:`member_names` lists an image tar's members from their headers alone.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 512
# ustar typeflags (as byte values): regular files, a directory, and "x", a pax header for the
# next member (its "path" wins).
_REGULAR = (ord("0"), 0)
_DIRECTORY = ord("5")
_PAX = ord("x")
_KINDS = (*_REGULAR, _DIRECTORY, _PAX)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append ``data`` as regular file ``name`` with fixed metadata (mtime 0, mode 0644, root)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def read_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular file in the uncompressed tar ``data``, in order.

    Reads ustar headers and pax ``path`` records (what ``tarfile``'s PAX format writes); a tar
    with anything else (GNU long names, sparse files, a v7 header, a truncated member) is read
    with ``tarfile`` instead, so no tar is misread, only read more slowly. Header checksums are
    not recomputed: the reader has compared the whole file's sha256 with its receipt.
    """
    members, head, path, end = [], 0, None, len(data)
    while head + BLOCK <= end:  # head: where the member's header block starts
        if data[head + 257 : head + 262] != b"ustar":  # the end-of-archive zeros, or not ustar
            if data.count(0, head, head + BLOCK) == BLOCK:
                yield from members
                return
            yield from _read_with_tarfile(data)
            return
        kind = data[head + 156]
        size = int(data[head + 124 : head + 136].rstrip(b"\0 ") or b"0", 8)
        start = head + BLOCK
        if kind not in _KINDS or start + size > end:
            yield from _read_with_tarfile(data)  # another member type, or truncated
            return
        if kind == _PAX:
            path = _pax_path(data[start : start + size])
        elif kind != _DIRECTORY:
            name = path if path is not None else _ustar_name(data, head)
            members.append((name, data[start : start + size]))
            path = None
        head = start + -(-size // BLOCK) * BLOCK
    yield from _read_with_tarfile(data)  # no end-of-archive blocks: truncated, tarfile says so


def member_names(f: BinaryIO) -> list[str]:
    """The names of the regular files of the tar open in ``f``, in order, from the headers alone.

    An uncompressed tar on a seekable file is walked header to header, the members' bytes skipped
    by seeks (ustar headers and pax ``path`` records, as :func:`read_members`); a gzip'd tar, or
    one with anything else (GNU long names, a v7 header, a member cut short), is listed by
    ``tarfile``, which decompresses or reads it through and raises ``tarfile.TarError`` for
    damage. Header checksums are not recomputed (a third of the time): the names only plan the
    reading, and the reader (``tarfile``) checks every header.
    """
    end = f.seek(0, io.SEEK_END)
    f.seek(0)
    names, head, path = [], 0, None
    while True:
        f.seek(head)
        header = f.read(BLOCK)
        if len(header) < BLOCK or header[257:262] != b"ustar":
            if len(header) == BLOCK and header.count(0) == BLOCK:
                return names  # the end-of-archive zeros
            break  # gzip'd, not ustar, or no end-of-archive blocks: tarfile says which
        kind = header[156]
        try:  # a base-256 size (a member over 8 GiB) is not octal: tarfile reads it
            size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            break
        if kind not in _KINDS or head + BLOCK + size > end:
            break
        if kind == _PAX:
            path = _pax_path(f.read(size))
        elif kind != _DIRECTORY:
            names.append(path if path is not None else _ustar_name(header, 0))
            path = None
        head += BLOCK + -(-size // BLOCK) * BLOCK
    f.seek(0)
    with tarfile.open(fileobj=f, mode="r:*") as tar:
        return [member.name for member in tar if member.isfile()]


def _ustar_name(data: bytes, head: int) -> str:
    """The name in the ustar header at ``data[head:]``: its name field, after its prefix field
    (a long name split at a slash) when there is one."""
    stop = data.find(b"\0", head, head + 100)
    path = data[head : stop if stop >= 0 else head + 100].decode("utf-8")
    if data[head + 345]:
        prefix = data[head + 345 : head + 500].split(b"\0", 1)[0].decode("utf-8")
        path = f"{prefix}/{path}"
    return path


def _pax_path(body: bytes) -> str | None:
    """The ``path`` record of a pax header block, if it has one."""
    while body:
        length, _, rest = body.partition(b" ")
        size = int(length)
        record = body[len(length) + 1 : size - 1]
        key, _, value = record.partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        body = body[size:]
        if not rest:
            break
    return None


def _read_with_tarfile(data: bytes) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if member.isfile():
                yield member.name, tar.extractfile(member).read()
