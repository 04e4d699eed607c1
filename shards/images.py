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
  (``c1/loop -> ..``) is skipped with a warning (see :func:`_walk_local`).
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
- dots: every remaining ``.`` becomes ``_`` (:func:`image_key`), so no key holds a dot
  (``n01/img.001.JPEG`` -> ``n01/img_001``);
- extensions: matched case-insensitively against :data:`IMAGE_EXTENSIONS`; other files are not
  images (a folder) or other members of the sample (a tar: ``.cls``);
- duplicates: when two files or samples give one key (``a.jpg`` and ``a.png``, ``a.b.jpg`` and
  ``a_b.jpg``, a key twice in a tar), the first in sorted order (folders) or stream order (tars,
  Parquet) keeps it and every other one is an error record ``duplicate key ...``;
- hidden entries (any path component starting with ``.``) are ignored.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import posixpath
import re
import stat
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

# Extensions recognised as images in folders and tars (lower case; torchvision's list + gif).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "pbm", "tif", "tiff", "gif")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
# A single tar member larger than this is not read into memory (reported as an error record).
MAX_MEMBER_BYTES = 256 * 2**20
# index.json written by ``stage=pack`` (shards.pack.INDEX_FORMAT): lists its shards in order.
PACK_INDEX_FORMAT = "beitv2-image-shards"

Kind = Literal["folder", "webdataset", "parquet"]


class BadShard(Exception):
    """A whole shard cannot be read (truncated or unreadable tar/parquet); str(err) says why."""


@dataclass(frozen=True)
class ImageShard:
    """One unit of work: a tar, a parquet file, or a slice of a folder's sorted files."""

    index: int  # position in the source's shard list (0..n-1), stable
    url: str  # the tar/parquet file, or the folder for folder sources
    kind: Kind
    keys: tuple[str, ...] = ()  # folder sources only: the keys of this shard, in order
    files: tuple[str, ...] = ()  # folder sources only: relative file path of each key
    labels: tuple[int, ...] = ()  # folder sources only: label of each key (-1 = none)
    # folder sources only: "" or why the key is skipped (a duplicate), one per key; () = none
    errors: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """``shard-000003`` for index 3."""
        return f"shard-{self.index:06d}"


@dataclass(frozen=True)
class ImageRecord:
    """One image of a shard: its key, encoded bytes and label (or why it is not an image)."""

    key: str
    data: bytes  # b"" when error is set
    label: int  # -1 when unknown
    error: str | None = None

    @functools.cached_property
    def sha256(self) -> str:
        """The image digest every row of a token dataset carries (docs/design.md §3).

        Lower-case hex sha256 of :attr:`data`: the stored bytes of the image exactly as read from
        the source, before any decode: the tar member's payload, the file's contents, or the
        Parquet cell (``image.bytes``). A consumer recomputes it with
        ``hashlib.sha256(open(file, "rb").read()).hexdigest()``. "" for an error record.
        """
        return hashlib.sha256(self.data).hexdigest() if self.error is None else ""


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
        FileNotFoundError: nothing matches.
        ValueError: a bad ``shard_size``, a mix of tar and parquet files, or a folder holding
            several series of shards (``train-*`` and ``validation-*``: pass one as a pattern).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    entries = _split_list(images)
    if not entries:
        raise FileNotFoundError("images= is empty; pass a folder, tar shards or parquet files")
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
        raise ValueError(
            f"{bad} is neither a tar ({', '.join(TAR_SUFFIXES)}) nor a parquet file; "
            "images= takes a folder, tar shards or parquet files"
        )
    if len(kinds) > 1:
        raise ValueError(f"images= mixes tar and parquet files ({entries}); pass one kind")
    kind = kinds.pop()
    return [ImageShard(index=i, url=f, kind=kind) for i, f in enumerate(files)]


def list_classes(images: str) -> tuple[str, ...]:
    """Sorted class-folder names of an ImageFolder source (the label order); () otherwise."""
    fs, root = fsspec.core.url_to_fs(images)
    if _has_magic(root) or not fs.isdir(root):
        return ()
    classes, _ = _scan_folder(fs, root)
    return classes


