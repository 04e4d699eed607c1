"""Who launched the process: torchrun's variables win, an srun step task of several tasks is a
distributed launch, a batch script or a one-task step is one process; SLURM node lists expand."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engine import launch as launch_module
from engine.distributed import Distributed
from engine.launch import Launch, expand_nodelist, launch_from_env

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# What Slurm 22.05 gives task 1 of `srun -n 2` (checked on the test cluster, tests/slurm/up.sh).
SRUN_TASK = {
    "SLURM_JOB_ID": "12345",
    "SLURM_JOB_NODELIST": "gpu[03-04]",
    "SLURM_STEP_NODELIST": "gpu[03-04]",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_ID": "0",
    "SLURM_STEPID": "0",
}
# ... and the batch script of `sbatch --ntasks=2`: the same job facts, no step id.
BATCH_SCRIPT = {
    "SLURM_JOB_ID": "12345",
    "SLURM_JOB_NODELIST": "gpu[03-04]",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No launcher variables in os.environ (the tests may themselves run under srun)."""
    for name in [*LAUNCH_VARS, *(k for k in os.environ if k.startswith("SLURM_"))]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("vm", ["vm"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("a[9-11]", ["a9", "a10", "a11"]),
        ("n[008-010]", ["n008", "n009", "n010"]),
        ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
        ("login,cpu[1,3]-ib", ["login", "cpu1-ib", "cpu3-ib"]),
    ],
)
def test_nodelist_expands_in_order(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol is not on PATH")
def test_nodelist_expander_agrees_with_scontrol() -> None:
    for nodelist in ("node[01-03,07],gpu5", "r[1-2]-n[08-10]", "a[9-11],b"):
        done = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        assert expand_nodelist(nodelist) == done.stdout.split()


def test_plain_process_is_rank_0_of_1() -> None:
    assert launch_from_env({}) == Launch()
    assert launch_from_env({"WORLD_SIZE": "1", **SRUN_TASK}).world_size == 1  # torchrun's wins


def test_srun_task_reads_slurm_and_derives_the_master(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch_module.shutil, "which", lambda name: None)  # the Python expander
    launch = launch_from_env(SRUN_TASK)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == (
        "srun", 1, 2, 1
    )  # fmt: skip
    env: dict[str, str] = {}
    launch.export(env)
    assert env == {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu03",  # the first host of the step, where task 0 runs
        "MASTER_PORT": str(10000 + 12345 % 20000),
    }
    given = {"MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29400"}
    env = dict(given)
    launch_from_env({**SRUN_TASK, **given}).export(env)
    assert {k: env[k] for k in given} == given  # a master already set is kept


def test_torchrun_wins_over_slurm() -> None:
    torchrun = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "0"}  # e.g. srun ... torchrun ...
    launch = launch_from_env({**SRUN_TASK, **torchrun})
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == (
        "torchrun", 3, 4, 0
    )  # fmt: skip


@pytest.mark.parametrize(
    "environ",
    [
        BATCH_SCRIPT,  # Slurm 22.05: the batch script has SLURM_NTASKS but no step id
        {**BATCH_SCRIPT, "SLURM_STEP_ID": str(0xFFFFFFFB)},  # the batch step's reserved id
        {**BATCH_SCRIPT, "SLURM_STEP_ID": str(0xFFFFFFFA)},  # salloc's interactive step
        {**BATCH_SCRIPT, "SLURM_STEP_ID": "batch"},
        {**SRUN_TASK, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"},  # srun -n 1
    ],
)
def test_batch_scripts_and_single_task_steps_are_one_process(environ: dict[str, str]) -> None:
    assert launch_from_env(environ) == Launch()


def test_batch_script_environment_sets_up_one_process(clean_env: pytest.MonkeyPatch) -> None:
    for name, value in BATCH_SCRIPT.items():
        clean_env.setenv(name, value)
    ddp = Distributed.setup(torch.device("cpu"))
    assert (ddp.rank, ddp.world_size, ddp.owned) == (0, 1, False)
    assert "WORLD_SIZE" not in os.environ  # nothing exported for a single process
    ddp.close()


RANK_SCRIPT = """
import sys
import torch
from engine.distributed import Distributed

ddp = Distributed.setup(torch.device("cpu"))
total = ddp.sum_(torch.tensor([float(ddp.rank + 1)]))
print(ddp.rank, ddp.world_size, ddp.local_rank, int(total.item()))
ddp.close()
"""


def test_two_processes_with_srun_variables_join_one_group(tmp_path: Path) -> None:
    """Without SLURM: two processes given the variables srun gives its tasks find each other."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT))
    base = {
        k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCH_VARS
    }
    base |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1"}
    base["MASTER_PORT"] = str(port)
    procs = []
    for rank in range(2):
        env = {**base, **SRUN_TASK, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)}
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        )
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(out.split())
    assert outputs == [["0", "2", "0", "3"], ["1", "2", "1", "3"]]  # 1 + 2 summed over ranks
