"""The run report: every section from a tiny synthetic run, graceful gaps, a real browser render."""

import json
import os
import shutil
from dataclasses import asdict
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import torch
from support.chromium import rendered_dom, screenshot, skip_without_chromium

from pipeline.demo_corpus import build_demo_corpus
from pipeline.report.command import write_report
from pretrain.model import BEiTConfig, BEiTv2
from shards.dataset import TokenDatasetDir
from shards.decode import decode_image
from shards.images import iter_shard, list_shards
from shards.views import AugConfig, sample_view
from shards.writer import TokenRow

SECTIONS = ("overview", "timings", "curves", "codebook", "token-maps", "mim", "linprobe", "files")


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.imgs = set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.imgs.append(attrs.get("src", ""))


def _parse(text):
    parser = _Collect()
    parser.feed(text)
    return parser


def _tiny_run(run: Path) -> None:
    """A run folder with every stage's outputs, made without running the stages."""
    images = run / "corpus"
    build_demo_corpus(images, n_images=8, size=40, classes=("stripes", "disks"))
    shard = list_shards(str(images), shard_size=8)[0]
    aug, seeds, grid, vocab = AugConfig(size=32), (0, 1), (4, 4), 16
    rng = np.random.default_rng(0)
    rows = []
    for rec in iter_shard(shard):
        im = decode_image(rec.data)
        views = [sample_view(aug, rec.key, s, im.width, im.height) for s in seeds]
        rows.append(
            TokenRow(
                rec.key,
                rec.label,
                views,
                rng.integers(0, vocab, (2, 16), dtype=np.uint16),
                rec.sha256,
            )
        )
    tok = {"fingerprint": "0" * 64, "codebook_size": vocab, "grid": list(grid), "image_size": 32}
    receipt = TokenDatasetDir(str(run / "tokenize")).write_shard(
        0, 1, shard.url, seeds, rows, [], tokenizer=tok
    )
    info = {
        "tokenizer": tok,
        "seeds": list(seeds),
        "images": {"source": str(images), "shard_size": 8},
    }
    TokenDatasetDir(str(run / "tokenize")).write_manifest([receipt], info)

    mcfg = BEiTConfig(
        image_size=32,
        patch_size=8,
        width=32,
        depth=1,
        heads=2,
        vocab_size=vocab,
        head_layers=1,
        head_from_layer=1,
    )
    (run / "pretrain").mkdir()
    torch.save(
        {"model": BEiTv2(mcfg).state_dict(), "config": {"model": asdict(mcfg)}},
        run / "pretrain" / "checkpoint.pth",
    )
    lines = [
        {"kind": "step", "epoch": 0, "step": i, "loss": 5 - i / 10, "mim_acc": i / 100}
        for i in range(5)
    ]
    (run / "pretrain" / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)))
    (run / "vqkd").mkdir()
    lines = [
        {"kind": "step", "epoch": 0, "step": i, "loss": 1 / (i + 1), "rec_cosine": i / 5}
        for i in range(5)
    ]
    lines.append({"kind": "epoch", "epoch": 0, "step": 4, "loss": 0.5, "eval_codebook_usage": 75.0})
    (run / "vqkd" / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)))
    torch.save({"model": {}}, run / "vqkd" / "tokenizer.pth")
    (run / "linprobe" / "pretrained").mkdir(parents=True)
    (run / "linprobe" / "pretrained" / "results.json").write_text(
        json.dumps({"top1": 50.0, "top5": 90.0, "backbone": "x.pth", "pool": "cls"})
    )
    (run / "summary.json").write_text(
        json.dumps(
            {
                "seconds": 12.0,
                "stages": {
                    "pack": {"seconds": 1.0, "status": "ok", "command": "pipeline run stage=pack"}
                },
            }
        )
    )


def test_every_section_from_a_tiny_run(tmp_path):
    torch.set_num_threads(1)
    run = tmp_path / "run"
    _tiny_run(run)
    page = write_report(run)
    text = page.read_text()
    parsed = _parse(text)
    assert set(SECTIONS) <= parsed.ids
    assert "Not available" not in text, text[text.find("Not available") - 200 :][:400]
    assert len(parsed.imgs) >= 5
    for src in parsed.imgs:
        assert (page.parent / src).is_file(), src


def test_a_single_stage_folder_is_recognised_by_its_files(tmp_path, capsys):
    run = tmp_path / "run"
    _tiny_run(run)
    pt = tmp_path / "pt"  # a pretrain run laid out by hand, under another name
    (run / "pretrain").rename(pt)
    page = write_report(pt)
    text = page.read_text()
    assert "Missing" not in text and "<h3>.</h3>" not in text
    assert (page.parent / "curves-pt.png").is_file()
    # epoch record wins; loss of the final epoch, not of the first step
    assert "epoch 1, mean of its 5 logged steps" in text
    # several folders: the pretrain finds its tokens in the other one
    both = write_report([pt, run / "tokenize"], out=tmp_path / "both")
    text = both.read_text()
    assert "MIM predictions" in text and "Not available" not in text


def test_cli_exit_codes(tmp_path, capsys):
    from pipeline.cli import main as cli

    assert cli(["report", str(tmp_path / "nope")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli(["report", str(tmp_path / "empty")]) == 2
    assert "nothing to report" in capsys.readouterr().err


@skip_without_chromium
def test_renders_in_headless_chromium(tmp_path):
    run = tmp_path / "run"
    _tiny_run(run)
    page = write_report(run)
    shot, profile = tmp_path / "shot.png", tmp_path / "profile"
    url = page.as_uri()
    screenshot(url, shot, profile, height=2000)
    assert shot.is_file() and shot.stat().st_size > 10_000
    keep = os.environ.get("REPORT_SCREENSHOT")  # a path: keep the screenshot to look at
    if keep:
        shutil.copy(shot, keep)
    dom = rendered_dom(url, profile, height=2000)
    parsed = _parse(dom)
    assert set(SECTIONS) <= parsed.ids
    assert all((page.parent / src).is_file() for src in parsed.imgs)
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
