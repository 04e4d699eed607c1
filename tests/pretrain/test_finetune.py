"""Fine-tuning: layer-wise lr decay, the shared table copied into every block, accuracy per epoch."""

import json
import shutil
from dataclasses import asdict

import pytest
import torch
from timm.optim import create_optimizer_v2

from engine.config import build_config
from pipeline.demo_corpus import build_demo_corpus
from pretrain import finetune as ft
from pretrain.eval_config import FinetuneConfig
from pretrain.model import BEiTConfig, BEiTv2

TINY = dict(image_size=32, patch_size=8, width=32, depth=2, heads=2, vocab_size=16)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    build_demo_corpus(
        root, n_images=32, size=40, classes=("stripes", "checker", "disks", "gradient")
    )
    return str(root)


def _cfg(tmp_path, **overrides):
    base = {
        "out_dir": str(tmp_path / "ft"),
        "drop_path": 0.1,
        "train": {"epochs": 2, "batch_size": 8, "blr": 0.128, "warmup_epochs": 1},
    }
    return build_config(FinetuneConfig, base, overrides)


def test_finetune_from_pretrain_checkpoint(tmp_path, corpus):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = BEiTv2(BEiTConfig(**TINY, head_layers=1, head_from_layer=1))
    with torch.no_grad():
        model.rel_pos_bias.relative_position_bias_table.normal_()
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "config": {"model": asdict(model.cfg)}}, ckpt)
    cfg = _cfg(tmp_path, backbone=str(ckpt), images=corpus)

    # the shared table is copied into every block of the fine-tuning model
    net = ft.build_model(ft.finetune_state(cfg), num_classes=4, drop_path=0.0)
    shared = model.rel_pos_bias.relative_position_bias_table
    for blk in net.blocks:
        assert torch.equal(blk.attn.relative_position_bias_table, shared)
    assert net.head.weight.abs().max() < 1e-3  # head init x0.001

    res = ft.finetune(cfg)
    lines = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1]
    assert all(0 <= r["top1"] <= 100 for r in lines)
    assert not any("top5" in r for r in lines)  # 4 classes: top-5 would be 100% by construction
    assert res["num_classes"] == 4 and (tmp_path / "ft" / "finetuned.pth").is_file()


def test_layer_decay_groups(tmp_path):
    cfg = _cfg(
        tmp_path,
        random_init={
            "size": "tiny",
            "image_size": 32,
            "patch_size": 8,
            "width": 32,
            "depth": 2,
            "heads": 2,
        },
    )
    net = ft.build_model(ft.finetune_state(cfg), num_classes=3, drop_path=0.0)
    opt = create_optimizer_v2(net, opt="adamw", lr=1.0, weight_decay=0.05, layer_decay=0.65)
    scales = sorted({round(g["lr_scale"], 6) for g in opt.param_groups})
    # depth 2: embeddings 0.65^3, block 0 0.65^2, block 1 0.65, head 1
    assert scales == [round(0.65**k, 6) for k in (3, 2, 1, 0)]


def test_images_that_do_not_decode_are_skipped_not_fatal(tmp_path, corpus):
    images = tmp_path / "images"
    shutil.copytree(corpus, images)
    first = sorted(p for p in images.rglob("*") if p.is_file())[0]
    first.write_bytes(b"not an image")
    records = ft.labelled_records(str(images), shard_size=8)
    assert len(records) == 31 and first.stem not in {
        key.rsplit("/", 1)[-1] for key, _, _ in records
    }
