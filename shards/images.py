"""Image sources: a folder, WebDataset tars or Parquet files, as shards of (key, bytes, label).

Every source is split into :class:`ImageShard` s in a deterministic order, and :func:`iter_shard`
yields one :class:`ImageRecord` per image in a stable order. Nothing is decoded here (see
``shards.decode``); a member that cannot be an image at all (no image member, duplicate key) comes
out as a record with ``error`` set so the caller can list it instead of losing it silently.
``ImageRecord.sha256`` is the image digest a token dataset binds each row to: sha256 over the
record's bytes exactly as stored in the source, before decode.

Sources (``images=``), local paths or fsspec URLs (``s3://...``):

- a folder of images. ImageFolder layout (``root/<class>/.../<file>``): labels are the index of
  the class in the sorted list of class folders; files directly under ``root`` are then ignored.
  Flat layout (image files directly under ``root``, no class folder holding images): label -1.
  Split into shards of ``shard_size`` in key order. Symlinks are resolved so each real file is
  listed once: a link to a file or folder inside ``root`` is not followed (the target is listed
  at its own path), a link to outside is followed once, and a directory cycle
  (``c1/loop -> ..``) is skipped with a warning (see ``shards.folders``).
- WebDataset tars: a brace pattern (``dir/shard-{000000..000009}.tar``), a glob, a comma list, a
  list, or a folder holding ``*.tar`` (``index.json`` from ``pipeline run stage=pack`` is honoured
  when present). One shard per tar. The ImageNet convention: ``<key>.jpg|jpeg|png|webp`` and an
  optional ``<key>.cls`` holding the integer label.
- Parquet files in the Hugging Face imagenet layout (column ``image`` = struct{bytes, path} or
  plain binary, optional integer column ``label``): one shard per file.

The key rule, the same for every source and therefore for ``stage=pack`` and a folder given to
``stage=tokenize`` (pack reads its input through this module):

- the name: a folder file's relative path (``/`` separators) without its last extension; a tar
  member's name up to the first dot of its basename (WebDataset's split); a Parquet row's
  ``image.path`` without its last extension, or ``<file stem>/<row>`` when there is no path;
- dots: every remaining ``.`` becomes ``_`` (``shards.folders.image_key``), so no key holds a dot
  (``n01/img.001.JPEG`` -> ``n01/img_001``);
- extensions: matched case-insensitively against ``shards.records.IMAGE_EXTENSIONS``; other files are not
  images (a folder) or other members of the sample (a tar: ``.cls``);
- duplicates: when two files or samples give one key (``a.jpg`` and ``a.png``, ``a.b.jpg`` and
  ``a_b.jpg``, a key twice in a tar), the first in sorted order (folders) or stream order (tars,
  Parquet) keeps it and every other one is an error record ``duplicate key ...``;
- hidden entries (any path component starting with ``.``) are ignored.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
from collections.abc import Iterator, Sequence

import braceexpand
import fsspec
from fsspec.implementations.local import LocalFileSystem

from shards.archives import iter_parquet, iter_tar, parquet_keys, tar_keys
from shards.errors import ImageSourceError
from shards.folders import iter_folder, scan_folder
from shards.records import (
    IMAGE_EXTENSIONS,
    PACK_INDEX_FORMAT,
    PARQUET_SUFFIXES,
    TAR_SUFFIXES,
    ImageRecord,
    ImageShard,
    Kind,
)

log = logging.getLogger(__name__)


def list_shards(
    images: str | os.PathLike | Sequence[str], shard_size: int = 256
) -> list[ImageShard]:
    """Split an image source into shards, in a deterministic order.

    Args:
        images: a folder, tar/parquet file(s) as a brace pattern, glob, comma list or list, or a
            folder of tars/parquet files; local paths or fsspec URLs.
        shard_size: images per shard for folder sources (tar and parquet files are one shard
            each, whatever their size).

    Raises:
        ImageSourceError: nothing matches, a path is missing, a file is neither a tar nor a
            parquet file, a bad ``shard_size``, a mix of tar and parquet files, or a folder
            holding several series of shards (``train-*`` and ``validation-*``: pass one as a
            pattern). A user's mistake: the message names the path.
    """
    if shard_size < 1:
        raise ImageSourceError(f"shard_size must be >= 1, got {shard_size}")
    entries = split_source(images)
    if not entries:
        raise ImageSourceError("images= is empty; pass a folder, tar shards or parquet files")
    if len(entries) == 1:
        fs, root = fsspec.core.url_to_fs(entries[0])
        if not _has_magic(root) and fs.isdir(root):
            return _list_folder(entries[0], fs, root, shard_size)
    files: list[str] = []
    for entry in entries:
        files.extend(_expand(entry))
    kinds = {_file_kind(f) for f in files}
    if None in kinds:
        bad = next(f for f in files if _file_kind(f) is None)
        raise ImageSourceError(
            f"{bad} is neither a tar ({', '.join(TAR_SUFFIXES)}) nor a parquet file; "
            "images= takes a folder, tar shards or parquet files"
        )
    if len(kinds) > 1:
        raise ImageSourceError(f"images= mixes tar and parquet files ({entries}); pass one kind")
    kind = kinds.pop()
    return [ImageShard(index=i, url=f, kind=kind) for i, f in enumerate(files)]


def list_classes(images: str) -> tuple[str, ...]:
    """Sorted class-folder names of an ImageFolder source (the label order); () otherwise."""
    fs, root = fsspec.core.url_to_fs(images)
    if _has_magic(root) or not fs.isdir(root):
        return ()
    classes, _ = scan_folder(fs, root)
    return classes


def iter_shard(shard: ImageShard) -> Iterator[ImageRecord]:
    """Yield the shard's records in a stable order (never decodes, never extracts to disk).

    A truncated or unreadable tar/parquet yields every complete record read before the damage
    and then raises ``shards.records.BadShard`` with the reason.
    """
    if shard.kind == "folder":
        yield from iter_folder(shard)
    elif shard.kind == "webdataset":
        yield from iter_tar(shard.url)
    elif shard.kind == "parquet":
        yield from iter_parquet(shard.url)
    else:
        raise ValueError(f"unknown shard kind {shard.kind!r}")


def list_keys(shard: ImageShard) -> list[str]:
    """The keys :func:`iter_shard` yields without an error, read cheaply where possible.

    Folders: the listing (no file is read). Tars: member headers only (a plain tar on a seekable
    file skips the image bytes; a gzip'd one is decompressed). Parquet: the ``image.path``
    column only. Used by stage 3 to plan a copy of the images packed differently; an image that
    later fails to read is reported then.
    """
    if shard.kind == "folder":
        errors = shard.errors or ("",) * len(shard.keys)
        return [k for k, e in zip(shard.keys, errors, strict=True) if not e]
    if shard.kind == "webdataset":
        return tar_keys(shard.url)
    return parquet_keys(shard.url)


def split_source(images: str | os.PathLike | Sequence[str]) -> list[str]:
    """The entries of an image source: a list as is; a string split on the commas that are not
    inside braces (a brace pattern holds commas of its own), each entry stripped."""
    if isinstance(images, os.PathLike):
        return [os.fspath(images)]
    if not isinstance(images, str):
        return [os.fspath(x).strip() for x in images if os.fspath(x).strip()]
    parts, depth, current = [], 0, []
    for ch in images:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _has_magic(path: str) -> bool:
    return any(c in path for c in "*?[{")


def _file_kind(path: str) -> Kind | None:
    lower = path.lower()
    if lower.endswith(TAR_SUFFIXES):
        return "webdataset"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _expand(entry: str) -> list[str]:
    """Brace expansion (kept in order), globs (sorted), folders of tars/parquet (sorted)."""
    out: list[str] = []
    for url in braceexpand.braceexpand(entry):
        fs, path = fsspec.core.url_to_fs(url)
        if _has_magic(path):
            matches = sorted(fs.glob(path))
            if not matches:
                raise ImageSourceError(f"no files match {url}")
            out.extend(_url(fs, m) for m in matches)
        elif fs.isdir(path):
            found = _shard_files_in(fs, path)
            if not found:
                raise ImageSourceError(f"no tar or parquet files in {path}")
            out.extend(_url(fs, m) for m in found)
        elif fs.exists(path):
            out.append(url)
        else:
            raise ImageSourceError(f"image source not found: {url} (no such file or folder)")
    return out


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path the filesystem listed, as a URL again (plain path on the local disk)."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _shard_files_in(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The tars of a folder (from index.json when pack wrote one), else its parquet files at any
    depth (the HF layout keeps them in ``data/``); one series of shards only; [] when none."""
    index = posixpath.join(path, "index.json")
    if fs.exists(index):
        with fs.open(index, "rb") as f:
            meta = json.load(f)
        if isinstance(meta, dict) and meta.get("format") == PACK_INDEX_FORMAT:
            return [posixpath.join(path, s["file"]) for s in meta["shards"]]
    names = sorted(fs.find(path))
    tars = [n for n in names if _file_kind(n) == "webdataset" and posixpath.dirname(n) == path]
    files = tars or [n for n in names if _file_kind(n) == "parquet"]
    if not files:
        return []
    series = sorted({_series(n) for n in files})
    if len(series) > 1:
        # e.g. train-*.parquet next to validation-*.parquet: mixing splits is never wanted
        example = posixpath.join(path, series[0] + "*")
        raise ImageSourceError(
            f"{path} holds several series of shards ({', '.join(s + '*' for s in series)}); "
            f"pass one as a pattern, e.g. images={example}"
        )
    return files


def _series(path: str) -> str:
    """``data/train-00003-of-00294.parquet`` -> ``data/train-``; ``shard-000001.tar`` -> ``shard-``."""
    name = posixpath.basename(path)
    match = re.match(r"^(.*?)\d+(?:-of-\d+)?(?:\.tar|\.tar\.gz|\.tgz|\.parquet)$", name)
    prefix = match.group(1) if match else name
    folder = posixpath.dirname(path)
    return posixpath.join(folder, prefix) if folder else prefix


def _list_folder(
    url: str, fs: fsspec.AbstractFileSystem, root: str, shard_size: int
) -> list[ImageShard]:
    if any(_file_kind(n) for n in fs.ls(root, detail=False)):
        rows = []  # a folder of shards rather than of images
    else:
        _, rows = scan_folder(fs, root)
    if not rows:
        # tars at the top, or parquet at any depth (the HF layout root/data/*.parquet)
        files = [_url(fs, f) for f in _shard_files_in(fs, root)]
        if not files:
            raise ImageSourceError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}), tars or parquet files under {url}"
            )
        return [ImageShard(index=i, url=f, kind=_file_kind(f)) for i, f in enumerate(files)]
    shards = []
    for i, start in enumerate(range(0, len(rows), shard_size)):
        chunk = rows[start : start + shard_size]
        shards.append(
            ImageShard(
                index=i,
                url=url,
                kind="folder",
                keys=tuple(r[0] for r in chunk),
                files=tuple(r[1] for r in chunk),
                labels=tuple(r[2] for r in chunk),
                errors=tuple(r[3] for r in chunk) if any(r[3] for r in chunk) else (),
            )
        )
    return shards


# ---------------------------------------------------------------- readers
