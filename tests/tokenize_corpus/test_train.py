"""Stage 1 training loop: outputs, learning, exact resume, DDP codebook sync, config presets."""

import json
import os
import socket
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import build_config
from engine.errors import UserError
from tokenize_corpus.config import VQKDConfig
from tokenize_corpus.train import fit, vqkd
from tokenize_corpus.vqkd import VQKD_SIZES


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """16 small images in a flat folder (one bad file) and a tiny timm ViT teacher file."""
    import timm

    root = tmp_path_factory.mktemp("vqkd")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        # smooth random images: a low-resolution pattern upsampled, so crops differ meaningfully
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


def tiny_config(data: dict[str, str], out_dir: Path, **train) -> VQKDConfig:
    layer = {
        "images": data["images"],
        "out_dir": str(out_dir),
        "model": {
            "size": "tiny",
            "image_size": 32,
            "patch_size": 8,
            "width": 32,
            "depth": 1,
            "heads": 2,
            "decoder_depth": 1,
            "code_dim": 8,
            "codebook_size": 16,
            "kmeans_iters": 2,
            "dead_code_steps": 2,
        },
        "teacher": {"name": "timm:vit_tiny_patch16_224", "weights": data["teacher"]},
        "train": {
            "batch_size": 8,
            "epochs": 2,
            "blr": 0.02,
            "precision": "fp32",
            "warmup_epochs": 0.0,
            "num_workers": 0,
            "log_every": 1,
            "device": "cpu",
            **train,
        },
        "eval": {"max_images": 16},
    }
    return build_config(VQKDConfig, layer)


def test_run_writes_outputs_and_learns(data, tmp_path: Path) -> None:
    from tokenize_corpus.tokenizer import load_tokenizer

    summary = vqkd(tiny_config(data, tmp_path / "run", epochs=4))
    for key in ("checkpoint", "tokenizer", "metrics", "plot", "config"):
        assert Path(summary[key]).is_file(), key
    assert 0 < summary["codebook_usage_fraction"] <= 1 and -1 <= summary["rec_cosine"] <= 1
    records = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(steps) == 8 and len(epochs) == 4  # 16 good images / batch 8 = 2 steps per epoch
    assert {"loss", "rec_cosine", "commit_loss", "lr"} <= set(steps[0])
    assert 0 < epochs[-1]["eval_codebook_usage_fraction"] <= 1 and "eval_perplexity" in epochs[-1]
    assert epochs[-1]["bad_images"] >= 1  # broken.jpg was skipped and counted
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    tokenizer = load_tokenizer(summary["tokenizer"])
    assert tokenizer.codebook_size == 16 and tokenizer.grid == (4, 4)
    assert tokenizer.describe()["teacher"] == "timm:vit_tiny_patch16_224"
    assert tokenizer.encode(torch.rand(2, 3, 32, 32)).shape == (2, 16)


class Interrupted(Exception):
    pass


def test_resume_reproduces_uninterrupted_run(data, tmp_path: Path, monkeypatch) -> None:
    import tokenize_corpus.train as train

    _, full = fit(tiny_config(data, tmp_path / "full", epochs=2))
    save = train._save_checkpoint

    def save_then_crash(*args, **kwargs):
        save(*args, **kwargs)
        raise Interrupted  # the process dies right after the first epoch's checkpoint

    monkeypatch.setattr(train, "_save_checkpoint", save_then_crash)
    with pytest.raises(Interrupted):
        fit(tiny_config(data, tmp_path / "split", epochs=2))
    monkeypatch.setattr(train, "_save_checkpoint", save)
    _, resumed = fit(tiny_config(data, tmp_path / "split", epochs=2, resume=True))
    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    assert full_state.keys() == resumed_state.keys()
    for key, value in full_state.items():
        assert torch.equal(value, resumed_state[key]), key
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if '"epoch"' in x and '"kind": "epoch"' in x] == [
        2,
        4,
    ]


DDP_SCRIPT = """
import os
import sys
from pathlib import Path

import torch
import yaml

from engine.config import from_dict
from tokenize_corpus.config import VQKDConfig
from tokenize_corpus.train import fit

cfg = from_dict(VQKDConfig, yaml.safe_load(Path(sys.argv[1]).read_text()))
_, model = fit(cfg)
rank = int(os.environ["RANK"])
state = {
    "codebook": model.quantize.codebook.clone(),
    "encoder": model.encoder.patch_embed.proj.weight.detach().clone(),
}
torch.save(state, Path(sys.argv[2]) / f"rank{rank}.pt")
"""


def test_ddp_codebooks_identical_across_ranks(data, tmp_path: Path) -> None:
    from engine.config import save_config

    cfg = tiny_config(data, tmp_path / "ddp", epochs=1)
    save_config(cfg, tmp_path / "cfg.yaml")
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        str(script),
        str(tmp_path / "cfg.yaml"),
        str(tmp_path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["codebook"].abs().sum() > 0  # k-means ran
    assert torch.equal(r0["codebook"], r1["codebook"])  # EMA + k-means statistics all-reduced
    assert torch.equal(r0["encoder"], r1["encoder"])  # DDP gradients averaged
    assert (tmp_path / "ddp" / "tokenizer.pth").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_config_presets_and_lr() -> None:
    assert set(typing.get_args(typing.get_type_hints(type(VQKDConfig().model))["size"])) == set(
        VQKD_SIZES
    )
    base = build_config(VQKDConfig, VQKDConfig.presets["base"])
    assert base.lr == pytest.approx(2e-4)  # 5e-5 * 512 / 128 (docs/method.md §1)
    assert base.model.codebook_size == 8192 and base.teacher.name == "clip:ViT-B-16/openai"
    demo = build_config(VQKDConfig, VQKDConfig.presets["demo"], {"train": {"batch_size": 32}})
    assert demo.teacher.name == "efficientnet_lite0" and demo.model.dead_code_steps > 0
    assert demo.lr == pytest.approx(demo.train.blr * 32 / 128)
    with pytest.raises(UserError, match="images is empty"):
        vqkd(VQKDConfig())


def test_bf16_run_records_its_precision_and_tensorboard(data, tmp_path: Path) -> None:
    """train.precision=bf16 trains under autocast (fp32 weights) and config.yaml says bf16."""
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary, model = fit(tiny_config(data, tmp_path / "bf16", epochs=1, precision="bf16"))
    saved = yaml.safe_load((tmp_path / "bf16" / "config.yaml").read_text())
    assert saved["train"]["precision"] == summary["precision"] == "bf16"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert summary["rec_cosine"] is not None and -1 <= summary["rec_cosine"] <= 1
    events = EventAccumulator(str(tmp_path / "bf16" / "tensorboard"))
    events.Reload()
    assert (
        len(events.Scalars("step/loss")) == 2
        and "epoch/eval_perplexity" in events.Tags()["scalars"]
    )


def test_non_finite_loss_stops_with_the_step(data, tmp_path: Path, monkeypatch) -> None:
    import tokenize_corpus.train as train
    from engine.errors import NonFiniteLoss

    load = train.load_teacher

    def nan_teacher(*args, **kwargs):
        teacher = load(*args, **kwargs)
        forward = teacher.forward
        teacher.forward = lambda x: forward(x) * float("nan")  # a teacher gone bad
        return teacher

    monkeypatch.setattr(train, "load_teacher", nan_teacher)
    with pytest.raises(NonFiniteLoss, match="at step 1 "):
        fit(tiny_config(data, tmp_path / "nan", epochs=1))
