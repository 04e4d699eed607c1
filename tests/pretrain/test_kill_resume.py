"""Stage 3 resume after a real SIGKILL of ``pipeline run stage=pretrain`` (not a simulated crash).

The run is started as a subprocess in its own process group, killed with SIGKILL once its first
checkpoint is on disk and the next epoch has begun, rerun with ``train.resume=true``, and
compared bit for bit with an uninterrupted run of the same config.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# The tiny corpus builders live beside the data tests (loaded by path, not collected twice).
_spec = importlib.util.spec_from_file_location(
    "pretrain_data_tests_kill", Path(__file__).with_name("test_data.py")
)
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

ROOT = Path(__file__).resolve().parents[2]
# An epoch of the tiny run takes ~0.05 s: if the kill still lands after the last checkpoint (a
# stalled poller on a loaded machine), the whole scenario is retried with a longer run.
EPOCHS_TRIED = (12, 48)
# Fields that measure wall time: they differ between any two runs.
TIMING = {"seconds", "samples_per_s"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("kill_corpus")
    images = helpers.make_images(root / "images")
    tokenizer = helpers.make_tokenizer(root / "tokenizer.pth")
    tokens = helpers.make_tokens(images, tokenizer, root / "tokens")
    return {"images": str(images), "tokens": str(tokens)}


def pipeline_command() -> list[str]:
    """The installed console script beside this interpreter, else the module."""
    script = Path(sys.executable).with_name("pipeline")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pipeline.cli"]


def command(corpus: dict, out: Path, epochs: int, *extra: str) -> list[str]:
    return [
        *pipeline_command(),
        "run",
        "stage=pretrain",
        f"images={corpus['images']}",
        f"tokens={corpus['tokens']}",
        f"out_dir={out}",
        "model.size=tiny",
        "model.width=32",
        "model.depth=2",
        "model.heads=2",
        "mask.min_patches=4",
        "train.batch_size=4",
        f"train.epochs={epochs}",
        "train.blr=0.5",
        "train.warmup_epochs=1",
        "train.num_workers=0",
        "train.shuffle_buffer=4",
        "train.log_every=1",
        "train.save_every=1",
        "train.device=cpu",
        *extra,
    ]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_to_end(cmd: list[str], log: Path) -> None:
    with log.open("w") as out:
        done = subprocess.run(
            cmd, cwd=ROOT, env=environment(), stdout=out, stderr=subprocess.STDOUT, timeout=120
        )
    assert done.returncode == 0, log.read_text()[-3000:]


def started_epoch(out_dir: Path, epoch: int) -> bool:
    """Whether metrics.jsonl holds a step line of ``epoch`` (0-based) or later."""
    metrics = out_dir / "metrics.jsonl"
    if not metrics.exists():
        return False
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if record.get("kind") == "step" and record.get("epoch", -1) >= epoch:
            return True
    return False


def run_and_kill_after_checkpoint(cmd: list[str], out_dir: Path, log: Path) -> None:
    """Start ``cmd`` in its own process group; SIGKILL the group once the first checkpoint is
    written and a step of the second epoch is logged (so the kill cuts an epoch short)."""
    checkpoint = out_dir / "checkpoint.pth"
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=environment(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill reaches every child
        )
        try:
            deadline = time.monotonic() + 90
            while not (checkpoint.exists() and started_epoch(out_dir, 1)):
                assert proc.poll() is None, f"run ended before the kill:\n{log.read_text()}"
                assert time.monotonic() < deadline, "no checkpoint within 90 s"
                time.sleep(0.005)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, log.read_text()[-3000:])


def records(out_dir: Path) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(ln).items() if k not in TIMING} for ln in lines if ln.strip()
    ]


def test_sigkill_then_resume_equals_uninterrupted_run(corpus: dict, tmp_path: Path) -> None:
    for epochs in EPOCHS_TRIED:
        split = tmp_path / f"split{epochs}"
        run_and_kill_after_checkpoint(
            command(corpus, split, epochs), split, tmp_path / f"killed{epochs}.log"
        )
        killed_at = torch.load(split / "checkpoint.pth", weights_only=True)["epoch"]
        # The kill must land mid-run: the last epoch not saved, no backbone exported yet.
        if killed_at < epochs and not (split / "backbone_timm.pth").exists():
            break
    assert 1 <= killed_at < epochs, f"every run finished before its kill ({killed_at}/{epochs})"

    run_to_end(command(corpus, split, epochs, "train.resume=true"), tmp_path / "resumed.log")
    assert "resuming from" in (tmp_path / "resumed.log").read_text()
    full = tmp_path / "full"
    run_to_end(command(corpus, full, epochs), tmp_path / "full.log")

    a = torch.load(full / "checkpoint.pth", weights_only=True)
    b = torch.load(split / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == epochs and a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    backbone_a = torch.load(full / "backbone_timm.pth", weights_only=True)
    backbone_b = torch.load(split / "backbone_timm.pth", weights_only=True)
    assert backbone_a.keys() == backbone_b.keys()
    for key, value in backbone_a.items():
        assert torch.equal(value, backbone_b[key]), key
    # Every step and epoch line, values exact; lines of the epoch cut short by the kill are gone.
    assert records(full) == records(split)
    assert [r["epoch"] for r in records(split) if r["kind"] == "epoch"] == list(range(epochs))
