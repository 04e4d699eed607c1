"""Linear probe: every backbone kind, the feature cache, the key-hash split, the same features for a
checkpoint and its timm export."""

import json

import pytest
import torch

from engine.config import build_config
from pipeline.demo_corpus import build_demo_corpus
from pretrain import linprobe as lp
from pretrain.evaluation import key_in_val
from pretrain.export import export_backbone
from pretrain.model import BEiTConfig, BEiTv2

TINY = dict(image_size=32, patch_size=8, width=32, depth=1, heads=2, vocab_size=16)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    classes = ("stripes", "checker", "disks", "gradient")
    build_demo_corpus(root, n_images=48, size=40, seed=0, classes=classes)
    return str(root)


def _cfg(tmp_path, **overrides):
    base = {
        "out_dir": str(tmp_path / "probe"),
        "feature_batch_size": 16,
        "random_init": {
            "size": "tiny",
            "image_size": 32,
            "patch_size": 8,
            "depth": 1,
            "width": 32,
            "heads": 2,
        },
        "train": {"steps": 60, "batch_size": 32, "blr": 1.6},  # lr 0.05
    }
    return build_config(lp.LinprobeConfig, base, overrides)


def test_random_backbone_probe_and_cache(tmp_path, corpus, monkeypatch):
    torch.set_num_threads(1)
    res = lp.linprobe(_cfg(tmp_path, images=corpus))
    assert res["num_classes"] == 4 and res["num_train"] + res["num_val"] == 48
    assert res["pool"] == "mean"  # no CLS head trained
    assert 0 <= res["top1"] <= 100 and res["top5"] is None  # 4 classes: no honest top-5
    saved = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert saved["top1"] == res["top1"]
    assert (tmp_path / "probe" / "config.yaml").exists()

    # A rerun reads the cached features: the backbone is not run again, results are identical.
    def boom(*a, **k):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(lp, "extract_features", boom)
    again = lp.linprobe(_cfg(tmp_path, images=corpus))
    assert again["top1"] == res["top1"] and again["features"] == res["features"]


def test_split_is_by_key_hash():
    keys = [f"class/img_{i}" for i in range(2000)]
    val = [k for k in keys if key_in_val(k, 0.2)]
    assert 300 < len(val) < 500
    assert val == [k for k in reversed(keys) if key_in_val(k, 0.2)][::-1]


def test_checkpoint_and_timm_export_give_same_features(tmp_path, corpus):
    torch.manual_seed(0)
    model = BEiTv2(BEiTConfig(**TINY, head_layers=1, head_from_layer=1))
    ckpt = tmp_path / "checkpoint.pth"
    torch.save(
        {
            "model": model.state_dict(),
            "config": {"model": {**TINY, "head_layers": 1, "head_from_layer": 1}},
        },
        ckpt,
    )
    exported = tmp_path / "backbone.safetensors"
    export_backbone(ckpt, exported)

    ours = lp.load_backbone(_cfg(tmp_path, backbone=str(ckpt)))
    timm_bb = lp.load_backbone(_cfg(tmp_path, backbone=str(exported)))
    assert ours.cls_head_trained and timm_bb.cls_head_trained  # sidecar carries it
    views = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (ours.tokens(views) - timm_bb.tokens(views)).abs().max().item()
    assert diff <= 1e-5

    res = lp.linprobe(_cfg(tmp_path, backbone=str(exported), images=corpus, images_val=corpus))
    assert res["pool"] == "cls" and res["num_train"] == res["num_val"] == 48


def test_errors_say_what_to_do(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="backbone=random"):
        lp.linprobe(_cfg(tmp_path, backbone=str(tmp_path / "nope.pth"), images=corpus))
    with pytest.raises(ValueError, match="images="):
        lp.linprobe(_cfg(tmp_path))
