"""The start every training entry point shares: device, resolved precision written back into the
config, config.yaml on disk, torch seeded, one metrics writer; one-process stages refuse ranks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from engine.config import StageConfig
from engine.errors import UserError
from engine.metrics import LogSpec, read_metrics
from engine.precision import resolve_precision
from engine.start import start_run


@dataclass(frozen=True)
class TinyTrain:
    device: str = "cpu"
    precision: str = "auto"
    seed: int = 7


@dataclass(frozen=True)
class TinyConfig(StageConfig):
    out_dir: str = ""
    train: TinyTrain = field(default_factory=TinyTrain)
    log: LogSpec = field(default_factory=lambda: LogSpec(tensorboard=False))


def test_start_resolves_saves_seeds_and_opens_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = TinyConfig(out_dir=str(tmp_path / "run"))
    with start_run(cfg) as run:
        drawn = torch.rand(3)
        with run.metrics() as metrics:
            metrics.write({"kind": "step", "step": 1, "loss": 0.5})
    precision = resolve_precision("auto", "cpu")
    assert run.device == torch.device("cpu") and run.precision == precision
    assert run.cfg.train.precision == precision and cfg.train.precision == "auto"  # a new config
    assert run.out == tmp_path / "run" and run.ddp.world_size == 1
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"] == {"device": "cpu", "precision": precision, "seed": 7}
    torch.manual_seed(7)
    assert torch.equal(drawn, torch.rand(3))  # seeded with train.seed
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == [
        {"kind": "step", "step": 1, "loss": 0.5}
    ]


def test_one_process_stage_refuses_a_multi_rank_launch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(UserError, match="runs in one process.*rank 1 of 2"):
        start_run(TinyConfig(out_dir=str(tmp_path / "run")), data_parallel=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written
