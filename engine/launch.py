"""Which launcher started this process, and its place in the job: torchrun, srun, or neither.

The rule, read from the environment in this order (:func:`launch_from_env`):

* **torchrun** (``torch.distributed.run``) sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
  ``MASTER_ADDR`` and ``MASTER_PORT``; they are used as given, whatever SLURM variables are also
  set (``srun torchrun ...`` is torchrun's job).
* **srun**: a task of a SLURM job step with more than one task. Its rank is ``SLURM_PROCID``, the
  world size ``SLURM_NTASKS`` (srun sets it to the step's task count), the local rank
  ``SLURM_LOCALID``. The master is the first host of the step's node list (``SLURM_STEP_NODELIST``,
  else ``SLURM_JOB_NODELIST``), where task 0 runs, and the port is ``10000 + job id % 20000``, so
  every task computes the same pair without talking; ``MASTER_ADDR`` / ``MASTER_PORT`` already in
  the environment win. A step task is recognised by its step id: srun sets ``SLURM_STEP_ID``
  (and ``SLURM_STEPID``) to 0, 1, ... for the steps it launches. The batch script of
  ``sbatch --ntasks=N`` is *not* a step task: it has ``SLURM_NTASKS=N`` and ``SLURM_PROCID=0``
  but no step id (Slurm 22.05), and newer versions that give the batch, extern or interactive
  step an id give it one of the reserved values above ``0xfffffff0``; the shell of ``salloc`` is
  not one either. Such a process is one process, as is a step of a single task.
* otherwise: rank 0 of 1.

:meth:`Launch.export` writes the result as torchrun's variables, so
``init_process_group(init_method="env://")`` works the same under both launchers. This module
imports nothing heavy (no torch): it is plain environment reading, unit-tested on its own.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Literal

# Slurm's SLURM_MAX_NORMAL_STEP_ID: ids above it name the batch, extern and interactive steps.
MAX_NORMAL_STEP_ID = 0xFFFFFFF0
# MASTER_PORT under srun: PORT_BASE + job id % PORT_SPAN (above the well-known ports, below the
# Linux ephemeral range that starts at 32768).
PORT_BASE, PORT_SPAN = 10000, 20000


@dataclass(frozen=True)
class Launch:
    """This process's place in the job, as its launcher describes it."""

    launcher: Literal["torchrun", "srun", "single"] = "single"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    nodelist: str = ""  # srun: the step's node list (its first host is the master)
    job_id: int = 0  # srun: the job id (the master port derives from it)

    def export(self, environ: MutableMapping[str, str] | None = None) -> None:
        """Write the facts as torchrun's variables (``env://``). Under srun the master address
        and port are added unless ``MASTER_ADDR`` / ``MASTER_PORT`` are set already."""
        env = os.environ if environ is None else environ
        env["RANK"] = str(self.rank)
        env["WORLD_SIZE"] = str(self.world_size)
        env["LOCAL_RANK"] = str(self.local_rank)
        if self.launcher == "srun":
            if "MASTER_ADDR" not in env:
                env["MASTER_ADDR"] = first_host(self.nodelist)
            env.setdefault("MASTER_PORT", str(PORT_BASE + self.job_id % PORT_SPAN))


def launch_from_env(environ: Mapping[str, str] | None = None) -> Launch:
    """The launch described by ``environ`` (default ``os.environ``); see the module docstring."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        rank, local = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
        return Launch("torchrun" if world > 1 else "single", rank, world, local)
    if not is_srun_task(env) or int(env["SLURM_NTASKS"]) < 2:
        return Launch()
    return Launch(
        "srun",
        int(env["SLURM_PROCID"]),
        int(env["SLURM_NTASKS"]),
        int(env.get("SLURM_LOCALID", "0")),
        env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "",
        int(env.get("SLURM_JOB_ID", "0")),
    )


def is_srun_task(environ: Mapping[str, str]) -> bool:
    """True for a task srun launched in a job step (not a batch script or an salloc shell)."""
    step = environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID", ""))
    if not step.isdigit() or "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return False
    return int(step) <= MAX_NORMAL_STEP_ID


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``scontrol show hostnames`` when it is on PATH)."""
    if not nodelist:
        raise ValueError("srun launch without SLURM_STEP_NODELIST/SLURM_JOB_NODELIST")
    if shutil.which("scontrol"):
        try:
            done = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            hosts = done.stdout.split()
            if hosts:
                return hosts[0]
        except (OSError, subprocess.SubprocessError):
            pass  # a broken scontrol: the expander below reads the common forms
    return expand_nodelist(nodelist)[0]


_BRACKETS = re.compile(r"\[([^\]]*)\]")


def expand_nodelist(nodelist: str) -> list[str]:
    """Hosts of a SLURM node list, in order: ``node[01-03,07],gpu5`` -> node01 node02 node03
    node07 gpu5. Every bracket group of a name expands (``r[1-2]-n[1-2]`` gives four hosts), and
    a range keeps its zero padding."""
    hosts: list[str] = []
    for name in _split_top_level(nodelist):
        expanded = [""]
        pos = 0
        for match in _BRACKETS.finditer(name):
            prefix = name[pos : match.start()]
            expanded = [h + prefix + item for h in expanded for item in _ranges(match.group(1))]
            pos = match.end()
        hosts += [h + name[pos:] for h in expanded]
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    """Split at the commas that are outside brackets."""
    parts, depth, current = [], 0, ""
    for char in nodelist.strip():
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in parts if p]


def _ranges(spec: str) -> list[str]:
    """``01-03,07`` -> 01 02 03 07 (the width of the range's first bound is kept)."""
    items = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        if not high:
            items.append(low)
            continue
        width = len(low)
        items += [str(i).zfill(width) for i in range(int(low), int(high) + 1)]
    return items
