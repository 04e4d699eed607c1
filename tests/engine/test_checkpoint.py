"""Atomic, shareable artifact writes and reads that never unpickle code."""

import os

import pytest
import torch
from safetensors.torch import save_file

from engine.atomic import write_bytes_atomic
from engine.checkpoint import load_file, save_atomic
from engine.errors import CheckpointError, CheckpointNotFound, UserError


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_round_trip_and_mode_follows_umask(tmp_path, umask_022):
    state = {"w": torch.arange(6.0).view(2, 3), "step": 7, "name": "x"}
    path = save_atomic(state, tmp_path / "sub" / "ckpt.pth")
    assert path == str(tmp_path / "sub" / "ckpt.pth")
    loaded = load_file(path)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 7
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path / "sub") == ["ckpt.pth"]  # no temp file left behind


def test_mode_under_a_stricter_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_bytes_atomic(tmp_path / "a.json", b"{}")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.json").st_mode & 0o777 == 0o600


def test_replace_is_whole_file(tmp_path):
    write_bytes_atomic(tmp_path / "a.yaml", b"old")
    write_bytes_atomic(tmp_path / "a.yaml", b"new contents")
    assert (tmp_path / "a.yaml").read_bytes() == b"new contents"


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    write_bytes_atomic(tmp_path / "a.bin", b"old")

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        write_bytes_atomic(tmp_path / "a.bin", b"new")
    assert (tmp_path / "a.bin").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_fsspec_urls():
    save_atomic({"w": torch.ones(2)}, "memory://ckpts/a.pth")
    assert torch.equal(load_file("memory://ckpts/a.pth")["w"], torch.ones(2))


def test_safetensors(tmp_path):
    save_file({"w": torch.full((2, 2), 3.0)}, str(tmp_path / "m.safetensors"))
    assert torch.equal(load_file(tmp_path / "m.safetensors")["w"], torch.full((2, 2), 3.0))
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="bad.safetensors is not a readable safetensors"):
        load_file(tmp_path / "bad.safetensors")


def test_pickled_objects_are_refused_with_the_conversion(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    with pytest.raises(CheckpointError) as info:
        load_file(tmp_path / "module.pth")
    message = str(info.value)
    assert "module.pth" in message and "torch.nn.modules.linear.Linear" in message
    assert "weights_only=False" in message and "state_dict" in message
    assert isinstance(info.value, UserError)


def test_missing_and_junk_files(tmp_path):
    with pytest.raises(CheckpointNotFound, match="not found at .*nope.pth"):
        load_file(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError for older callers
        load_file(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth is not a readable torch checkpoint"):
        load_file(tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match=f"{tmp_path} is a folder"):
        load_file(tmp_path)
