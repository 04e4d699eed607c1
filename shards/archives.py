"""Tar (WebDataset) and Parquet (Hugging Face layout) sources: keys and records, read through fsspec."""

from __future__ import annotations

import logging
import posixpath
import re
import tarfile
from collections.abc import Collection, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from shards.folders import image_key, no_key
from shards.records import IMAGE_EXTENSIONS, MAX_MEMBER_BYTES, BadShard, ImageRecord
from shards.tarfiles import member_names

log = logging.getLogger(__name__)


# Why a later sample or row with a key an earlier one of the same file has is skipped.
DUPLICATE_IN_TAR = "duplicate key (an earlier sample of this tar has it)"
DUPLICATE_IN_PARQUET = "duplicate key (an earlier row of this file has it)"


def tar_names(url: str) -> list[tuple[str, str]]:
    """(key, name) of each sample :func:`iter_tar` yields with an image member, in tar order, a
    key's first sample only; ``name`` is the members' name before the key rule. Read from the
    member headers (``shards.tarfiles.member_names``), not the members."""
    try:
        with fsspec.open(url, "rb") as raw:
            names = member_names(raw)
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        raise BadShard(f"unreadable tar {url}: {err}") from None
    firsts: list[tuple[str, str, set[str]]] = []  # (key, name, member types) per first sample
    seen: set[str] = set()
    group_key, group, types = None, set(), None
    for member in names:
        name, ext = split_member_name(member)
        if name is None:
            continue
        key, ext = image_key(name), ext.lower()
        if _starts_sample(key, ext, group_key, group):
            group_key, group, types = key, set(), None
            if key and key not in seen:
                seen.add(key)
                types = set()
                firsts.append((key, name, types))
        group.add(ext)
        if types is not None:
            types.add(ext.rsplit(".", 1)[-1])
    return [(key, name) for key, name, types in firsts if types & set(IMAGE_EXTENSIONS)]


def _starts_sample(key: str, ext: str, group_key: str | None, group: Collection[str]) -> bool:
    """WebDataset's grouping: a member starts a new sample when its key is not the current
    sample's, or when the sample already has a member of its type (``a.jpg`` twice)."""
    return key != group_key or ext in group


def parquet_names(url: str) -> list[tuple[str, str]]:
    """(key, name) of each row :func:`iter_parquet` reads, a key's first row only; ``name`` is
    ``image.path`` without its extension (or ``<file stem>/<row>``). Reads that column only."""
    stem = posixpath.basename(url).split(".", 1)[0]
    try:
        with fsspec.open(url, "rb") as raw:
            pf = pq.ParquetFile(raw)
            image = pf.schema_arrow.field("image").type
            if pa.types.is_struct(image) and image.get_field_index("path") >= 0:
                column = pf.read(columns=["image.path"]).column(0).combine_chunks()
                paths = column.field("path") if pa.types.is_struct(column.type) else column
                paths = paths.to_pylist()
            else:
                paths = [None] * pf.metadata.num_rows
    except (OSError, ValueError, KeyError, pa.ArrowException) as err:
        raise BadShard(f"unreadable parquet {url}: {err}") from None
    found, seen = [], set()
    for row, path in enumerate(paths):
        name = _row_name(path, stem, row)
        key = image_key(name)
        if key and key not in seen:
            seen.add(key)
            found.append((key, name))
    return found


def _row_name(path: str | None, stem: str, row: int) -> str:
    """A Parquet row's name: ``image.path`` without its last extension, else ``<stem>/<row>``."""
    return path.rsplit(".", 1)[0] if path else f"{stem}/{row}"


# ---------------------------------------------------------------- source listing


