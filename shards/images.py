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
``stage=tokenize`` (pack reads its input through this module), in one function
(``shards.folders.image_key``; docs/token-dataset.md §2 "Keys"):

- the name: a folder file's relative path (``/`` separators) without its last extension; a tar
  member's name up to the first dot of its basename (WebDataset's split); a Parquet row's
  ``image.path`` without its last extension, or ``<file stem>/<row>`` when there is no path;
- safe names: a backslash counts as ``/``, and empty, ``.`` and ``..`` components are dropped,
  so no key is absolute or leaves a folder (``/abs/y`` -> ``abs/y``, ``../../etc/x`` ->
  ``etc/x``, ``./a//b`` -> ``a/b``); a name with nothing left is skipped (``no key: ...``);
- dots: every remaining ``.`` becomes ``_``, so no key holds a dot
  (``n01/img.001.JPEG`` -> ``n01/img_001``);
- extensions: matched case-insensitively against ``shards.records.IMAGE_EXTENSIONS``; other files are not
  images (a folder) or other members of the sample (a tar: ``.cls``);
- duplicates: one key, one image. When two files, samples or rows give one key (``a.jpg`` and
  ``a.png`` in a folder, ``a.b.jpg`` and ``a_b.jpg``, ``/a.jpg`` and ``a.jpg``, a key twice in a
  tar, or in two tars), the first in the source's order keeps it: sorted order in a folder,
  stream order in a file, shard order across files (:func:`source_keys`). Every later one is an
  error record ``duplicate key (...)`` saying where the first is. In a tar, a member of a type
  the sample already has (``a.jpg`` twice in a row) starts a new sample, as WebDataset does;
- hidden files (any path component starting with ``.``) of a folder are error records
  ``hidden file``: listed, never read.

A key the rule changes (a dot, a ``/`` or ``..`` dropped) is not an error: :func:`source_keys`
counts them and logs examples, pack lists them in its ``index.json`` and stage 2 counts them in
its run summary (``keys_renamed``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import braceexpand
import fsspec
from fsspec.implementations.local import LocalFileSystem

from shards.archives import iter_parquet, iter_tar, parquet_names, tar_names
from shards.errors import ImageSourceError
from shards.folders import iter_folder, scan_folder
from shards.records import (
    IMAGE_EXTENSIONS,
    PACK_INDEX_FORMAT,
    PARQUET_SUFFIXES,
    TAR_SUFFIXES,
    BadShard,
    ImageRecord,
    ImageShard,
    Kind,
)

log = logging.getLogger(__name__)

# Shards listed at once by source_keys (tar headers and Parquet path columns: mostly waiting on
# storage, so threads help on object stores and cost little on a local disk).
LISTING_THREADS = 8


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

    A key an earlier shard of the source has (``shard.duplicates``) comes out as an error record.
    A truncated or unreadable tar/parquet yields every complete record read before the damage
    and then raises ``shards.records.BadShard`` with the reason.
    """
    if shard.kind == "folder":
        records = iter_folder(shard)
    elif shard.kind == "webdataset":
        records = iter_tar(shard.url)
    elif shard.kind == "parquet":
        records = iter_parquet(shard.url)
    else:
        raise ValueError(f"unknown shard kind {shard.kind!r}")
    earlier = dict(shard.duplicates)
    for record in records:
        if record.error is None and record.key in earlier:
            why = f"duplicate key (first in {earlier[record.key]})"
            yield ImageRecord(record.key, b"", record.label, why)
        else:
            yield record


def list_names(shard: ImageShard) -> list[tuple[str, str]]:
    """(key, name before the key rule) of each record :func:`iter_shard` yields without an
    error, as far as can be told cheaply; ``shard.duplicates`` not applied.

    Folders: the listing (no file is read). Tars: member headers only (a plain tar on a seekable
    file skips the image bytes; a gzip'd one is decompressed). Parquet: the ``image.path``
    column only. An image that later fails to read is reported then.
    """
    if shard.kind == "folder":
        errors = shard.errors or ("",) * len(shard.keys)
        return [
            (key, rel.rsplit(".", 1)[0])
            for key, rel, error in zip(shard.keys, shard.files, errors, strict=True)
            if not error
        ]
    if shard.kind == "webdataset":
        return tar_names(shard.url)
    return parquet_names(shard.url)


@dataclass(frozen=True)
class SourceKeys:
    """The keys of a whole image source, the duplicate rule applied (:func:`source_keys`)."""

    shards: list[ImageShard]  # the source's shards, each key an earlier shard has marked
    keys: list[list[str]]  # per shard: the keys it yields without an error, in order
    renamed: list[tuple[str, str]]  # (name in the source, key) for each name the key rule changed
    unreadable: dict[int, str]  # shard index -> why it could not be listed (no keys counted)


def source_keys(shards: Sequence[ImageShard]) -> SourceKeys:
    """List every shard's keys (:func:`list_names`, several shards at a time) and apply the
    duplicate rule across shards: a key belongs to the first shard in source order that lists
    it; a later shard that has it gets it in ``ImageShard.duplicates``, so :func:`iter_shard`
    skips it there with a reason naming the first shard. Folder slices never share a key (the
    folder's listing already applied the rule). A shard that cannot be listed counts as having
    no keys; reading it fails later with the reason.
    """
    owner: dict[str, int] = {}  # key -> position of the first shard that has it
    marked, keys, renamed, unreadable = [], [], [], {}
    with ThreadPoolExecutor(min(LISTING_THREADS, max(1, len(shards)))) as pool:
        listed = pool.map(_try_names, shards)  # in shard order, each dropped once read
        for position, (shard, names) in enumerate(zip(shards, listed, strict=True)):
            if isinstance(names, BadShard):
                unreadable[shard.index] = str(names)
                names = []
            mine, later = [], []
            folder = shard.kind == "folder"  # a folder's listing applied the rule already
            for key, name in names:
                first = position if folder else owner.setdefault(key, position)
                if first != position:
                    later.append((key, _where(shards[first])))
                    continue
                mine.append(key)
                if key != name:
                    renamed.append((name, key))
            keys.append(mine)
            marked.append(dataclasses.replace(shard, duplicates=tuple(later)) if later else shard)
    duplicates = [(s, key, where) for s in marked for key, where in s.duplicates]
    if duplicates:
        shard, key, where = duplicates[0]
        log.warning(
            "%d images have a key an earlier image shard already has; they are skipped "
            "(the first one keeps it), e.g. %r in %s, first in %s",
            len(duplicates),
            key,
            _where(shard),
            where,
        )
    if renamed:
        log.info(
            "%d keys differ from their names in the source by the key rule, e.g. %r -> %r",
            len(renamed),
            *renamed[0],
        )
    return SourceKeys(marked, keys, renamed, unreadable)


def _try_names(shard: ImageShard) -> list[tuple[str, str]] | BadShard:
    try:
        return list_names(shard)
    except BadShard as err:
        return err


def _where(shard: ImageShard) -> str:
    """``shard-000003, b.tar``: a shard as a skip reason names it."""
    return f"{shard.name}, {posixpath.basename(shard.url.rstrip('/'))}"


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
