"""Stage 2's worker jobs on SLURM or PBS, through dask-jobqueue (docs/design.md §4, "Where it runs").

``cluster.kind=slurm|pbs`` runs the Dask scheduler inside the driver (on the login node) and
submits worker jobs that connect back to it. This module holds everything that is particular to
batch schedulers:

- :func:`check_settings`: the values a person can get wrong (``cluster.jobs=0``, a memory that
  is not a size, a walltime SLURM would reject, ``sbatch`` not on PATH, an unknown partition),
  checked before anything is submitted;
- :func:`make_cluster`: the dask-jobqueue cluster object for the run's settings (its scheduler
  starts; no job is submitted), whose ``job_script()`` is written beside the run and which
  ``sbatch --test-only`` checks (:func:`test_submission`) before the first job goes in;
- :class:`JobWatch`: keeps ``cluster.jobs`` worker jobs running while shards remain, replacing
  the jobs the batch scheduler ends (dask-jobqueue does not), and gives up (exit 1, a rerun
  resumes) when job after job ends without a worker.
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import dask
import dask_jobqueue
from dask.utils import parse_bytes, parse_timedelta
from dask_jobqueue.slurm import SLURMRunner
from distributed.diagnostics.plugin import SchedulerPlugin

from engine.errors import ConfigError
from tokenize_corpus.config import ClusterConfig

# dask_jobqueue's runner module replaces the SIGINT handler when it is imported (Ctrl-C would then
# exit 0 through sys.exit): put Python's own back, so Ctrl-C cancels the jobs and says so.
if (
    threading.current_thread() is threading.main_thread()
    and getattr(signal.getsignal(signal.SIGINT), "__module__", "") == "dask_jobqueue.runner"
):
    signal.signal(signal.SIGINT, signal.default_int_handler)

log = logging.getLogger(__name__)

# The command each kind submits with, and the one that lists its queue.
SUBMIT = {"slurm": "sbatch", "pbs": "qsub"}
JOB_NAME = "beitv2-tokenize"
# How often the watch asks the batch scheduler about its jobs.
POLL_SECONDS = 5.0
# A lost worker's job is forgotten (and replaced) this long after it left the scheduler.
LOST_WORKER_TIMEOUT = "5s"
# The watch gives up after this many jobs per cluster.jobs in a row ended without a worker.
FAILED_STARTS_PER_JOB = 2
# slurm-runner: the scheduler (rank 0) shuts down after this long with nothing to do, so that a
# run whose rank 1 died without closing it does not hold the allocation forever.
RUNNER_IDLE_TIMEOUT = "15m"
# A job without an id this long after the watch first saw it was not submitted (sbatch failed).
SUBMIT_GRACE_SECONDS = 60.0
_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d+):(\d{2}):(\d{2})$|^(\d+):(\d{2})$|^(\d+)$")


def walltime_seconds(text: str) -> int:
    """SLURM/PBS time limits: ``[D-]HH:MM:SS``, ``MM:SS`` or ``MM`` (minutes) -> seconds."""
    match = _WALLTIME.match(text.strip())
    if match is None:
        raise ValueError(text)
    days, hours, minutes, seconds, mm, ss, only = match.groups()
    if only is not None:
        return int(only) * 60
    if mm is not None:
        return int(mm) * 60 + int(ss)
    return ((int(days or 0) * 24 + int(hours)) * 60 + int(minutes)) * 60 + int(seconds)


def lifetime(walltime: int) -> tuple[int, int]:
    """(worker ``--lifetime``, ``--lifetime-stagger``) in seconds for a job of ``walltime`` s.

    A worker leaves about 10% (at most 10 minutes) before its walltime, staggered by up to 5%
    (at most 5 minutes) so that the jobs of one submission do not all leave at once; the shard
    task it was running starts again on another worker.
    """
    margin = min(600, max(10, walltime // 10))
    return max(10, walltime - margin), min(300, max(1, walltime // 20))


def check_settings(cluster: ClusterConfig, submitting: bool = True) -> None:
    """Refuse batch settings that cannot work, before anything is submitted (ConfigError).

    ``submitting``: also check that the submit command is on PATH and, on SLURM, that the
    partition exists (not needed to print a job script).
    """
    kind = cluster.effective_kind
    try:
        memory = parse_bytes(cluster.job_memory)
    except ValueError:
        memory = 0
    if memory <= 0:
        raise ConfigError(
            f"cluster.job_memory={cluster.job_memory!r} is not a size; write it like 16GiB or 32GB"
        )
    try:
        walltime_seconds(cluster.walltime)
    except ValueError:
        raise ConfigError(
            f"cluster.walltime={cluster.walltime!r} is not a time limit; write [D-]HH:MM:SS, "
            "e.g. 04:00:00 or 1-12:00:00"
        ) from None
    try:
        parse_timedelta(cluster.death_timeout)
    except (ValueError, KeyError):
        raise ConfigError(
            f"cluster.death_timeout={cluster.death_timeout!r} is not a duration, e.g. 60s"
        ) from None
    if not submitting:
        return
    command = SUBMIT[kind]
    if shutil.which(command) is None:
        raise ConfigError(
            f"cluster.kind={kind} submits worker jobs with {command}, which is not on PATH here; "
            "run from a login node of the cluster (or load its module), or use "
            "cluster.kind=local"
        )
    if kind == "slurm" and cluster.queue:
        partitions = slurm_partitions()
        if partitions and cluster.queue not in partitions:
            raise ConfigError(
                f"cluster.queue={cluster.queue}: SLURM has no such partition; it has "
                f"{', '.join(partitions)} (sinfo)"
            )


def slurm_partitions() -> list[str]:
    """The partitions ``sinfo`` lists ([] when it does not answer)."""
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({line.strip() for line in out.splitlines() if line.strip()})


def job_kwargs(cluster: ClusterConfig, log_dir: str) -> dict[str, Any]:
    """The dask-jobqueue job settings for ``cluster`` (SLURMCluster/PBSCluster keywords)."""
    kind = cluster.effective_kind
    processes = cluster.workers_per_job
    walltime = walltime_seconds(cluster.walltime)
    life, stagger = lifetime(walltime)
    directives = list(cluster.job_extra)
    if cluster.gpus_per_job and kind == "slurm":
        directives.append(f"--gres=gpu:{cluster.gpus_per_job}")
    kwargs: dict[str, Any] = {
        "cores": cluster.job_cores,
        "processes": processes,
        "memory": cluster.job_memory,
        "walltime": cluster.walltime,
        "queue": cluster.queue or None,
        "account": cluster.account or None,
        "job_name": JOB_NAME,
        "job_extra_directives": directives,
        "job_script_prologue": list(cluster.prologue),
        "python": cluster.python or sys.executable,
        "log_directory": log_dir,
        "death_timeout": parse_timedelta(cluster.death_timeout),
        "interface": cluster.interface or None,
        # one task at a time per worker: memory bounded by one shard, one tokenizer per worker
        "worker_extra_args": [
            "--nthreads",
            "1",
            "--lifetime",
            f"{life}s",
            "--lifetime-stagger",
            f"{stagger}s",
        ],
    }
    if kind == "pbs":
        spec = f"select=1:ncpus={cluster.job_cores}:mem={_pbs_memory(cluster.job_memory)}"
        if cluster.gpus_per_job:
            spec += f":ngpus={cluster.gpus_per_job}"
        kwargs["resource_spec"] = spec
    return kwargs


def _pbs_memory(size: str) -> str:
    """A size as PBS writes it (whole gigabytes or megabytes)."""
    value = parse_bytes(size)
    if value % 2**30 == 0:
        return f"{value // 2**30}gb"
    return f"{-(-value // 2**20)}mb"


def make_cluster(cluster: ClusterConfig, log_dir: str, dashboard: bool) -> Any:
    """The dask-jobqueue cluster of the run: its scheduler runs here, no job is submitted yet."""
    cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}
    with dask.config.set({"distributed.deploy.lost-worker-timeout": LOST_WORKER_TIMEOUT}):
        return cls[cluster.effective_kind](
            scheduler_options={"dashboard": dashboard, "dashboard_address": ":0"},
            **job_kwargs(cluster, log_dir),
        )


def enter_runner(cluster: ClusterConfig, log_dir: str, stack: Any) -> Any:
    """``cluster.kind=slurm-runner``: this srun task's part of the cluster (dask-jobqueue's
    SLURMRunner). Rank 0 runs the scheduler and ranks 2.. a worker until the run on rank 1
    closes it; then they leave with exit 0, so only rank 1 returns from here (the runner)."""
    os.makedirs(log_dir, exist_ok=True)
    previous = signal.getsignal(signal.SIGINT)
    # The runner ends the scheduler's and the workers' ranks with a SIGINT to themselves.
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    runner = stack.enter_context(
        SLURMRunner(
            scheduler_file=os.path.join(log_dir, "scheduler-{job_id}.json"),
            scheduler_options={
                "dashboard": cluster.dashboard,
                "dashboard_address": ":0",
                "idle_timeout": RUNNER_IDLE_TIMEOUT,
            },
            worker_options={
                "nthreads": 1,  # one shard at a time per worker
                "death_timeout": parse_timedelta(cluster.death_timeout),
            },
        )
    )
    signal.signal(signal.SIGINT, previous)  # rank 1: Ctrl-C is Ctrl-C again
    return runner


def test_submission(cluster: ClusterConfig, script: str) -> None:
    """Let SLURM judge the job script without running it (``sbatch --test-only``).

    A partition, account, GPU request or size the cluster cannot give is refused here with
    SLURM's own words, before any job is queued. PBS has no such dry run.
    """
    if cluster.effective_kind != "slurm":
        return
    result = subprocess.run(
        ["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        said = " ".join(result.stderr.split()) or f"exit code {result.returncode}"
        raise ConfigError(
            f"SLURM refuses the worker job script ({said}); check cluster.queue, "
            "cluster.account, cluster.job_cores, cluster.job_memory, cluster.gpus_per_job and "
            "cluster.job_extra. Nothing was submitted. See the script with --print-job-script"
        )


def live_jobs(kind: str) -> dict[str, str] | None:
    """This user's jobs that the batch scheduler still has (queued or running): id -> state.

    None when it does not answer (then nothing is judged).
    """
    user = getpass.getuser()
    command = {
        "slurm": ["squeue", "-h", "-o", "%i %T", "-u", user],
        "pbs": ["qstat", "-u", user],  # "123.server  user  queue  name ... S ..." lines
    }[kind]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    jobs = {}
    for line in out.splitlines():
        match = re.match(r"\s*(\d+)\S*\s*(.*)$", line)
        if match:
            fields = match.group(2).split()
            state = (
                fields[0] if kind == "slurm" and fields else (fields[-2] if len(fields) > 1 else "")
            )
            jobs[match.group(1)] = state
    return jobs


class JobWatch:
    """Keep ``cluster.jobs`` worker jobs while shards remain (see the module docstring).

    Runs in a thread of the driver. Two kinds of ended jobs are replaced:

    - a job whose worker had connected: the cluster itself drops it once the worker has been
      gone for ``LOST_WORKER_TIMEOUT``; the watch's next ``scale`` submits its replacement
      (under the same name: submitting it earlier would let that drop cancel the new job);
    - a job that ended (or never got an id from the submit command) before its worker
      connected, which the cluster never notices: the watch forgets it and counts a failed
      start. After ``max(3, 2 * cluster.jobs)`` failed starts in a row with no worker up,
      ``failure`` says why and ``on_failure`` is called, so the run stops instead of waiting.
    """

    def __init__(
        self,
        jq: Any,
        cluster: ClusterConfig,
        log_dir: str,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.jq = jq
        self.kind = cluster.effective_kind
        self.jobs = cluster.jobs
        self.log_dir = log_dir
        self.on_failure = on_failure
        self.failure: str | None = None
        self.failed_starts = 0  # jobs in a row that ended before a worker connected
        # ids of jobs whose workers have connected, noted by the scheduler as each arrives (a
        # look every few seconds could miss a job preempted soon after it connected)
        self.connected: set[str] = set()
        self._seen: set[str] = set()  # the part of ``connected`` the last look had seen
        self._unsubmitted: dict[str, float] = {}  # job name -> when first seen without an id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-watch", daemon=True)

    def start(self) -> JobWatch:
        self.jq.scheduler.add_plugin(_Arrivals(self.jq, self.connected), name="job-arrivals")
        self.jq.scale(jobs=self.jobs)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop replacing jobs (the shards are done, or the run is ending)."""
        self._stop.set()
        self._thread.join(timeout=POLL_SECONDS * 4)

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            try:
                self.check()
            except Exception as err:  # the watch must never take the run down with it
                log.warning("worker-job watch: %s", err)

    def _connected_jobs(self) -> set[str]:
        """Names of the jobs (``cluster.workers`` keys) with a worker connected now."""
        names = {w["name"] for w in self.jq.scheduler_info.get("workers", {}).values()}
        up = set()
        for job, spec in list(self.jq.worker_spec.items()):
            if any(f"{job}{suffix}" in names for suffix in spec.get("group", [""])):
                up.add(job)
        return up

    def describe(self) -> str:
        """The jobs and their states, for progress lines."""
        live = live_jobs(self.kind) or {}
        ids = [getattr(job, "job_id", None) for job in self.jq.workers.values()]
        states = ", ".join(f"{i} {live.get(i, 'ended') if i else 'submitting'}" for i in ids)
        return f"{len(ids)} worker jobs ({states}); logs in {self.log_dir}"

    def check(self) -> None:
        """One look at the jobs: forget those that ended unseen, then scale back up."""
        if self.failure is not None:
            return
        live = live_jobs(self.kind)
        if live is None:
            return
        up = self._connected_jobs()
        if self.connected - self._seen:  # a worker arrived since the last look
            self._seen |= self.connected
            self.failed_starts = 0
        now = time.monotonic()
        unseen = []
        for name, job in list(self.jq.workers.items()):
            job_id = getattr(job, "job_id", None)
            if job_id is None:  # still submitting, or the submit command failed
                if now - self._unsubmitted.setdefault(name, now) > SUBMIT_GRACE_SECONDS:
                    unseen.append((name, "was not submitted"))
            elif job_id not in live and job_id not in self.connected:
                unseen.append((name, f"{job_id} ended before its worker connected"))
        if unseen:
            for name, what in unseen:
                log.warning("worker job %s (%s); submitting another", what, name)
                self._unsubmitted.pop(name, None)
            self.failed_starts += len(unseen)
            self.jq.sync(_forget, self.jq, [name for name, _ in unseen])
        if self.failed_starts >= max(3, FAILED_STARTS_PER_JOB * self.jobs) and not up:
            self.failure = (
                f"{self.failed_starts} worker jobs in a row ended before their worker "
                f"connected and no worker is left (see the job logs in {self.log_dir})"
            )
            log.error("%s", self.failure)
            if self.on_failure is not None:
                self.on_failure(self.failure)
            return
        self.jq.scale(jobs=self.jobs)  # submits what the cluster or the watch dropped


class _Arrivals(SchedulerPlugin):
    """Adds to ``job_ids`` the batch job id of every worker that connects to the scheduler."""

    def __init__(self, jq: Any, job_ids: set[str]) -> None:
        self.jq = jq
        self.job_ids = job_ids

    def add_worker(self, scheduler: Any, worker: str) -> None:
        name = str(scheduler.workers[worker].name)
        for job, spec in list(self.jq.worker_spec.items()):
            if name in {f"{job}{suffix}" for suffix in spec.get("group", [""])}:
                job_id = getattr(self.jq.workers.get(job), "job_id", None)
                if job_id:
                    self.job_ids.add(job_id)


async def _forget(jq: Any, names: list[str]) -> None:
    """Drop jobs the cluster never heard from (on its event loop), so ``scale`` resubmits."""
    for name in names:
        job = jq.workers.pop(name, None)
        if job is not None:
            try:
                await job.close()  # scancel/qdel: harmless for a job that is gone
            except Exception as err:
                log.debug("closing job %s: %s", name, err)