def split_member_name(name: str) -> tuple[str | None, str]:
    """WebDataset's key/extension split: the key keeps directories and ends at the basename's
    first dot (``a/b.c.jpg`` -> ``("a/b", "c.jpg")``); (None, "") when there is no extension."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    if not match:
        return None, ""
    return match.group(1), match.group(2)


def iter_tar(url: str) -> Iterator[ImageRecord]:
    members = 0
    seen: set[str] = set()
    group_key: str | None = None
    group_name = ""
    group: dict[str, bytes] = {}
    group_errors: list[str] = []
    try:
        # stream mode: sequential reads only (object stores), never extract to disk
        with fsspec.open(url, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for info in tar:
                if info.isfile():
                    name, ext = split_member_name(info.name)
                    if name is not None:
                        key, ext = image_key(name), ext.lower()
                        if _starts_sample(key, ext, group_key, group):
                            if group_key is not None:
                                yield _tar_record(group_key, group_name, group, group_errors, seen)
                            group_key, group_name, group, group_errors = key, name, {}, []
                        _read_member(tar, info, ext, group, group_errors)
                members += 1  # complete members read so far
            if not _saw_end_marker(tar):
                raise tarfile.ReadError("no end-of-archive marker")
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError):
            raise BadShard(f"tar not found: {url}") from None
        what = "unreadable tar" if members == 0 else f"truncated tar after {members} members"
        raise BadShard(f"{what}: {err}") from None
    if group_key is not None:
        yield _tar_record(group_key, group_name, group, group_errors, seen)


def _read_member(
    tar: tarfile.TarFile,
    info: tarfile.TarInfo,
    ext: str,
    group: dict[str, bytes],
    errors: list[str],
) -> None:
    """Read one member into its sample (bytes in memory only, never onto the disk)."""
    if info.size > MAX_MEMBER_BYTES:
        errors.append(f".{ext} member too large ({info.size} bytes)")
        group[ext] = b""
        return
    fileobj = tar.extractfile(info)
    data = fileobj.read() if fileobj is not None else b""
    if len(data) != info.size:
        raise tarfile.ReadError(f"member {info.name} is cut short")
    group[ext] = data


def _saw_end_marker(tar: tarfile.TarFile) -> bool:
    """Did the stream end with tar's zero block? tarfile stops silently when a tar is cut exactly
    between members; its stream position then equals the offset of the missing header."""
    stream_pos = getattr(tar.fileobj, "pos", None)
    if stream_pos is None:  # tarfile internals changed: cannot tell, assume complete
        return True
    return stream_pos > tar.offset


def _tar_record(
    key: str, name: str, group: dict[str, bytes], errors: list[str], seen: set[str]
) -> ImageRecord:
    if not key:
        return ImageRecord(key, b"", -1, no_key(name))
    if key in seen:
        return ImageRecord(key, b"", -1, DUPLICATE_IN_TAR)
    seen.add(key)
    label = -1
    if "cls" in group:
        try:
            label = int(group["cls"].decode("utf-8").strip())
        except (UnicodeDecodeError, ValueError):
            return ImageRecord(key, b"", -1, "unreadable label in .cls")
    if errors:
        return ImageRecord(key, b"", label, "; ".join(errors))
    # the last part decides the type (WebDataset's decoders do the same): "a.left.png" is a PNG
    by_type = {e.rsplit(".", 1)[-1]: e for e in sorted(group, reverse=True)}
    ext = next((by_type[e] for e in IMAGE_EXTENSIONS if e in by_type), None)
    if ext is None:
        has = ", ".join("." + e for e in sorted(group)) or "nothing"
        return ImageRecord(key, b"", label, f"no image member (has: {has})")
    return ImageRecord(key, group[ext], label)


def iter_parquet(url: str) -> Iterator[ImageRecord]:
    stem = posixpath.basename(url).split(".", 1)[0]
    seen: set[str] = set()
    row = 0
    try:
        with fsspec.open(url, "rb") as raw:
            pf = pq.ParquetFile(raw)
            names = pf.schema_arrow.names
            if "image" not in names:
                raise BadShard(f"parquet file has no 'image' column (columns: {', '.join(names)})")
            columns = ["image"] + (["label"] if "label" in names else [])
            for batch in pf.iter_batches(batch_size=256, columns=columns):
                image = batch.column("image")
                if pa.types.is_struct(image.type):
                    fields = {image.type.field(i).name for i in range(image.type.num_fields)}
                    data_col = image.field("bytes").to_pylist()
                    path_col = image.field("path").to_pylist() if "path" in fields else None
                else:
                    data_col, path_col = image.to_pylist(), None
                labels = batch.column("label").to_pylist() if "label" in columns else None
                for i, data in enumerate(data_col):
                    name = _row_name(path_col[i] if path_col else None, stem, row)
                    key = image_key(name)
                    label = labels[i] if labels and labels[i] is not None else -1
                    row += 1
                    if not key:
                        yield ImageRecord(key, b"", int(label), no_key(name))
                    elif key in seen:
                        yield ImageRecord(key, b"", int(label), DUPLICATE_IN_PARQUET)
                    elif data is None:
                        seen.add(key)
                        yield ImageRecord(key, b"", int(label), "no image bytes")
                    else:
                        seen.add(key)
                        yield ImageRecord(key, bytes(data), int(label))
    except BadShard:
        raise
    except FileNotFoundError:
        raise BadShard(f"parquet file not found: {url}") from None
    except (OSError, ValueError, KeyError, pa.ArrowException) as err:
        raise BadShard(f"unreadable parquet after {row} rows: {err}") from None
