"""``pipeline run stage=finetune`` end to end through the CLI: a subprocess on a tiny labelled
folder and a tiny pretrain checkpoint, and a mistyped key refused with exit code 2 before any
work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from pipeline.demo_corpus import build_demo_corpus
from pretrain.model import BEiTConfig, BEiTv2

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ("stripes", "checker", "disks", "gradient")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A 4-class ImageFolder of 32 small images and a tiny BEiT v2 pretrain checkpoint."""
    root = tmp_path_factory.mktemp("finetune_cli")
    build_demo_corpus(root / "images", n_images=32, size=40, classes=CLASSES)
    torch.manual_seed(0)
    model = BEiTv2(
        BEiTConfig(
            image_size=32,
            patch_size=8,
            width=32,
            depth=2,
            heads=2,
            vocab_size=16,
            head_layers=1,
            head_from_layer=1,
        )
    )
    checkpoint = root / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "config": {"model": asdict(model.cfg)}}, checkpoint)
    return {"images": str(root / "images"), "backbone": str(checkpoint)}


def pipeline(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the installed ``pipeline`` console script (else the module) with ``args``."""
    script = Path(sys.executable).with_name("pipeline")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "pipeline.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def finetune_args(inputs: dict[str, str], out: Path) -> list[str]:
    return [
        "run",
        "stage=finetune",
        f"backbone={inputs['backbone']}",
        f"images={inputs['images']}",
        f"out_dir={out}",
        "train.epochs=2",
        "train.batch_size=8",
        "train.blr=0.128",
        "train.warmup_epochs=1",
        "drop_path=0.1",
        "train.device=cpu",
        "train.num_workers=0",
    ]


def test_finetune_runs_through_the_cli(inputs: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "ft"
    done = pipeline(*finetune_args(inputs, out))
    assert done.returncode == 0, done.stderr[-3000:]

    # the summary JSON comes first; the CLI may print where things are and what to run next
    summary, _ = json.JSONDecoder().raw_decode(done.stdout, done.stdout.index("{"))
    assert summary["num_classes"] == len(CLASSES) and summary["epochs"] == 2
    assert summary["num_train"] + summary["num_val"] == 32 and summary["num_val"] > 0
    assert summary["backbone"] == inputs["backbone"]

    config = (out / "config.yaml").read_text()
    assert "  epochs: 2" in config and inputs["backbone"] in config
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["epoch"] for r in lines] == [0, 1]
    for record in lines:
        assert 0 <= record["top1"] <= 100 and "top5" not in record, record  # 4 classes
        assert record["loss"] > 0 and record["step"] > 0
    assert lines[-1]["top1"] == pytest.approx(summary["top1"], abs=0.01)
    assert (out / "finetuned.pth").is_file() and (out / "results.json").is_file()
    weights = torch.load(out / "finetuned.pth", weights_only=True)
    assert weights["head.weight"].shape[0] == len(CLASSES)


@pytest.mark.parametrize(
    ("typo", "named"),
    [
        ("train.epoch=1", ["'train.epoch'", "Did you mean 'train.epochs'"]),
        ("epochs=1", ["'epochs'"]),  # the shared keys live in the train section
    ],
)
def test_mistyped_key_exits_2_before_any_work(
    inputs: dict[str, str], tmp_path: Path, typo: str, named: list[str]
) -> None:
    out = tmp_path / "ft"
    done = pipeline(*finetune_args(inputs, out), typo, timeout=60)
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "unknown config key" in done.stderr
    for text in named:
        assert text in done.stderr, done.stderr
    assert not out.exists()  # refused before the run wrote anything (not even config.yaml)
    assert done.stdout.strip() == ""
