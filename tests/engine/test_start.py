"""The start every training entry point shares: device, resolved precision written back into the
config, config.yaml on disk, torch seeded, one metrics writer; one-process stages refuse ranks;
out_dir held to the run's end, by rank 0 alone, and a held one refused on every rank."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from support.cli_runs import environment
from support.stage2 import free_port

from engine.config import StageConfig
from engine.errors import OutDirBusy, UserError
from engine.lock import hold
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


@pytest.mark.parametrize("data_parallel", [True, False], ids=["stages-1-3", "linprobe-finetune"])
def test_the_run_holds_out_dir_to_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_parallel: bool
) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    second = TinyConfig(out_dir=str(out), train=TinyTrain(seed=8))
    with start_run(TinyConfig(out_dir=str(out)), data_parallel=data_parallel):
        with pytest.raises(OutDirBusy, match=f"out_dir={out} is held by another run"):
            start_run(second, data_parallel=data_parallel)
        # the refused run wrote nothing: the config is the first run's
        assert yaml.safe_load((out / "config.yaml").read_text())["train"]["seed"] == 7
    assert not (out / ".lock").exists()
    with start_run(second, data_parallel=data_parallel):  # free again
        assert yaml.safe_load((out / "config.yaml").read_text())["train"]["seed"] == 8


RANK = """
import sys
from engine.config import build_config
from engine.errors import UserError
from engine.start import start_run
from pretrain.config import PretrainConfig

cfg = build_config(PretrainConfig, {"out_dir": sys.argv[1], "train": {"device": "cpu"}})
try:
    with start_run(cfg) as run:
        run.ddp.barrier()
        print(f"rank {run.ddp.rank} of {run.ddp.world_size} started")
except UserError as err:
    print(f"refused: {err}")
"""


def two_ranks(out: Path) -> list[str]:
    """What each of two ranks (a torchrun-style launch on the CPU) says when it starts a run."""
    env = {**environment(), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}  # fmt: skip
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, str(out)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    return [proc.communicate(timeout=60)[0].strip() for proc in ranks]


def test_rank_0_alone_holds_out_dir_and_its_refusal_is_every_ranks(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # not locked out by each other: rank 0 holds the folder, rank 1 does not try
    assert two_ranks(out) == ["rank 0 of 2 started", "rank 1 of 2 started"]
    with hold(str(out)):  # another run holds it: both ranks refuse, neither waits for the other
        said = two_ranks(out)
    assert all(s.startswith(f"refused: out_dir={out} is held by another run") for s in said), said
