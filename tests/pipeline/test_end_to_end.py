"""Every stage through the CLI, as a user runs them, on a tiny corpus with tiny settings: one by
one, then all at once with ``pipeline run stage=all`` (the README's main command) and its report
rendered in headless Chromium."""

import json
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from PIL import Image
from support.chromium import rendered_dom, screenshot, skip_without_chromium

from pipeline.cli import main as cli
from pipeline.demo_corpus import build_demo_corpus
from pretrain.model import BEiTConfig, BEiTv2
from shards import schema
from tokenize_corpus.tokenizer import load_tokenizer

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


# `pipeline run stage=all`, the README's main command, at its smallest: the demo corpus at 32
# images of 40 px (16 classes, 2 shards), the tiny tokenizer and student above, 1 epoch each, two
# view seeds, one Dask worker; the linear probes keep the demo preset (300 steps on cached
# features, well under a second). About 20 s on 2 cores.
STAGE_ALL_TINY = [
    "run", "stage=all", "preset=demo", "corpus_images=32", "corpus_size=40", "shard_size=16",
    "seeds=[0,1]", "n_workers=1", f"vqkd=[{','.join(VQKD_TINY)}]",
    f"pretrain=[{','.join(PRETRAIN_TINY)}]",
]  # fmt: skip
STAGES_RUN = (
    "corpus", "pack", "vqkd", "tokenize", "validate", "pretrain", "linprobe-pretrained",
    "linprobe-random", "linprobe-teacher", "report",
)  # fmt: skip
SECTIONS = {  # the report's sections for a stage=all run, in page order: id -> title
    "overview": "What is here",
    "timings": "Timings",
    "curves": "Training curves",
    "codebook": "Codebook usage",
    "token-maps": "Views and token maps",
    "mim": "MIM predictions",
    "linprobe": "Linear probe",
    "files": "Where the files are",
}
SECTION_TITLE = r'<section id="([^"]+)"><h2>([^<]+)</h2>'


@dataclass(frozen=True)
class StageAll:
    run: Path  # the run root, as stage=all resolved it
    summary: dict  # the JSON summary it printed
    closing: list[str]  # the lines printed after it (wrote:/next:)


@pytest.fixture(scope="module")
def stage_all(tmp_path_factory) -> StageAll:
    """One ``pipeline run stage=all`` with tiny settings, shared by the tests below."""
    cwd = tmp_path_factory.mktemp("stage_all")
    run = (cwd / "demo").resolve()
    proc = _pipeline(*STAGE_ALL_TINY, f"out_dir={run}", cwd=cwd)
    summary, end = json.JSONDecoder().raw_decode(proc.stdout, proc.stdout.index("{"))
    return StageAll(run, summary, proc.stdout[end:].strip().splitlines())


def test_stage_all_runs_every_stage_and_says_what_it_wrote(stage_all):
    run, summary = stage_all.run, stage_all.summary
    assert summary["exit_code"] == 0, summary
    assert list(summary["stages"].items()) == [(s, "ok") for s in STAGES_RUN]
    saved = json.loads((run / "summary.json").read_text())
    assert list(saved["stages"]) == list(STAGES_RUN)
    for name, command in summary["commands"].items():
        stage = name.split("-")[0]
        if stage in ("pack", "vqkd", "tokenize", "pretrain", "linprobe"):
            assert command.startswith(f"pipeline run stage={stage} "), (name, command)
    page = run / "report" / "index.html"
    assert summary["report"] == str(page)
    assert stage_all.closing[0] == "wrote:"
    assert f"  {run}/config.yaml" in stage_all.closing
    assert f"  {run}/summary.json" in stage_all.closing
    assert stage_all.closing[-2:] == ["next:", f"  open {page}"]


