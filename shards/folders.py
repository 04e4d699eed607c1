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
    """The one key rule, for every source: a name from the source (a path without its extension)
    as a key that is safe as a member name and a relative path.

    A backslash counts as ``/``; empty, ``.`` and ``..`` components are dropped, so no key is
    absolute or climbs out of a folder (``/abs/y`` -> ``abs/y``, ``../../etc/x`` -> ``etc/x``,
    ``./a//b`` -> ``a/b``, ``a\\b`` -> ``a/b``); every remaining dot becomes ``_`` (WebDataset
    splits member names at a basename's first dot): ``a.b/c.d`` -> ``a_b/c_d``. "" when nothing is
    left (the sources skip that image). Applying it twice changes nothing.
    """
    parts = name.replace("\\", "/").split("/")
    return "/".join(p.replace(".", "_") for p in parts if p not in ("", ".", ".."))


def no_key(name: str) -> str:
    """The skip reason of an image whose name the key rule leaves empty."""
    return f"no key: the key rule leaves nothing of the name {name!r}"


def _walk_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Every file under root, relative, posix separators, each real file once (see _walk_local);
    hidden ones too (scan_folder skips them with a reason)."""
    root = root.rstrip("/") or "/"
    if isinstance(fs, LocalFileSystem):
        return _walk_local(root)
    return [posixpath.relpath(path, root) for path in fs.find(root)]


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk_local(root: str) -> list[str]:
    """Walk a local folder in sorted order, resolving symlinks so each real file is listed once.

    - A symlink whose target lies inside the folder is not followed: the target is listed at its
      own path (so ``c1/x.jpg -> ../c2/x.jpg`` never labels an image of c2 as c1), and a
      directory link to an ancestor (``c1/loop -> ..``) is a cycle, skipped with a warning.
    - A symlink to outside the folder is followed (a folder of links into a shared store), each
      real directory and file once: the first path in sorted order wins.
    - Hidden entries (names starting with "."): a file is listed as it is, a folder with every
      file under it, no link followed, so that scan_folder reports them (it never reads them).
    - Broken links are skipped with a warning.
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
            path = f"{rel}/{entry.name}" if rel else entry.name
            if entry.name.startswith("."):
                files.extend(_hidden_files(entry, path))
                continue
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


def _hidden_files(entry: os.DirEntry, path: str) -> list[str]:
    """A hidden entry's files as paths like ``path``: the entry itself, or for a folder every file
    under it (links not followed: these are listed to be reported, never read)."""
    if not entry.is_dir(follow_symlinks=False):
        return [path]
    found = []
    for folder, dirs, names in os.walk(entry.path):
        dirs.sort()
        inner = os.path.relpath(folder, entry.path)
        prefix = path if inner == "." else f"{path}/{inner}"
        found.extend(f"{prefix}/{name}" for name in sorted(names))
    return found


def _is_hidden(rel: str) -> bool:
    return any(p.startswith(".") for p in rel.split("/"))


def _is_image_file(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS


def scan_folder(
    fs: fsspec.AbstractFileSystem, root: str
) -> tuple[tuple[str, ...], list[tuple[str, str, int, str]]]:
    """(classes, [(key, relative file, label, error)] sorted by key then file) of an image folder.

    ``error`` is "" or why the image is skipped: a hidden file (any path component starting with
    "."), a name the key rule leaves empty, or, for every file after the first one with the same
    key, a duplicate. Hidden files take no class and no key from the images that are read.
    """
    files = [r for r in _walk_files(fs, root) if _is_image_file(r)]
    hidden = [r for r in files if _is_hidden(r)]
    visible = [r for r in files if not _is_hidden(r)]
    nested = [r for r in visible if "/" in r]
    classes = tuple(sorted({r.split("/", 1)[0] for r in nested}))
    if nested:
        ignored = len(visible) - len(nested)
        if ignored:
            log.warning("%s: ignoring %d image files outside the class folders", root, ignored)
        visible = nested
    class_index = {c: i for i, c in enumerate(classes)}
    listed = [
        (image_key(r.rsplit(".", 1)[0]), r, class_index.get(r.split("/", 1)[0], -1))
        for r in visible + hidden
    ]
    listed.sort(key=lambda row: (row[0], row[1]))
    rows: list[tuple[str, str, int, str]] = []
    first: dict[str, str] = {}
    for key, rel, label in listed:
        if _is_hidden(rel):
            error = "hidden file"
        elif not key:
            error = no_key(rel.rsplit(".", 1)[0])
        elif key in first:
            # a.jpg and a.png (or a.b.jpg and a_b.jpg): one key; the first file in sorted order
            error = f"duplicate key (also {first[key]})"
        else:
            error = ""
            first[key] = rel
        rows.append((key, rel, label, error))
    if hidden:
        log.warning("%s: skipping %d hidden image files, e.g. %s", root, len(hidden), hidden[0])
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
