"""One run per output folder: every stage checks its ``out_dir`` before any work
(:func:`check_output`, which the tools use for their ``out=`` too) and holds it for the whole run
(:func:`hold`).

- **Local disks:** an exclusive ``flock`` on ``<out_dir>/.lock``. The kernel releases it when the
  process dies, ``kill -9`` included, so a killed run never blocks the next. A process forked
  while the lock is held (a DataLoader worker) closes its copy of the descriptor at once: a child
  that outlives a killed parent for a few seconds does not keep the folder locked.
- **Object stores** have no locks: a heartbeat record ``.lock.json`` that the holder rewrites
  every ~20 s; one older than 90 s belongs to a run that was killed and is taken over.

The second run into a held folder is refused with :class:`engine.errors.OutDirBusy` (exit 2).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from engine.errors import ConfigError, OutDirBusy

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
REMOTE_LOCK_NAME = ".lock.json"
# Object-store locks: the holder rewrites its record this often; an older record is stale (its
# run was killed) and may be taken over.
HEARTBEAT_SECONDS = 20.0
STALE_SECONDS = 90.0

# Descriptors of the flocks this process holds; a forked child closes them (module docstring).
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def check_output(path: str, holds: str, *, key: str = "out_dir", file: bool = False) -> None:
    """Refuse, before any work, an output ``key=path`` that cannot hold ``holds``: empty; a file
    where a folder is wanted (the default), a folder where a ``file`` is; a path under a file;
    a place this process cannot create files in. Object-store URLs are left to their first
    write."""
    kind = "file" if file else "folder"
    if not path:
        raise ConfigError(f"{key} is empty; pass {key}=<{kind} for {holds}>")
    if "://" in path and not path.startswith("file://"):
        return
    target = Path(path.removeprefix("file://")).expanduser().absolute()
    if target.is_dir() if file else target.is_file():
        other = "folder" if file else "file"
        raise ConfigError(f"{key}={path} is a {other}; pass a {kind} for {holds}")
    existing = target.parent if file else target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the folder the missing ones would be made in
    if not existing.is_dir():
        raise ConfigError(
            f"{key}={path} cannot be made: {existing} is a file; pass a {kind} for {holds}"
        )
    try:  # the kernel's answer (an immutable folder, a read-only mount, ...); leaves no file
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        raise _not_writable(path, existing, err, key) from None


def _not_writable(path: str, folder: object, err: OSError, key: str = "out_dir") -> ConfigError:
    """The refusal of an output ``key=path``: no file can be created in ``folder`` (``err``)."""
    return ConfigError(
        f"{key}={path} is not writable ({folder}: {err.strerror or err}); pass another {key}, one "
        "you can write to, or make that folder writable (its owner and mode, chattr -i, a "
        "read-only mount)"
    )


@contextlib.contextmanager
def hold(out_dir: str) -> Iterator[None]:
    """Hold the folder ``out_dir`` (local path or fsspec URL; created when missing) until the
    block ends; refuse with :class:`OutDirBusy` when another run holds it."""
    fs, root = fsspec.core.url_to_fs(str(out_dir))
    root = root.rstrip("/") or root
    try:
        fs.makedirs(root, exist_ok=True)
    except (PermissionError, FileExistsError, NotADirectoryError) as err:
        raise _not_writable(out_dir, err.filename or root, err) from None
    if isinstance(fs, LocalFileSystem):
        with _flock(out_dir, os.path.join(root, LOCK_NAME)):
            yield
    else:
        with _heartbeat(out_dir, fs, f"{root}/{REMOTE_LOCK_NAME}"):
            yield


@contextlib.contextmanager
def _flock(out_dir: str, path: str) -> Iterator[None]:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise _not_writable(out_dir, os.path.dirname(path), err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutDirBusy(_busy(out_dir, _read_text(path))) from None
        # The holder before us may have removed the file between our open and our flock:
        # then we hold a lock on a deleted file; open the current one again.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    _HELD.add(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, _holder().encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        _HELD.discard(fd)
        os.close(fd)


@contextlib.contextmanager
def _heartbeat(out_dir: str, fs: fsspec.AbstractFileSystem, path: str) -> Iterator[None]:
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        held = json.loads(fs.cat_file(path))
        if time.time() - float(held.get("heartbeat", 0)) < STALE_SECONDS:
            raise OutDirBusy(_busy(out_dir, json.dumps(held)))
        log.warning("taking over the lock of a run that stopped: %s", held)
    run = uuid.uuid4().hex

    def beat() -> None:
        record = {**json.loads(_holder()), "run": run, "heartbeat": time.time()}
        fs.pipe_file(path, json.dumps(record, sort_keys=True).encode())

    beat()
    time.sleep(1.0)  # two runs that started together: the last writer wins, the other leaves
    fs.invalidate_cache()
    current = json.loads(fs.cat_file(path))
    if current.get("run") != run:
        raise OutDirBusy(_busy(out_dir, json.dumps(current)))
    stop = threading.Event()

    def keep_alive() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(Exception):
                beat()

    thread = threading.Thread(target=keep_alive, name="out-dir-lock", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)


def _holder() -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def _busy(out_dir: str, holder: str) -> str:
    try:
        held = json.loads(holder)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(held["since"])))
        who = f"pid {held['pid']} on {held['host']}, since {since}"
    except (ValueError, KeyError, TypeError):
        who = "holder unknown"
    return (
        f"out_dir={out_dir} is held by another run ({who}); wait for it to finish, or pass "
        "another out_dir: two runs into one folder would mix their outputs"
    )