def iter_shard(shard: ImageShard) -> Iterator[ImageRecord]:
    """Yield the shard's records in a stable order (never decodes, never extracts to disk).

    A truncated or unreadable tar/parquet yields every complete record read before the damage
    and then raises :class:`BadShard` with the reason.
    """
    if shard.kind == "folder":
        yield from _iter_folder(shard)
    elif shard.kind == "webdataset":
        yield from _iter_tar(shard.url)
    elif shard.kind == "parquet":
        yield from _iter_parquet(shard.url)
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
        return _tar_keys(shard.url)
    return _parquet_keys(shard.url)


def _tar_keys(url: str) -> list[str]:
    groups: dict[str, set[str]] = {}
    order: list[str] = []
    try:
        with fsspec.open(url, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                if key is None:
                    continue
                key = image_key(key)
                if key not in groups:
                    groups[key] = set()
                    order.append(key)
                groups[key].add(ext.lower().rsplit(".", 1)[-1])
    except (tarfile.TarError, EOFError, OSError) as err:
        raise BadShard(f"unreadable tar {url}: {err}") from None
    return [k for k in order if groups[k] & set(IMAGE_EXTENSIONS)]


def _parquet_keys(url: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    stem = posixpath.basename(url).split(".", 1)[0]
    try:
        with fsspec.open(url, "rb") as raw:
            pf = pq.ParquetFile(raw)
            image = pf.schema_arrow.field("image").type
            if pa.types.is_struct(image) and image.get_field_index("path") >= 0:
                column = pf.read(columns=["image.path"]).column(0).combine_chunks()
                paths = column.field("path") if pa.types.is_struct(column.type) else column
                names = paths.to_pylist()
            else:
                names = [None] * pf.metadata.num_rows
    except (OSError, ValueError, KeyError, pa.ArrowException) as err:
        raise BadShard(f"unreadable parquet {url}: {err}") from None
    keys, seen = [], set()
    for row, path in enumerate(names):
        key = image_key(path.rsplit(".", 1)[0]) if path else f"{stem}/{row}"
        if key not in seen:
            seen.add(key)
            keys.append(key)
    return keys


# ---------------------------------------------------------------- source listing


def _split_list(images: str | os.PathLike | Sequence[str]) -> list[str]:
    """A list as is; a string split on commas that are not inside braces."""
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
    import braceexpand

    out: list[str] = []
    for url in braceexpand.braceexpand(entry):
        fs, path = fsspec.core.url_to_fs(url)
        if _has_magic(path):
            matches = sorted(fs.glob(path))
            if not matches:
                raise FileNotFoundError(f"no files match {url}")
            out.extend(_url(fs, m) for m in matches)
        elif fs.isdir(path):
            out.extend(_url(fs, m) for m in _shard_files_in(fs, path))
        elif fs.exists(path):
            out.append(url)
        else:
            raise FileNotFoundError(f"image source not found: {url}")
    return out


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path the filesystem listed, as a URL again (plain path on the local disk)."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _shard_files_in(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The tars of a folder (from index.json when pack wrote one), else its parquet files at any
    depth (the HF layout keeps them in ``data/``); one series of shards only."""
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
        raise FileNotFoundError(f"no tar or parquet files in {path}")
    series = sorted({_series(n) for n in files})
    if len(series) > 1:
        # e.g. train-*.parquet next to validation-*.parquet: mixing splits is never wanted
        example = posixpath.join(path, series[0] + "*")
        raise ValueError(
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


def image_key(name: str) -> str:
    """The key rule for every source: ``name`` (a path without its last extension) with each dot
    replaced by ``_``, so a key never holds a dot (WebDataset splits member names at a basename's
    first dot, and the token writer refuses dotted keys): ``a.b/c.d`` -> ``a_b/c_d``."""
    return name.replace(".", "_")


def _walk_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Every file under root, relative, posix separators, each real file once (see _walk_local)."""
    root = root.rstrip("/") or "/"
    if isinstance(fs, LocalFileSystem):
        return _walk_local(root)
    rel = [posixpath.relpath(path, root) for path in fs.find(root)]
    return [r for r in rel if not any(p.startswith(".") for p in r.split("/"))]


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk_local(root: str) -> list[str]:
    """Walk a local folder in sorted order, resolving symlinks so each real file is listed once.

    - A symlink whose target lies inside the folder is not followed: the target is listed at its
      own path (so ``c1/x.jpg -> ../c2/x.jpg`` never labels an image of c2 as c1), and a
      directory link to an ancestor (``c1/loop -> ..``) is a cycle, skipped with a warning.
    - A symlink to outside the folder is followed (a folder of links into a shared store), each
      real directory and file once: the first path in sorted order wins.
    - Hidden entries (names starting with ".") and broken links are skipped.
    """
    real_root = os.path.realpath(root)
    files: list[str] = []
    seen: set[tuple[int, int]] = set()  # (device, inode) of every directory and file visited
    notes: dict[str, list[str]] = {"loops": [], "inside": [], "twice": [], "broken": []}

    def visit(folder: str, rel: str, ancestors: frozenset[tuple[int, int]]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            log.warning("%s: cannot list %s: %s", root, rel or ".", err)
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = f"{rel}/{entry.name}" if rel else entry.name
            try:
                st = os.stat(entry.path)  # follows symlinks
            except OSError:
                notes["broken"].append(path)
                continue
            ident = (st.st_dev, st.st_ino)
            is_dir = stat.S_ISDIR(st.st_mode)
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if is_dir and ident in ancestors:
                    notes["loops"].append(f"{path} -> {os.readlink(entry.path)}")
                    continue
                if _inside(target, real_root):
                    notes["inside"].append(path)
                    continue
            if ident in seen:
                notes["loops" if is_dir and ident in ancestors else "twice"].append(path)
                continue
            seen.add(ident)
            if is_dir:
                visit(entry.path, path, ancestors | {ident})
            elif stat.S_ISREG(st.st_mode):
                files.append(path)

    st = os.stat(root)
    seen.add((st.st_dev, st.st_ino))
    visit(root, "", frozenset({(st.st_dev, st.st_ino)}))
    if notes["loops"]:
        log.warning(
            "%s: skipped %d symlink cycle(s): %s",
            root,
            len(notes["loops"]),
            ", ".join(notes["loops"][:5]),
        )
    for what, text in (
        ("inside", "symlink(s) to files already listed at their own path"),
        ("twice", "paths reaching an already listed file or folder again"),
        ("broken", "broken symlink(s)"),
    ):
        if notes[what]:
            log.warning("%s: skipped %d %s, e.g. %s", root, len(notes[what]), text, notes[what][0])
    return files


def _is_image_file(rel: str) -> bool:
    parts = rel.split("/")
    if any(p.startswith(".") for p in parts):
        return False
    return "." in parts[-1] and parts[-1].rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS


def _scan_folder(
    fs: fsspec.AbstractFileSystem, root: str
) -> tuple[tuple[str, ...], list[tuple[str, str, int, str]]]:
    """(classes, [(key, relative file, label, error)] sorted by key then file) of an image folder.

    ``error`` is "" or, for every file after the first one with the same key, why it is skipped.
    """
    files = [r for r in _walk_files(fs, root) if _is_image_file(r)]
    nested = [r for r in files if "/" in r]
    if nested:
        classes = tuple(sorted({r.split("/", 1)[0] for r in nested}))
        ignored = len(files) - len(nested)
        if ignored:
            log.warning("%s: ignoring %d image files outside the class folders", root, ignored)
        class_index = {c: i for i, c in enumerate(classes)}
        listed = [
            (image_key(r.rsplit(".", 1)[0]), r, class_index[r.split("/", 1)[0]]) for r in nested
        ]
    else:
        classes = ()
        listed = [(image_key(r.rsplit(".", 1)[0]), r, -1) for r in files]
    listed.sort(key=lambda row: (row[0], row[1]))
    rows: list[tuple[str, str, int, str]] = []
    first: dict[str, str] = {}
    for key, rel, label in listed:
        # a.jpg and a.png (or a.b.jpg and a_b.jpg): one key; the first file in sorted order keeps it
        error = f"duplicate key (also {first[key]})" if key in first else ""
        first.setdefault(key, rel)
        rows.append((key, rel, label, error))
    return classes, rows


def _list_folder(
    url: str, fs: fsspec.AbstractFileSystem, root: str, shard_size: int
) -> list[ImageShard]:
    if any(_file_kind(n) for n in fs.ls(root, detail=False)):
        rows = []  # a folder of shards rather than of images
    else:
        _, rows = _scan_folder(fs, root)
    if not rows:
        try:  # tars at the top, or parquet at any depth (the HF layout root/data/*.parquet)
            files = [_url(fs, f) for f in _shard_files_in(fs, root)]
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}), tars or parquet files under {url}"
            ) from None
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


