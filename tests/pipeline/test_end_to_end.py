"""Every stage through the CLI, as a user runs them, on a tiny corpus with tiny settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.demo_corpus import build_demo_corpus

CLASSES = ("stripes", "checker", "disks", "gradient")
# a tokenizer and a student small enough for seconds per stage on 2 cores (4x4 patch grid)
VQKD_TINY = [
    "model.image_size=32", "model.patch_size=8", "model.width=32", "model.depth=1",
    "model.heads=2", "model.decoder_depth=1", "model.codebook_size=16", "model.kmeans_iters=2",
    "train.epochs=1", "train.batch_size=16", "train.num_workers=0", "eval.max_images=16",
]  # fmt: skip
PRETRAIN_TINY = [
    "model.image_size=32", "model.patch_size=8", "model.width=32", "model.depth=1",
    "model.heads=2", "model.head_from_layer=1", "model.head_layers=1", "mask.num_masked=6",
    "mask.min_patches=2", "train.epochs=1", "train.batch_size=8", "train.num_workers=0",
]  # fmt: skip


def _pipeline(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"pipeline {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_every_stage_through_the_cli(tmp_path):
    run = tmp_path / "run"
    build_demo_corpus(tmp_path / "corpus", n_images=32, size=40, classes=CLASSES)
    shards = f"{run}/pack/shard-*.tar"
    _pipeline("run", "stage=pack", f"images={tmp_path / 'corpus'}", f"out_dir={run / 'pack'}",
              "shard_size=16", cwd=tmp_path)  # fmt: skip
    assert len(list((run / "pack").glob("shard-*.tar"))) == 2

    _pipeline("run", "stage=vqkd", "preset=demo", f"images={shards}", f"out_dir={run / 'vqkd'}",
              *VQKD_TINY, cwd=tmp_path)  # fmt: skip
    tokenizer = run / "vqkd" / "tokenizer.pth"
    assert tokenizer.is_file() and (run / "vqkd" / "metrics.jsonl").is_file()

    _pipeline("run", "stage=tokenize", "preset=demo", f"images={shards}",
              f"tokenizer={tokenizer}", f"out_dir={run / 'tokenize'}", "seeds=[0,1]",
              "aug.size=32", "batch_size=16", "cluster.n_workers=1", cwd=tmp_path)  # fmt: skip
    manifest = json.loads((run / "tokenize" / "manifest.json").read_text())
    assert manifest["seeds"] == [0, 1]
    _pipeline("validate", str(run / "tokenize"), f"images={shards}", cwd=tmp_path)

    _pipeline("run", "stage=pretrain", "preset=demo", f"images={shards}",
              f"tokens={run / 'tokenize'}", f"out_dir={run / 'pretrain'}", *PRETRAIN_TINY,
              cwd=tmp_path)  # fmt: skip
    checkpoint = run / "pretrain" / "checkpoint.pth"
    assert checkpoint.is_file()

    backbone = run / "export" / "backbone.safetensors"
    _pipeline("export", str(checkpoint), f"out={backbone}", cwd=tmp_path)
    assert backbone.is_file()

    _pipeline("run", "stage=linprobe", f"backbone={backbone}", f"images={shards}",
              f"out_dir={run / 'linprobe'}", "train.steps=50", cwd=tmp_path)  # fmt: skip
    results = json.loads((run / "linprobe" / "results.json").read_text())
    assert results["num_classes"] == 4 and results["pool"] == "cls"

    proc = _pipeline("report", str(run), cwd=tmp_path)
    page = run / "report" / "index.html"
    assert str(page) in proc.stdout
    text = page.read_text()
    for section in ("curves", "codebook", "token-maps", "mim", "linprobe"):
        start = text.index(f'id="{section}"')
        assert "Not available" not in text[start : text.index("</section>", start)], section


@pytest.mark.slow
def test_stage_all_with_tiny_overrides(tmp_path):
    run = tmp_path / "all"
    proc = _pipeline(
        "run", "stage=all", "preset=demo", f"out_dir={run}", "corpus_images=32",
        "corpus_size=40", "shard_size=16", "seeds=[0,1]", "n_workers=1", "probe_teacher=false",
        f"vqkd=[{','.join(VQKD_TINY)}]", f"pretrain=[{','.join(PRETRAIN_TINY)}]",
        "linprobe=[train.steps=50]", cwd=tmp_path,
    )  # fmt: skip
    # the JSON summary, then the closing wrote:/next: lines
    summary, _ = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{") :])
    assert summary["exit_code"] == 0, summary
    assert Path(summary["report"]).is_file()
    assert set(summary["linprobe"]) == {"pretrained", "random"}
    assert "pipeline run stage=pretrain" in summary["commands"]["pretrain"]
