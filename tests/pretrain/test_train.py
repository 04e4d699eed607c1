"""Stage 3 training loop: outputs, learning, exact resume, DDP on CPU, online targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

# The tiny corpus builders live beside the data tests (loaded by path, not collected twice).
from support import pretrain_data as helpers

from engine.config import build_config
from engine.errors import NonFiniteLoss
from engine.optim import param_groups
from engine.precision import resolve_precision
from engine.schedule import lr_at
from pretrain import train as train_module
from pretrain.config import PretrainConfig
from pretrain.model import BEiTConfig, BEiTv2
from pretrain.train import pretrain

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # The suite shares 2 cores with other test runs; tiny models are fastest single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("train_corpus")
    images = helpers.make_images(root / "images")
    tokenizer = helpers.make_tokenizer(root / "tokenizer.pth")
    tokens = helpers.make_tokens(images, tokenizer, root / "tokens")
    return {"images": str(images), "tokenizer": tokenizer, "tokens": str(tokens)}


def tiny_overrides(corpus: dict, out: Path, **train: object) -> dict:
    return {
        "images": corpus["images"],
        "tokens": corpus["tokens"],
        "out_dir": str(out),
        "model": {"size": "tiny", "width": 32, "depth": 2, "heads": 2},
        "mask": {"min_patches": 4},
        "train": {
            "batch_size": 4,
            "epochs": 3,
            "blr": 0.5,  # lr = 0.5 * 4 / 2048 ~ 1e-3
            "warmup_epochs": 1,
            "num_workers": 0,
            "shuffle_buffer": 4,
            "log_every": 1,
            "device": "cpu",
            **train,
        },
    }


def tiny(corpus: dict, out: Path, **train: object) -> PretrainConfig:
    return build_config(PretrainConfig, tiny_overrides(corpus, out, **train))


def epochs_of(metrics: Path) -> list[dict]:
    lines = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    return [r for r in lines if r["kind"] == "epoch"]


def test_lr_is_linearly_scaled_and_scheduled() -> None:
    cfg = build_config(PretrainConfig, {"train": {"batch_size": 256, "blr": 1.5e-3}})
    assert cfg.lr == pytest.approx(1.5e-3 * 256 / 2048)
    assert cfg.train.REFERENCE_BATCH == 2048
    assert lr_at(0, 100, 10, 1.0, 0.01) == 0.0
    assert lr_at(9, 100, 10, 1.0, 0.01) == pytest.approx(1.0)  # the peak at step W - 1
    assert lr_at(100, 100, 10, 1.0, 0.01) == pytest.approx(0.01)


def test_no_weight_decay_on_biases_norms_and_cls_token() -> None:
    model = BEiTv2(
        BEiTConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2, vocab_size=16)
    )
    groups = param_groups(model, 0.05)
    no_decay, decay = sorted(groups, key=lambda g: g["weight_decay"])
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "norm.weight", "norm.bias", "blocks.0.gamma_1"} <= skipped
    assert "blocks.0.attn.qkv.weight" not in skipped and "mask_token" not in skipped
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05


def test_tiny_run_writes_every_output(corpus: dict, tmp_path: Path) -> None:
    summary = pretrain(tiny(corpus, tmp_path / "run", epochs=2))
    for key in ("checkpoint", "backbone", "metrics", "plot"):
        assert Path(summary[key]).is_file(), key
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert 0.0 <= summary["mim_acc"] <= 1.0 and 0.0 <= summary["head_acc"] <= 1.0
    epochs = epochs_of(Path(summary["metrics"]))
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert all(e["skipped_images"] <= 1 for e in epochs)
    ckpt = torch.load(summary["checkpoint"], weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["config"]["model"]["vocab_size"] == 16
    assert ckpt["config"]["pretrain"]["train"]["batch_size"] == 4
    # no generator state: everything random is seeded by (run seed, epoch), resume included
    assert set(ckpt) == {"model", "config", "optimizer", "epoch", "step"}
    backbone = torch.load(summary["backbone"], weights_only=True)
    assert "blocks.0.attn.relative_position_bias_table" in backbone
    assert not any(k.startswith(("lm_head", "mask_token", "cls_pt_layers")) for k in backbone)


def test_mim_loss_decreases(corpus: dict, tmp_path: Path) -> None:
    summary = pretrain(tiny(corpus, tmp_path / "run", epochs=8, blr=2.0))
    losses = [e["loss"] for e in epochs_of(Path(summary["metrics"]))]
    assert losses[-1] < losses[0] - 0.2, losses


def test_resume_after_a_crash_is_exact(
    corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = pretrain(tiny(corpus, tmp_path / "full", epochs=4))

    real_save = train_module._save_checkpoint
    saves = []

    def save_then_die(path: Path, payload: dict) -> None:
        real_save(path, payload)
        saves.append(payload["epoch"])
        if len(saves) == 2:
            raise KeyboardInterrupt("simulated kill after the epoch-2 checkpoint")

    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny(corpus, tmp_path / "crash", epochs=4))
    monkeypatch.setattr(train_module, "_save_checkpoint", real_save)
    resumed = pretrain(tiny(corpus, tmp_path / "crash", epochs=4, resume=True))

    a = torch.load(full["checkpoint"], weights_only=True)
    b = torch.load(resumed["checkpoint"], weights_only=True)
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert [e["loss"] for e in epochs_of(Path(full["metrics"]))] == [
        e["loss"] for e in epochs_of(Path(resumed["metrics"]))
    ]


def test_online_targets_train_exactly_like_offline(corpus: dict, tmp_path: Path) -> None:
    offline = pretrain(tiny(corpus, tmp_path / "offline", epochs=1))
    cfg = build_config(
        PretrainConfig,
        tiny_overrides(corpus, tmp_path / "online", epochs=1),
        {"targets": "online", "tokenizer": corpus["tokenizer"]},
    )
    online = pretrain(cfg)
    # Same views, masks and (per the contract) the same tokens: the same training, bit for bit.
    a = torch.load(offline["checkpoint"], weights_only=True)["model"]
    b = torch.load(online["checkpoint"], weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_online_needs_a_tokenizer(corpus: dict, tmp_path: Path) -> None:
    cfg = build_config(
        PretrainConfig, tiny_overrides(corpus, tmp_path / "x"), {"targets": "online"}
    )
    with pytest.raises(ValueError, match="tokenizer="):
        pretrain(cfg)


def _cli_args(overrides: dict, prefix: str = "") -> list[str]:
    args = []
    for key, value in overrides.items():
        if isinstance(value, dict):
            args += _cli_args(value, f"{prefix}{key}.")
        else:
            args.append(f"{prefix}{key}={value}")
    return args


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_identical_weights(corpus: dict, tmp_path: Path) -> None:
    overrides = tiny_overrides(corpus, tmp_path / "ddp", epochs=2, num_workers=1)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "pipeline.cli",
        "run",
        "stage=pretrain",
        *_cli_args(overrides),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"ranks_identical": true' in result.stdout
    assert (tmp_path / "ddp" / "backbone_timm.pth").is_file()


def test_precision_is_resolved_and_recorded(corpus: dict, tmp_path: Path) -> None:
    """fp32 and the default (auto) both train with fp32 weights; config.yaml says which ran."""
    auto = pretrain(tiny(corpus, tmp_path / "auto", epochs=1))
    exact = pretrain(tiny(corpus, tmp_path / "fp32", epochs=1, precision="fp32"))
    expected = resolve_precision("auto", "cpu")
    assert auto["precision"] == expected and exact["precision"] == "fp32"
    for run, want in (("auto", expected), ("fp32", "fp32")):
        saved = yaml.safe_load((tmp_path / run / "config.yaml").read_text())
        assert saved["train"]["precision"] == want
        state = torch.load(tmp_path / run / "checkpoint.pth", weights_only=True)["model"]
        assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
    assert 0.0 <= auto["mim_acc"] <= 1.0 and 0.0 <= exact["mim_acc"] <= 1.0


def test_non_finite_loss_stops_naming_the_step(corpus: dict, tmp_path: Path) -> None:
    # a rate near float32's largest ruins the weights in the first update: the second loss is NaN
    with pytest.raises(NonFiniteLoss, match=r"nan at step 2 \(epoch 0\)"):
        pretrain(tiny(corpus, tmp_path / "nan", epochs=1, blr=1e38, warmup_epochs=0))