def _iter_folder(shard: ImageShard) -> Iterator[ImageRecord]:
    fs, root = fsspec.core.url_to_fs(shard.url)
    labels = shard.labels or (-1,) * len(shard.keys)
    errors = shard.errors or ("",) * len(shard.keys)
    files = shard.files
    if not len(files) == len(labels) == len(errors) == len(shard.keys):
        raise BadShard(f"{shard.name}: keys, files and labels differ in length; re-list the shards")
    seen: dict[str, str] = {}
    for key, rel, label, error in zip(shard.keys, files, labels, errors, strict=True):
        if error or key in seen:
            yield ImageRecord(key, b"", label, error or f"duplicate key (also {seen[key]})")
            continue
        seen[key] = rel
        try:
            data = fs.cat_file(posixpath.join(root, rel))
        except FileNotFoundError:
            yield ImageRecord(key, b"", label, f"file not found: {rel}")
            continue
        except OSError as err:
            yield ImageRecord(key, b"", label, f"unreadable file: {err}")
            continue
        yield ImageRecord(key, data, label)


def split_member_name(name: str) -> tuple[str | None, str]:
    """WebDataset's key/extension split: the key keeps directories and ends at the basename's
    first dot (``a/b.c.jpg`` -> ``("a/b", "c.jpg")``); (None, "") when there is no extension."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    if not match:
        return None, ""
    return match.group(1), match.group(2)


def _iter_tar(url: str) -> Iterator[ImageRecord]:
    members = 0
    seen: set[str] = set()
    group_key: str | None = None
    group: dict[str, bytes] = {}
    group_errors: list[str] = []
    try:
        # stream mode: sequential reads only (object stores), never extract to disk
        with fsspec.open(url, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for info in tar:
                if info.isfile():
                    key, ext = split_member_name(info.name)
                    key = image_key(key) if key is not None else None
                    if key is not None and key != group_key:
                        if group_key is not None:
                            yield _tar_record(group_key, group, group_errors, seen)
                        group_key, group, group_errors = key, {}, []
                    if key is not None:
                        _read_member(tar, info, ext.lower(), group, group_errors)
                members += 1  # complete members read so far
            if not _saw_end_marker(tar):
                raise tarfile.ReadError("no end-of-archive marker")
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError):
            raise BadShard(f"tar not found: {url}") from None
        what = "unreadable tar" if members == 0 else f"truncated tar after {members} members"
        raise BadShard(f"{what}: {err}") from None
    if group_key is not None:
        yield _tar_record(group_key, group, group_errors, seen)


def _read_member(
    tar: tarfile.TarFile,
    info: tarfile.TarInfo,
    ext: str,
    group: dict[str, bytes],
    errors: list[str],
) -> None:
    """Read one member into its key's group (bytes in memory only, never onto the disk)."""
    if ext in group:
        errors.append(f"duplicate member .{ext}")
        return
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
    key: str, group: dict[str, bytes], errors: list[str], seen: set[str]
) -> ImageRecord:
    if key in seen:
        return ImageRecord(key, b"", -1, "duplicate key (members not adjacent in the tar)")
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


def _iter_parquet(url: str) -> Iterator[ImageRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

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
                    path = path_col[i] if path_col else None
                    key = image_key(path.rsplit(".", 1)[0]) if path else f"{stem}/{row}"
                    label = labels[i] if labels and labels[i] is not None else -1
                    row += 1
                    if key in seen:
                        yield ImageRecord(key, b"", int(label), "duplicate key")
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
