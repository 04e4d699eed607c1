"""Stage 3 resume after a real SIGKILL of ``pipeline run stage=pretrain`` (not a simulated crash).

The run is started as a subprocess in its own process group, killed with SIGKILL once its first
checkpoint is on disk and the next epoch has begun, rerun with ``train.resume=true``, and
compared bit for bit with an uninterrupted run of the same config.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import cli_runs as cli
from support import pretrain_data as helpers

# An epoch of the tiny run takes ~0.05 s: if the kill still lands after the last checkpoint (a
# stalled poller on a loaded machine), the whole scenario is retried with a longer run.
EPOCHS_TRIED = (12, 48)
# Fields that measure wall time: they differ between any two runs.
TIMING = {"seconds", "samples_per_s"}


pipeline_command, run_to_end = cli.pipeline_command, cli.run_to_end
run_and_kill_after_checkpoint = cli.run_and_kill_after_checkpoint


def records(out_dir: Path) -> list[dict]:
    return cli.records(out_dir, TIMING)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("kill_corpus")
    images = helpers.make_images(root / "images")
    tokenizer = helpers.make_tokenizer(root / "tokenizer.pth")
    tokens = helpers.make_tokens(images, tokenizer, root / "tokens")
    return {"images": str(images), "tokens": str(tokens)}


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
