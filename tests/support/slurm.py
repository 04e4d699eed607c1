"""Running commands on a real SLURM cluster from tests (``bash tests/slurm/up.sh`` brings up one).

Imported as ``support.slurm`` (pytest puts tests/ on the path). Tests marked ``slurm`` use the
``skip_without_slurm`` fixture, so they are skipped with the reason when there is no cluster.
Every job is bounded twice: by a SLURM time limit and by a wall-clock timeout after which the
job is cancelled, so a hung job never outlives its test.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

UP_STATES = ("idle", "mixed", "allocated", "completing")
SUBMIT_TIMEOUT = 30  # seconds for sbatch to answer with a job id


def slurm_available() -> str | None:
    """None when a SLURM cluster answers with a usable node, else why not (the skip reason)."""
    if shutil.which("sinfo") is None:
        return "sinfo is not on PATH: no SLURM here (as root: bash tests/slurm/up.sh)"
    try:
        done = subprocess.run(
            ["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s: is slurmctld running? (tests/slurm/up.sh)"
    if done.returncode != 0:
        return f"sinfo failed: {done.stderr.strip() or done.returncode} (tests/slurm/up.sh)"
    states = [s.rstrip("*~#!%$@^-") for s in done.stdout.split()]
    if not any(s in UP_STATES for s in states):
        return f"no SLURM node is up (node states: {', '.join(states) or 'none'})"
    return None


@pytest.fixture
def skip_without_slurm() -> None:
    """Skip the test, with the reason, when no SLURM cluster answers."""
    reason = slurm_available()
    if reason:
        pytest.skip(reason)


def srun(
    command: Sequence[str],
    *,
    ntasks: int,
    log: Path,
    env: Mapping[str, str],
    cwd: Path,
    timeout: float = 120,
) -> int:
    """``srun --ntasks=N command`` in a new job, output to ``log``; its exit code. Killed (and
    its job cancelled) after ``timeout`` seconds."""
    minutes = max(1, int(timeout // 60) + 1)
    cmd = ["srun", f"--ntasks={ntasks}", f"--time={minutes}", "--kill-on-bad-exit=1",
           f"--chdir={cwd}", *command]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # srun forwards it and cancels the step
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise


def sbatch_wait(
    script: Path,
    options: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    timeout: float = 120,
) -> tuple[str, int]:
    """Submit ``script`` with ``sbatch --wait options``; (job id, exit code) once it ended. The
    job is cancelled after ``timeout`` seconds."""
    cmd = ["sbatch", "--wait", "--parsable", *options, str(script)]
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    job = proc.stdout.readline().strip().split(";")[0]  # printed at submission, before the wait
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        if job:
            subprocess.run(["scancel", job], timeout=SUBMIT_TIMEOUT, check=False)
        proc.kill()
        proc.wait()
        raise
    if not job:
        raise RuntimeError(f"sbatch gave no job id: {proc.stderr.read() if proc.stderr else ''}")
    return job, proc.returncode


def without_launcher_variables(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` minus SLURM's and torchrun's variables, so a test run inside a job (or under
    torchrun) starts its own launches cleanly."""
    torchrun = {"WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in env.items() if not k.startswith("SLURM_") and k not in torchrun}