def test_stage_all_outputs_are_valid(stage_all, tmp_path, capsys):
    run, summary = stage_all.run, stage_all.summary
    assert len(list((run / "pack").glob("shard-*.tar"))) == 2

    tokenizer = load_tokenizer(str(run / "vqkd" / "tokenizer.pth"))
    assert (tokenizer.image_size, tokenizer.patch_size) == (32, 8)
    assert tokenizer.describe()["codebook_size"] == 16
    for stage in ("vqkd", "pretrain"):
        lines = (run / stage / "metrics.jsonl").read_text().splitlines()
        losses = [json.loads(line)["loss"] for line in lines]
        assert losses and all(math.isfinite(x) for x in losses), stage

    # the token dataset: bound to this tokenizer, every image at both seeds, codes in the codebook
    manifest = json.loads((run / "tokenize" / "manifest.json").read_text())
    assert manifest["seeds"] == [0, 1]
    assert manifest["fingerprint"] == tokenizer.describe()["fingerprint"]
    table = ds.dataset(run / "tokenize" / "parquet", partitioning="hive").to_table()
    assert table.num_rows == 64 and len(set(table[schema.KEY].to_pylist())) == 32
    assert sorted(set(table[schema.SEED].to_pylist())) == [0, 1]
    codes = np.array(table[schema.TOKENS].to_pylist())
    assert codes.shape == (64, 16) and codes.max() < 16
    # the validate command the summary prints passes
    validate = shlex.split(summary["commands"]["validate"])
    assert validate[:2] == ["pipeline", "validate"]
    assert cli(validate[1:]) == 0, capsys.readouterr()

    # the pretrain checkpoint exports to a timm model with the same features
    checkpoint = torch.load(run / "pretrain" / "checkpoint.pth", weights_only=True)
    model = BEiTv2(BEiTConfig(**checkpoint["config"]["model"])).eval()
    model.load_state_dict(checkpoint["model"])
    assert model.cfg.vocab_size == 16
    backbone = tmp_path / "backbone.safetensors"
    assert cli(["export", str(run / "pretrain" / "checkpoint.pth"), f"out={backbone}"]) == 0
    sidecar = json.loads(backbone.with_name(backbone.name + ".json").read_text())
    loaded: dict = {}
    exec(sidecar["command"], loaded)  # the Python the export prints: builds `model` with timm
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.forward_features(x)  # [B, 1+N, D]
        theirs = loaded["model"].eval().forward_features(x)
    assert ours.shape == theirs.shape == (2, 17, 32)
    assert (ours - theirs).abs().max().item() <= 1e-5

    # the probes: the pretrained backbone and both baselines, on all 16 classes
    assert set(summary["linprobe"]) == {"pretrained", "random", "teacher"}
    backbones = {
        "pretrained": str(run / "pretrain" / "backbone_timm.pth"),
        "random": "random",
        "teacher": "teacher:efficientnet_lite0",
    }
    for name, backbone_name in backbones.items():
        results = json.loads((run / "linprobe" / name / "results.json").read_text())
        assert results["backbone"] == backbone_name
        assert 0 <= results["top1"] <= results["top5"] <= 100, (name, results)
        assert results["top1"] == summary["linprobe"][name]["top1"]
        assert results["num_classes"] == 16
        assert results["num_train"] + results["num_val"] == 32


def _section(page: str, sid: str) -> str:
    start = page.index(f'<section id="{sid}">')
    return page[start : page.index("</section>", start)]


def test_stage_all_report_has_every_section(stage_all):
    page = stage_all.run / "report" / "index.html"
    text = page.read_text()
    assert re.findall(SECTION_TITLE, text) == list(SECTIONS.items())
    assert "Not available" not in text and "Missing" not in text
    images = re.findall(r'<img src="([^"]+)"', text)
    assert len(images) >= 5 and all((page.parent / src).is_file() for src in images)
    for stage in STAGES_RUN:
        assert f"<td>{stage}</td>" in _section(text, "timings"), stage
    for name, result in stage_all.summary["linprobe"].items():
        assert f"<td>{result['top1']:.2f}</td>" in _section(text, "linprobe"), name


@skip_without_chromium
def test_stage_all_report_renders_in_headless_chromium(stage_all, tmp_path):
    url = (stage_all.run / "report" / "index.html").as_uri()
    shot, profile = tmp_path / "shot.png", tmp_path / "profile"
    screenshot(url, shot, profile, height=2600)
    with Image.open(shot) as im:
        assert im.size == (1200, 2600)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
    # text, tables and figures on a white page: many colours, not a blank or single-colour page
    assert colours is None or len(colours) > 16, colours
    dom = rendered_dom(url, profile, height=2600)
    assert re.findall(SECTION_TITLE, dom) == list(SECTIONS.items())
