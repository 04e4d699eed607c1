"""The out_dir lock and the out_dir check every stage shares (``engine.lock``): a second holder is
refused naming the folder and the holder, a killed holder (even one whose forked child lives on)
blocks nobody, a stale object-store record is taken over; an output path that cannot be written
is refused before any work, and leaves nothing behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
from support.immutable import immutable_folder

from engine import lock
from engine.errors import ConfigError, OutDirBusy
from engine.lock import check_output, hold


def test_a_second_holder_is_refused_until_the_first_lets_go(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with hold(str(out)):
        assert (out / ".lock").is_file()
        with pytest.raises(OutDirBusy) as refused, hold(str(out)):
            pytest.fail("two holders at once")
        message = str(refused.value)
        assert f"out_dir={out} is held by another run" in message
        assert f"pid {os.getpid()} on {socket.gethostname()}" in message
    assert not (out / ".lock").exists()
    with hold(str(out)):  # free again
        pass


HOLDER = textwrap.dedent(
    """
    import os, sys, time
    from engine.lock import hold
    with hold(sys.argv[1]):
        if os.fork() == 0:  # a child forked while the lock is held (a DataLoader worker)
            time.sleep(60)
            os._exit(0)
        print("held", flush=True)
        time.sleep(60)
    """
)


def test_kill_9_lets_go_at_once_even_while_a_forked_child_lives(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(OutDirBusy, match=f"pid {proc.pid} "), hold(str(out)):
            pass
        os.kill(proc.pid, signal.SIGKILL)  # the holder only: its child lives on
        proc.wait(timeout=10)
        children = subprocess.run(
            ["pgrep", "-s", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        assert children, "the forked child should still be alive"
        with hold(str(out)):  # not blocked by the dead holder nor by its child
            pass
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_object_store_lock_refuses_a_live_holder_and_takes_over_a_stale_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lock.time, "sleep", lambda _s: None)  # the 1 s settle wait
    url = "memory://lock-test/run"
    fs = fsspec.filesystem("memory")
    with hold(url):
        with pytest.raises(OutDirBusy, match=f"out_dir={url} is held by another run"), hold(url):
            pass
        # the holder was killed 100 s ago: its record is stale
        record = fs.cat_file(f"/lock-test/run/{lock.REMOTE_LOCK_NAME}")
        stale = record.replace(
            b'"heartbeat": ', f'"heartbeat": {time.time() - 100}, "x": '.encode()
        )
        fs.pipe_file(f"/lock-test/run/{lock.REMOTE_LOCK_NAME}", stale)
        with hold(url):  # taken over
            pass
    assert not fs.exists(f"/lock-test/run/{lock.REMOTE_LOCK_NAME}")


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[Path]:
    with immutable_folder(tmp_path / "immutable") as folder:
        yield folder


@pytest.mark.parametrize(
    ("path", "file", "words"),
    [
        ("", False, ["out_dir is empty"]),
        ("{tmp}/a.txt", False, ["out_dir={tmp}/a.txt is a file; pass a folder for the outputs"]),
        ("{tmp}/a.txt/sub", False, ["cannot be made: {tmp}/a.txt is a file"]),
        ("{tmp}", True, ["out={tmp} is a folder; pass a file for the outputs"]),
        ("{tmp}/a.txt/b.pth", True, ["cannot be made: {tmp}/a.txt is a file"]),
    ],
)
def test_an_output_that_cannot_be_made_is_refused(
    tmp_path: Path, path: str, file: bool, words: list[str]
) -> None:
    (tmp_path / "a.txt").write_text("a file\n")
    key = "out" if file else "out_dir"
    with pytest.raises(ConfigError) as refused:
        check_output(path.format(tmp=tmp_path), "the outputs", key=key, file=file)
    for word in words:
        assert word.format(tmp=tmp_path) in str(refused.value)


@pytest.mark.parametrize("below", ["", "new/deeper"])
def test_an_immutable_folder_is_not_writable(locked: Path, below: str) -> None:
    path = str(locked / below) if below else str(locked)
    with pytest.raises(ConfigError) as refused:
        check_output(path, "the outputs")
    assert f"out_dir={path} is not writable ({locked}: Operation not permitted)" in str(
        refused.value
    )
    with pytest.raises(ConfigError, match="is not writable"), hold(path):  # the lock says so too
        pass
    assert os.listdir(locked) == []


def test_a_writable_output_passes_and_nothing_is_made(tmp_path: Path) -> None:
    check_output(str(tmp_path / "new" / "run"), "the outputs")
    check_output(f"file://{tmp_path}/run", "the outputs")
    check_output(str(tmp_path / "new" / "backbone.pth"), "the outputs", key="out", file=True)
    check_output("s3://bucket/run", "the outputs")  # object stores: their first write tells
    assert list(tmp_path.iterdir()) == []
