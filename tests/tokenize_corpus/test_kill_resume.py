"""Stage 1 resume after a real SIGKILL of ``pipeline run stage=vqkd`` (not a simulated crash).

The run is started as a subprocess in its own process group, killed with SIGKILL once its first
checkpoint is on disk and the next epoch has begun, rerun with ``train.resume=true``, and its
tokenizer compared bit for bit with an uninterrupted run of the same config.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from support import cli_runs as cli

# An epoch of the tiny run takes a fraction of a second: if the kill still lands after the last
# checkpoint (a stalled poller on a loaded machine), the scenario is retried with a longer run.
EPOCHS_TRIED = (6, 24)
# Fields that measure wall time: they differ between any two runs.
TIMING = {"images_per_s", "seconds"}


pipeline_command, run_to_end = cli.pipeline_command, cli.run_to_end
run_and_kill_after_checkpoint = cli.run_and_kill_after_checkpoint


def records(out_dir: Path) -> list[dict]:
    return cli.records(out_dir, TIMING)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """16 small images in a flat folder (one bad file) and a tiny timm ViT teacher file, as the
    stage 1 training tests use."""
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
        "train.blr=0.02",
        "train.precision=fp32",
        "train.warmup_epochs=0.0",
        "train.num_workers=0",
        "train.log_every=1",
        "train.device=cpu",
        "eval.max_images=16",
        *extra,
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
