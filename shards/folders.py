"""Folder sources: the key rule, a sound walk (symlinks resolved, cycles skipped), listing and reading.

See shards/images.py for the rules every source follows.
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
from collections.abc import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from shards.records import IMAGE_EXTENSIONS, BadShard, ImageRecord, ImageShard

log = logging.getLogger(__name__)


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


def scan_folder(
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


def iter_folder(shard: ImageShard) -> Iterator[ImageRecord]:
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
