"""Stage 1 resume after a real SIGKILL of ``pipeline run stage=vqkd`` (not a simulated crash).

The run is started as a subprocess in its own process group, killed with SIGKILL once its first
checkpoint is on disk and the next epoch has begun, rerun with ``train.resume=true``, and its
tokenizer compared bit for bit with an uninterrupted run of the same config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
# An epoch of the tiny run takes a fraction of a second: if the kill still lands after the last
# checkpoint (a stalled poller on a loaded machine), the scenario is retried with a longer run.
EPOCHS_TRIED = (6, 24)
# Fields that measure wall time: they differ between any two runs.
TIMING = {"images_per_s", "seconds"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """16 small images in a flat folder (one bad file) and a tiny timm ViT teacher file, as the
    stage 1 training tests use."""
    import timm

    root = tmp_path_factory.mktemp("vqkd_kill")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((40, 36), Image.Resampling.BILINEAR).save(
            images / f"img{i:02d}.png"
        )
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    torch.manual_seed(0)
    teacher = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8)
    weights = root / "teacher.pt"
    torch.save(teacher.state_dict(), weights)
    return {"images": str(images), "teacher": str(weights)}


def pipeline_command() -> list[str]:
    """The installed console script beside this interpreter, else the module."""
    script = Path(sys.executable).with_name("pipeline")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pipeline.cli"]


def command(data: dict[str, str], out: Path, epochs: int, *extra: str) -> list[str]:
    return [
        *pipeline_command(),
        "run",
        "stage=vqkd",
        f"images={data['images']}",
        f"out_dir={out}",
        "model.size=tiny",
        "model.image_size=32",
        "model.patch_size=8",
        "model.width=32",
        "model.depth=1",
        "model.heads=2",
        "model.decoder_depth=1",
        "model.code_dim=8",
        "model.codebook_size=16",
        "model.kmeans_iters=2",
        "model.dead_code_steps=2",
        "teacher.name=timm:vit_tiny_patch16_224",
        f"teacher.weights={data['teacher']}",
        "train.batch_size=8",
        f"train.epochs={epochs}",
        "train.lr_base=0.02",
        "train.warmup_epochs=0.0",
        "train.num_workers=0",
        "train.log_every=1",
        "train.device=cpu",
        "eval.max_images=16",
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


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


@pytest.fixture(scope="module")
def runs(data: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run SIGKILLed after its first checkpoint then resumed, and an uninterrupted run."""
    root = tmp_path_factory.mktemp("vqkd_runs")
    for epochs in EPOCHS_TRIED:
        split = root / f"split{epochs}"
        run_and_kill_after_checkpoint(
            command(data, split, epochs), split, root / f"killed{epochs}.log"
        )
        state = torch.load(split / "checkpoint.pth", weights_only=True)["train_state"]
        killed_at = state["epoch"]
        # The kill must land mid-run: the last epoch not saved, no tokenizer written yet.
        if killed_at < epochs and not (split / "tokenizer.pth").exists():
            break
    assert 1 <= killed_at < epochs, f"every run finished before its kill ({killed_at}/{epochs})"

    run_to_end(command(data, split, epochs, "train.resume=true"), root / "resumed.log")
    assert "resumed from" in (root / "resumed.log").read_text()
    full = root / "full"
    run_to_end(command(data, full, epochs), root / "full.log")
    return {"full": full, "split": split, "epochs": epochs}


def test_sigkill_then_resume_equals_uninterrupted_run(runs: dict) -> None:
    full, split, epochs = runs["full"], runs["split"], runs["epochs"]
    a = torch.load(full / "tokenizer.pth", weights_only=True)
    b = torch.load(split / "tokenizer.pth", weights_only=True)
    assert a["config"] == b["config"]
    assert_same_weights(a["model"], b["model"])
    a = torch.load(full / "checkpoint.pth", weights_only=True)
    b = torch.load(split / "checkpoint.pth", weights_only=True)
    assert_same_weights(a["model"], b["model"])
    assert a["train_state"]["epoch"] == b["train_state"]["epoch"] == epochs
    assert a["train_state"]["step"] == b["train_state"]["step"]
    assert torch.equal(a["train_state"]["unused_steps"], b["train_state"]["unused_steps"])

    # Every step and epoch line (losses, eval figures), values exact; lines of the epoch cut
    # short by the kill are gone. The bad-image count is checked on its own below.
    def comparable(out_dir: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "bad_images"} for r in records(out_dir)]

    assert comparable(full) == comparable(split)
    assert [r["epoch"] for r in records(split) if r["kind"] == "epoch"] == list(range(epochs))


def test_resumed_run_keeps_the_bad_image_count(runs: dict) -> None:
    full = [r["bad_images"] for r in records(runs["full"]) if r["kind"] == "epoch"]
    split = [r["bad_images"] for r in records(runs["split"]) if r["kind"] == "epoch"]
    assert split == full
