"""Running commands on a real SLURM cluster from tests (``bash tests/slurm/up.sh`` brings up one).

Imported as ``support.slurm`` (pytest puts tests/ on the path). Tests marked ``slurm`` use the
``skip_without_slurm`` fixture, so they are skipped with the reason when there is no cluster.
Every job is bounded twice: by a SLURM time limit and by a wall-clock timeout after which the
job is cancelled, so a hung job never outlives its test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

UP_STATES = ("idle", "mixed", "allocated", "completing")
# Job states after which a job runs no more.
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE")  # fmt: skip
SUBMIT_TIMEOUT = 30  # seconds for sbatch, scontrol or scancel to answer
POLL = 0.5  # seconds between two looks at a job's state


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


# Set (by .ci/run, after tests/slurm/up.sh) where SLURM must be there: its tests then fail
# instead of being skipped.
REQUIRE = "BEITV2_REQUIRE_SLURM"


@pytest.fixture(scope="session")  # the widest scope: it runs before a module's other fixtures
def skip_without_slurm() -> None:
    """Skip the test, with the reason, when no SLURM cluster answers (fail under $REQUIRE)."""
    reason = slurm_available()
    if reason and os.environ.get(REQUIRE):
        pytest.fail(f"{REQUIRE} is set but {reason}")
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
    """Submit ``script`` with ``sbatch options`` and wait for its end; (job id, exit code). The
    job is cancelled after ``timeout`` seconds.

    Polled here rather than ``sbatch --wait``: that one checks after 2, 10 and 42 s (Slurm 22.05),
    so a job of 11 s costs 42."""
    done = subprocess.run(
        ["sbatch", "--parsable", *options, str(script)],
        cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=SUBMIT_TIMEOUT,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"sbatch refused the job: {done.stderr.strip()}")
    job = done.stdout.strip().split(";")[0]
    deadline = time.monotonic() + timeout
    while True:
        fields = _job_fields(job)
        if fields.get("JobState") in FINISHED:
            return job, int(fields.get("ExitCode", "1:0").split(":")[0])
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], timeout=SUBMIT_TIMEOUT, check=False)
            raise TimeoutError(f"job {job} still {fields.get('JobState')} after {timeout} s")
        time.sleep(POLL)


def _job_fields(job: str) -> dict[str, str]:
    """``scontrol show job`` as key=value pairs (kept MinJobAge seconds after the job ends)."""
    shown = subprocess.run(
        ["scontrol", "show", "job", "--oneliner", job],
        capture_output=True, text=True, timeout=SUBMIT_TIMEOUT,
    )  # fmt: skip
    pairs = (item.partition("=") for item in shown.stdout.split())
    return {key: value for key, _, value in pairs}


def without_launcher_variables(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` minus SLURM's and torchrun's variables, so a test run inside a job (or under
    torchrun) starts its own launches cleanly."""
    torchrun = {"WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in env.items() if not k.startswith("SLURM_") and k not in torchrun}
