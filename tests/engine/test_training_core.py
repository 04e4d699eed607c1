"""The shared training core: one LR rule, timm's weight-decay groups, metrics sinks, guards."""

from __future__ import annotations

import builtins
import json
import math

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine.device import resolve_device
from engine.distributed import Distributed
from engine.errors import NonFiniteLoss, UserError
from engine.guards import check_finite
from engine.metrics import TENSORBOARD, LogSpec, MetricsWriter, read_metrics
from engine.optim import adamw, param_groups, set_lr
from engine.plots import Panel, plot_metrics
from engine.schedule import Schedule, lr_at, scaled_lr


def reference_schedule(peak: float, floor: float, total: int, warmup: int) -> np.ndarray:
    """The reference's per-step array: linspace warmup, then a cosine over the remaining steps."""
    warm = np.linspace(0.0, peak, warmup) if warmup else np.array([])
    rest = np.arange(total - warmup)
    cos = floor + 0.5 * (peak - floor) * (1 + np.cos(np.pi * rest / len(rest)))
    return np.concatenate([warm, cos])


@pytest.mark.parametrize(("total", "warmup"), [(100, 10), (50, 0), (20, 1), (7, 3)])
def test_schedule_is_the_references(total: int, warmup: int) -> None:
    ours = [lr_at(s, total, warmup, 1e-3, 1e-5) for s in range(total)]
    np.testing.assert_allclose(ours, reference_schedule(1e-3, 1e-5, total, warmup), rtol=1e-12)


def test_warmup_reaches_the_peak_at_step_w_minus_1() -> None:
    sched = Schedule(peak=2.0, total_steps=100, warmup_steps=10, floor=0.1)
    assert sched(0) == 0.0
    assert sched(9) == pytest.approx(2.0)  # the last warmup step already runs at the peak
    assert sched(10) == pytest.approx(2.0)  # the cosine starts at the peak
    assert all(sched(s) > sched(s + 1) for s in range(10, 99))
    assert sched(100) == pytest.approx(0.1)
    assert scaled_lr(1.5e-3, 256, 2048) == pytest.approx(1.875e-4)


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 4))
        self.proj = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}


def test_param_groups_decay_only_weight_matrices() -> None:
    model = Tiny()
    groups = param_groups(model, 0.05)
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in groups}
    assert by_decay[0.05] == {id(model.proj.weight)}
    assert by_decay[0.0] == {
        id(p) for p in (model.cls_token, model.proj.bias, model.norm.weight, model.norm.bias)
    }
    opt = adamw(groups, lr=1.0, betas=(0.9, 0.98), device="cpu")
    opt.param_groups[0]["lr_scale"] = 0.5
    set_lr(opt, 0.2)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([0.1, 0.2])
    assert all(g["foreach"] for g in opt.param_groups)


def test_metrics_go_to_jsonl_and_tensorboard(tmp_path) -> None:
    with MetricsWriter(tmp_path, LogSpec(tensorboard=True)) as writer:
        for step in (1, 2, 3):
            writer.write({"kind": "step", "step": step, "epoch": 0, "loss": 1.0 / step, "tag": "x"})
        writer.write({"kind": "epoch", "step": 3, "epoch": 0, "loss": 0.5, "nan": math.nan})
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1.0, 0.5, 1 / 3, 0.5]
    events = EventAccumulator(str(tmp_path / TENSORBOARD))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"step/loss", "step/epoch", "epoch/loss", "epoch/epoch"}
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("step/loss")] == [
        (1, 1.0),
        (2, 0.5),
        (3, round(1 / 3, 6)),
    ]
    assert [e.value for e in events.Scalars("epoch/loss")] == [0.5]


def test_resumed_metrics_keep_only_what_the_checkpoint_covers(tmp_path) -> None:
    lines = [{"kind": "step", "step": s, "loss": float(s)} for s in range(1, 7)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    writer = MetricsWriter(
        tmp_path, LogSpec(tensorboard=False), keep=lambda r: r["step"] <= 4, resume_step=4
    )
    writer.write({"kind": "step", "step": 5, "loss": 50.0})
    writer.close()
    got = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert got == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0)]
    assert not (tmp_path / "tensorboard").exists()
    # a fresh start (keep=None) empties the file; a non-main rank writes nothing
    MetricsWriter(tmp_path, LogSpec(tensorboard=False)).close()
    MetricsWriter(tmp_path, enabled=False).write({"kind": "step", "step": 1})
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_wandb_is_optional(tmp_path, monkeypatch, caplog) -> None:
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with MetricsWriter(tmp_path, LogSpec(tensorboard=False, wandb="proj")) as writer:
        writer.write({"kind": "step", "step": 1, "loss": 1.0})
    assert "wandb is not installed" in caplog.text
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"kind": "step", "step": 1, "loss": 1.0}]


def test_plot_draws_the_panels(tmp_path) -> None:
    records = [{"kind": "step", "step": s, "loss": 1 / s, "lr": 0.1} for s in range(1, 5)]
    records.append({"kind": "epoch", "step": 4, "epoch": 0, "loss": 0.4, "eval_usage": 0.5})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    panels = [
        Panel("loss", ("loss",), with_epoch_means=True),
        Panel("lr", ("lr",)),
        Panel("usage", ("eval_usage",), kind="epoch", x="epoch"),
    ]
    out = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "curves.png", panels)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_non_finite_loss_stops_with_the_step() -> None:
    check_finite(1.25, step=3)
    with pytest.raises(NonFiniteLoss, match=r"nan at step 7 \(epoch 2\)"):
        check_finite(float("nan"), step=7, epoch=2)
    with pytest.raises(UserError, match="inf at step 1"):
        check_finite(float("inf"), step=1)


def test_device_and_single_process_distributed(monkeypatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="train.device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(UserError, match="no CUDA device"):
            resolve_device("cuda")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ddp = Distributed.setup(torch.device("cpu"))
    assert (ddp.rank, ddp.world_size, ddp.main, ddp.all_reduce) == (0, 1, True, None)
    assert ddp.mean({"a": 2.0}) == {"a": 2.0}
    t = torch.ones(2)
    assert ddp.sum_(t) is t and t.tolist() == [1.0, 1.0]
    model = torch.nn.Linear(2, 2)
    assert ddp.wrap(model, torch.device("cpu")) is model
    assert ddp.gather_objects("x") == ["x"]
    ddp.close()
