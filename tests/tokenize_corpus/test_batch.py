"""Batch-job settings without a batch scheduler: the job scripts dask-jobqueue writes from the
``cluster.*`` keys (SLURM and PBS, as dask-jobqueue's own tests check them, nothing submitted),
time limits, worker lifetimes, and ``--print-job-script``."""

from __future__ import annotations

import sys

import pytest

from engine.errors import ConfigError
from pipeline.cli import main as cli_main
from tokenize_corpus.batch import lifetime, walltime_seconds
from tokenize_corpus.worker import pick_device

KEYS = ["stage=tokenize", "images=/data/train-{000000..000009}.tar", "tokenizer=/models/vqkd.pth",
        "aug.size=224"]  # fmt: skip


def job_script(tmp_path, capsys, *keys: str) -> str:
    out = tmp_path / "tokens"
    code = cli_main(["run", *KEYS, f"out_dir={out}", *keys, "--print-job-script"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert not out.exists()  # printing writes nothing
    return captured.out


def test_slurm_job_script_has_a_line_for_every_key(tmp_path, capsys):
    script = job_script(
        tmp_path, capsys, "cluster.kind=slurm", "cluster.queue=gpu", "cluster.account=proj42",
        "cluster.job_cores=8", "cluster.job_memory=32GiB", "cluster.walltime=1-00:00:00",
        "cluster.gpus_per_job=2", "cluster.job_extra=[--qos=low,--exclusive]",
        "cluster.prologue=[module load cuda/12,source /opt/venv/bin/activate]",
        "cluster.python=/opt/venv/bin/python", f"cluster.log_dir={tmp_path / 'logs'}",
        "cluster.death_timeout=90s",
    )  # fmt: skip
    lines = script.splitlines()
    header = [line for line in lines if line.startswith("#SBATCH")]
    for expected in ["-J beitv2-tokenize", "-p gpu", "-A proj42", "--cpus-per-task=8",
                     "--mem=32G", "-t 1-00:00:00", "--gres=gpu:2", "--qos=low", "--exclusive",
                     f"-o {tmp_path / 'logs'}/beitv2-tokenize-%J.out"]:  # fmt: skip
        assert f"#SBATCH {expected}" in header, (expected, header)
    body = lines[lines.index(header[-1]) + 1 :]
    assert "module load cuda/12" in body and "source /opt/venv/bin/activate" in body
    command = next(line for line in body if "distributed.cli.dask_worker" in line)
    assert command.startswith("/opt/venv/bin/python -m distributed.cli.dask_worker tcp://")
    args = command.split()
    # one Dask worker per GPU, each running one task at a time (the last --nthreads wins)
    assert args[args.index("--nworkers") + 1] == "2"
    assert [args[i + 1] for i, a in enumerate(args) if a == "--nthreads"][-1] == "1"
    assert args[args.index("--death-timeout") + 1] == "90"
    life, stagger = lifetime(24 * 3600)
    assert args[args.index("--lifetime") + 1] == f"{life}s" and life == 24 * 3600 - 600
    assert args[args.index("--lifetime-stagger") + 1] == f"{stagger}s" and stagger == 300


def test_pbs_job_script_has_a_line_for_every_key(tmp_path, capsys):
    script = job_script(
        tmp_path, capsys, "cluster.kind=pbs", "cluster.queue=workq", "cluster.account=proj42",
        "cluster.job_cores=6", "cluster.job_memory=24GiB", "cluster.walltime=02:30:00",
        "cluster.gpus_per_job=1", "cluster.job_extra=[-l place=scatter]",
        "cluster.prologue=[module load cuda]", f"cluster.log_dir={tmp_path / 'logs'}",
    )  # fmt: skip
    header = [line for line in script.splitlines() if line.startswith("#PBS")]
    assert header == [
        "#PBS -N beitv2-tokenize",
        "#PBS -q workq",
        "#PBS -A proj42",
        "#PBS -l select=1:ncpus=6:mem=24gb:ngpus=1",
        "#PBS -l walltime=02:30:00",
        f"#PBS -e {tmp_path / 'logs'}/",
        f"#PBS -o {tmp_path / 'logs'}/",
        "#PBS -l place=scatter",
    ]
    assert "\nmodule load cuda\n" in script
    assert f"{sys.executable} -m distributed.cli.dask_worker" in script  # default: this Python


def test_print_job_script_is_for_batch_kinds_only(tmp_path, capsys):
    code = cli_main(["run", *KEYS, f"out_dir={tmp_path}", "--print-job-script"])
    assert code == 2
    assert "cluster.kind=local, which submits no job" in capsys.readouterr().err
    code = cli_main(["run", "stage=vqkd", "images=x", "--print-job-script"])
    assert code == 2 and "stage=vqkd submits no batch job" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("04:00:00", 14400), ("1-12:00:00", 129600), ("90", 5400), ("30:00", 1800),
     ("0:05:00", 300)],
)  # fmt: skip
def test_walltime_forms(text, seconds):
    assert walltime_seconds(text) == seconds


@pytest.mark.parametrize("text", ["forever", "1h", "12:3", "-1:00:00", ""])
def test_walltime_refusals(text):
    with pytest.raises(ValueError):
        walltime_seconds(text)


def test_workers_leave_before_their_walltime():
    for walltime in (60, 600, 3600, 4 * 3600, 48 * 3600):
        life, stagger = lifetime(walltime)
        assert life + stagger < walltime  # the last worker to leave still leaves in time
        assert walltime - life <= 600 and stagger <= 300


def test_bad_batch_values_are_config_errors_without_a_scheduler(tmp_path, capsys):
    code = cli_main(["run", *KEYS, f"out_dir={tmp_path}", "cluster.kind=pbs",
                     "cluster.job_memory=big", "--print-job-script"])  # fmt: skip
    assert code == 2 and "cluster.job_memory='big' is not a size" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="cluster.address=tcp://x:1 is only used with"):
        from tokenize_corpus.cluster import check_settings
        from tokenize_corpus.config import ClusterConfig

        check_settings(ClusterConfig(kind="slurm", address="tcp://x:1"))


@pytest.mark.parametrize(
    ("name", "gpus", "device"),
    [(0, 2, "cuda:0"), (3, 2, "cuda:1"), ("SLURMCluster-4", 1, "cuda:0"),
     ("SLURMCluster-4-1", 2, "cuda:1"), ("SLURMCluster-4-0", 2, "cuda:0"),
     ("tcp://10.0.0.1:4000", 4, "cuda:0")],
)  # fmt: skip
def test_each_worker_of_a_job_gets_its_own_gpu(monkeypatch, name, gpus, device):
    """LocalCluster names its workers 0..n-1, dask-jobqueue a job's workers <job>-<i>."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    assert pick_device("auto", name) == device
