"""Running ``pipeline`` as a subprocess, and killing it mid-run, for the kill/resume tests.

Imported as ``support.cli_runs`` (pytest puts tests/ on the path).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pipeline_command() -> list[str]:
    """The installed console script beside this interpreter, else the module."""
    script = Path(sys.executable).with_name("pipeline")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pipeline.cli"]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_to_end(cmd: list[str], log: Path) -> None:
    """Run ``cmd`` to completion (output to ``log``) and require exit code 0."""
    with log.open("w") as out:
        done = subprocess.run(
            cmd, cwd=ROOT, env=environment(), stdout=out, stderr=subprocess.STDOUT, timeout=120
        )
    assert done.returncode == 0, log.read_text()[-3000:]


def started_epoch(out_dir: Path, epoch: int) -> bool:
    """Whether metrics.jsonl holds a step line of ``epoch`` (0-based) or later."""
    metrics = out_dir / "metrics.jsonl"
    if not metrics.exists():
        return False
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if record.get("kind") == "step" and record.get("epoch", -1) >= epoch:
            return True
    return False


def run_and_kill_after_checkpoint(
    cmd: list[str], out_dir: Path, log: Path, signum: int = signal.SIGKILL
) -> None:
    """Start ``cmd`` in its own process group; send the group ``signum`` (SIGKILL, or SIGINT as
    Ctrl-C does) once the first checkpoint is written and a step of the second epoch is logged
    (so the signal cuts an epoch short). The run must end on it: killed, or exit 128 + n."""
    checkpoint = out_dir / "checkpoint.pth"
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=environment(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill reaches every child
        )
        try:
            deadline = time.monotonic() + 90
            while not (checkpoint.exists() and started_epoch(out_dir, 1)):
                assert proc.poll() is None, f"run ended before the kill:\n{log.read_text()}"
                assert time.monotonic() < deadline, "no checkpoint within 90 s"
                time.sleep(0.005)
            os.killpg(proc.pid, signum)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    ended = -signum if signum == signal.SIGKILL else 128 + signum
    assert proc.returncode == ended, (proc.returncode, log.read_text()[-3000:])


def records(out_dir: Path, timing: set[str]) -> list[dict]:
    """The lines of metrics.jsonl without the wall-time fields in ``timing``."""
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(ln).items() if k not in timing} for ln in lines if ln.strip()
    ]
