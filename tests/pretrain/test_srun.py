"""Stage 3 under SLURM: ``srun -n 2`` and the example batch script train the same weights, bit for
bit, as ``torchrun --nproc_per_node=2`` with the same settings (CPU, gloo).

Needs a running SLURM (``bash tests/slurm/up.sh`` as root); skipped with the reason otherwise.
The ranks learn their place from SLURM's variables (``engine.launch``), so this is the check that
the two launchers give the same ranks, the same batch split and the same data per rank.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from support import cli_runs as cli
from support import pretrain_data as helpers
from support.slurm import sbatch_wait, skip_without_slurm, srun, without_launcher_variables

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "examples" / "slurm" / "pretrain.sbatch"

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures(skip_without_slurm.__name__)]

# A tiny student, 2 epochs; one loader worker per rank, so worker seeding by rank is exercised.
# Every model key is explicit so the batch script's preset=base changes nothing.
TINY = [
    "model.size=tiny", "model.image_size=32", "model.patch_size=8", "model.width=32",
    "model.depth=2", "model.heads=2", "model.drop_path=0.0", "mask.min_patches=4",
    "train.batch_size=4", "train.epochs=2", "train.blr=0.5", "train.warmup_epochs=1",
    "train.num_workers=1", "train.shuffle_buffer=4", "train.log_every=1", "train.device=cpu",
    "train.precision=fp32", "log.tensorboard=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("srun_corpus")
    images = helpers.make_images(root / "images")
    tokens = helpers.make_tokens(images, helpers.make_tokenizer(root / "tokenizer.pth"), root / "t")
    return {"images": str(images), "tokens": str(tokens)}


def environment() -> dict[str, str]:
    return without_launcher_variables(cli.environment())


def data_args(corpus: dict[str, str], out: Path) -> list[str]:
    return [f"images={corpus['images']}", f"tokens={corpus['tokens']}", f"out_dir={out}"]


@pytest.fixture(scope="module")
def torchrun_run(corpus: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same settings under torchrun, 2 processes."""
    out = tmp_path_factory.mktemp("torchrun") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pipeline.cli", "run", "stage=pretrain", *data_args(corpus, out), *TINY]  # fmt: skip
    done = subprocess.run(
        cmd, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"ranks_identical": true' in done.stdout  # two ranks ran
    return out


def assert_same_training(a: Path, b: Path) -> None:
    """Same settings (but the folder and preset), same steps, bitwise-equal weights."""

    def settings(run: Path) -> dict:
        saved = yaml.safe_load((run / "config.yaml").read_text())
        return {k: v for k, v in saved.items() if k not in ("out_dir", "preset")}

    resumed = {"train": {**settings(a)["train"], "resume": settings(b)["train"]["resume"]}}
    assert settings(a) | resumed == settings(b)
    ca = torch.load(a / "checkpoint.pth", weights_only=True)
    cb = torch.load(b / "checkpoint.pth", weights_only=True)
    assert ca["epoch"] == cb["epoch"] == 2 and ca["step"] == cb["step"]
    assert ca["model"].keys() == cb["model"].keys()
    for key, value in ca["model"].items():
        assert torch.equal(value, cb["model"][key]), key


def test_srun_trains_the_weights_torchrun_trains(
    corpus: dict[str, str], torchrun_run: Path, tmp_path: Path
) -> None:
    out, log = tmp_path / "srun", tmp_path / "srun.log"
    command = [*cli.pipeline_command(), "run", "stage=pretrain", *data_args(corpus, out), *TINY]
    code = srun(command, ntasks=2, log=log, env=environment(), cwd=ROOT, timeout=180)
    assert code == 0, log.read_text()[-3000:]
    assert log.read_text().count('"ranks_identical": true') == 2  # two ranks, one group
    assert_same_training(torchrun_run, out)


def test_example_batch_script_trains_the_weights_torchrun_trains(
    corpus: dict[str, str], torchrun_run: Path, tmp_path: Path
) -> None:
    out, log = tmp_path / "sbatch", tmp_path / "job.out"
    env = environment() | {
        "IMAGES": corpus["images"],
        "TOKENS": corpus["tokens"],
        "OUT_DIR": str(out),
        "EXTRA_ARGS": " ".join(TINY),
        "PIPELINE": " ".join(cli.pipeline_command()),
    }
    options = ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--gpus-per-node=0",
               "--cpus-per-task=1", "--partition=debug", "--time=10", f"--output={log}",
               f"--chdir={ROOT}"]  # fmt: skip
    job, code = sbatch_wait(SBATCH, options, env=env, cwd=ROOT, timeout=180)
    text = log.read_text() if log.exists() else "(no job output)"
    assert code == 0, f"job {job}:\n{text[-3000:]}"
    assert "2 ranks on" in text and text.count('"ranks_identical": true') == 2
    assert_same_training(torchrun_run, out)
