"""Stage 2's Dask side: the cluster of one run, and the tasks it runs (docs/design.md §4).

:class:`DaskCluster` is the cluster of ``cluster.kind`` (``local``, ``address``, ``slurm`` /
``pbs`` through ``tokenize_corpus.batch``, ``slurm-runner`` inside ``srun``: docs/design.md §4,
"Where it runs"), opened for one run and closed with it; it starts on first use
(:meth:`DaskCluster.client`), after every check that needs no cluster has passed, and a run that
can get no worker stops with :class:`ClusterLost` instead of waiting forever.

Each worker runs one task at a time (``nthreads=1``). The tasks are :func:`check_receipts` (does a
finished shard still hold? read on the workers, so the driver never reads image or token bytes)
and :func:`run_tasks` (one :func:`tokenize_corpus.shard_task.tokenize_shard` per shard). Dask's
own logging is quiet unless ``log_level=info|debug``; this module logs its own progress so that
the first seconds of a run are not silent.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import dask
from dask.utils import parse_bytes, parse_timedelta
from distributed import Client, Future, LocalCluster, as_completed
from distributed.core import Status
from tqdm.auto import tqdm

from engine.errors import ConfigError
from engine.launch import is_srun_task
from shards.dataset import TokenDatasetDir
from shards.records import ImageShard
from tokenize_corpus import batch
from tokenize_corpus.config import ClusterConfig
from tokenize_corpus.resume import check_receipt
from tokenize_corpus.shard_task import tokenize_shard
from tokenize_corpus.worker import (
    IgnoreCtrlC,
    ShardJob,
    TokenizerPlugin,
    worker_device_precision,
)

log = logging.getLogger(__name__)

# Loggers of Dask and the libraries it drives, set to the run's log_level.
DASK_LOGGERS = ("distributed", "dask", "bokeh", "tornado", "dask_jobqueue")
# How often a wait for workers says what it waits for.
WAIT_REPORT_SECONDS = 30.0
# How often IdleWatch looks at the workers; a worker counts as working once two looks in a row
# find it up (one that dies within seconds of starting, look after look, runs nothing).
IDLE_LOOK_SECONDS = 2.0
# A local nanny in one of these states starts no worker again.
NANNY_GAVE_UP = (Status.closed, Status.failed)


class ClusterLost(RuntimeError):
    """No worker is left and none can be started; finished shards are kept (a rerun resumes)."""


def set_dask_logging(level: str) -> int:
    """Set Dask's loggers (this process) to ``level``; returns the numeric level."""
    numeric = getattr(logging, level.upper())
    for name in DASK_LOGGERS:
        logging.getLogger(name).setLevel(numeric)
    if numeric >= logging.WARNING:  # bokeh warns about its host wildcard on every start
        logging.getLogger("bokeh").setLevel(logging.ERROR)
    return numeric


def log_dir(cluster: ClusterConfig, out_dir: str) -> str:
    """Where worker job logs, the job script and the scheduler file go (``cluster.log_dir``)."""
    if cluster.log_dir:
        return os.path.abspath(os.path.expanduser(cluster.log_dir))
    if "://" in out_dir and not out_dir.startswith("file://"):
        return os.path.abspath("dask-logs")  # an object-store dataset: a folder here
    return os.path.join(out_dir.removeprefix("file://"), "logs")


def check_settings(cluster: ClusterConfig, submitting: bool = True) -> None:
    """The cluster settings, checked before anything starts (ConfigError); ``submitting``:
    see ``tokenize_corpus.batch.check_settings``."""
    kind = cluster.effective_kind
    if cluster.address and kind != "address":
        raise ConfigError(
            f"cluster.address={cluster.address} is only used with cluster.kind=address (this run "
            f"has cluster.kind={kind}); drop one of them"
        )
    if kind == "address" and not cluster.address:
        raise ConfigError("cluster.kind=address needs cluster.address=tcp://<host>:<port>")
    limit = cluster.memory_limit.strip().lower()
    if limit not in ("auto", "0", "none", ""):
        try:
            size = parse_bytes(limit)
        except ValueError:
            size = 0
        if size <= 0:
            raise ConfigError(
                f"cluster.memory_limit={cluster.memory_limit!r} is not a size; write it like 4GiB "
                "(per worker), auto (share this machine's memory) or 0 (no limit)"
            )
    for key in ("death_timeout", "no_worker_timeout"):
        try:
            parse_timedelta(getattr(cluster, key))
        except (ValueError, KeyError):
            raise ConfigError(
                f"cluster.{key}={getattr(cluster, key)!r} is not a duration; write it like 60s "
                "or 10m"
            ) from None
    if cluster.batch:
        batch.check_settings(cluster, submitting)
    if kind == "slurm-runner":
        tasks = int(os.environ.get("SLURM_NTASKS") or 0) if is_srun_task(os.environ) else 0
        if tasks < 3:
            found = f"{tasks} tasks" if tasks else "no srun step"
            raise ConfigError(
                "cluster.kind=slurm-runner runs inside `srun -n N pipeline run stage=tokenize "
                f"...` with N >= 3 (rank 0 the scheduler, rank 1 the run, ranks 2.. workers); "
                f"found {found}. To submit worker jobs from a login node use cluster.kind=slurm"
            )


class DaskCluster:
    """The Dask cluster of one stage-2 run (see the module docstring); a context manager."""

    def __init__(self, cluster: ClusterConfig, log_dir: str, log_level: str = "warning") -> None:
        self.cfg = cluster
        self.kind = cluster.effective_kind
        self.log_dir = log_dir
        self.log_level = log_level
        self.lost: str | None = None  # why no worker can be had, once a watch gave up
        self.pending: set[Future] = set()  # futures a lost cluster cancels
        self._watch: Any = None  # batch.JobWatch or IdleWatch
        self._runner: Any = None
        self._client: Client | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> DaskCluster:
        if self.kind == "slurm-runner":
            self._enter_runner()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._watch is not None:
            self._watch.stop()
        self._stack.close()

    def client(self) -> Client:
        """The client, starting (or joining) the cluster on the first call."""
        if self._client is None:
            set_dask_logging(self.log_level)
            start: dict[str, Callable[[], Client]] = {
                "local": self._start_local,
                "address": self._start_address,
                "slurm": self._start_batch,
                "pbs": self._start_batch,
                "slurm-runner": self._start_runner_client,
            }
            self._client = start[self.kind]()
        return self._client

    # ---- the kinds -----------------------------------------------------------------------------

    def _start_local(self) -> Client:
        cluster = self.cfg
        if cluster.dashboard and importlib.util.find_spec("bokeh") is None:
            log.info("the Dask dashboard needs bokeh (pip install bokeh); running without it")
        memory = 0 if cluster.memory_limit.lower() in ("0", "none", "") else cluster.memory_limit
        log.info("starting a local Dask cluster: %d worker processes", cluster.n_workers)
        tick = time.perf_counter()
        # Dask's nannies export MALLOC_TRIM_THRESHOLD_=65536, which also pins glibc's mmap
        # threshold: every activation tensor of the tokenizer's forward is then a fresh mmap,
        # and page faults double. Memory stays flat without it (one shard per task), so local
        # workers keep glibc's defaults.
        settings = {
            "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
            "logging.distributed": self.log_level,  # what the worker processes log
        }
        try:
            with dask.config.set(settings):
                local = LocalCluster(
                    n_workers=cluster.n_workers,
                    threads_per_worker=1,  # one shard at a time per worker
                    processes=True,
                    memory_limit=memory,
                    dashboard_address=":0" if cluster.dashboard else None,  # never 8787
                    silence_logs=set_dask_logging(self.log_level),
                )
        except (RuntimeError, OSError) as err:  # a worker died while starting (the log says why)
            raise ClusterLost(f"the local Dask cluster could not start a worker ({err})") from None
        self._stack.enter_context(local)
        client = self._stack.enter_context(Client(local))
        with contextlib.suppress(OSError):  # a worker died meanwhile: the next ones get it
            client.register_plugin(IgnoreCtrlC())
        log.info("%d workers up in %.1f s", cluster.n_workers, time.perf_counter() - tick)
        self._watch_idle(client, local)
        return client

    def _start_address(self) -> Client:
        address = self.cfg.address
        log.info("connecting to the Dask scheduler at %s", address)
        try:
            client = Client(address, timeout="30s")
        except (OSError, TimeoutError) as err:
            raise ConfigError(
                f"cannot reach the Dask scheduler at cluster.address={address} ({err}); check the "
                "address, or leave cluster.address unset to start a local cluster"
            ) from None
        self._stack.enter_context(client)
        self._watch_idle(client)
        return client

    def _start_batch(self) -> Client:
        """Start the scheduler, write and test the job script, submit the jobs, watch them."""
        os.makedirs(self.log_dir, exist_ok=True)
        jq = batch.make_cluster(self.cfg, self.log_dir, self.cfg.dashboard)
        self._stack.callback(jq.close)  # cancels every job, whatever ends the run
        script = Path(self.log_dir) / "job-script.sh"
        script.write_text(jq.job_script())
        batch.test_submission(self.cfg, jq.job_script())
        log.info(
            "submitting %d %s worker jobs (%d cores, %s%s, walltime %s); job script %s, logs in %s",
            self.cfg.jobs,
            self.kind.upper(),
            self.cfg.job_cores,
            self.cfg.job_memory,
            f", {self.cfg.gpus_per_job} GPUs" if self.cfg.gpus_per_job else "",
            self.cfg.walltime,
            script,
            self.log_dir,
        )
        client = self._stack.enter_context(Client(jq))
        self._watch = batch.JobWatch(jq, self.cfg, self.log_dir, self._give_up).start()
        return client

    def _enter_runner(self) -> None:
        """slurm-runner: every rank enters; ranks other than 1 serve, then leave (exit 0)."""
        self._runner = batch.enter_runner(self.cfg, self.log_dir, self._stack)

    def _start_runner_client(self) -> Client:
        client = self._stack.enter_context(Client(self._runner))
        self._watch_idle(client)
        return client

    def _watch_idle(self, client: Client, local: LocalCluster | None = None) -> None:
        timeout = parse_timedelta(self.cfg.no_worker_timeout)
        self._watch = IdleWatch(client, timeout, self._give_up, local).start()

    def _give_up(self, why: str) -> None:
        """A watch found no worker can be had: cancel what is pending so every wait ends."""
        self.lost = why
        if self._client is not None and self.pending:
            with contextlib.suppress(Exception):
                self._client.cancel(list(self.pending))

    # ---- waiting -------------------------------------------------------------------------------

    def wait_for_workers(self) -> None:
        """Block until a worker is up, saying every 30 s what the run waits for."""
        client = self.client()
        start = last = time.perf_counter()
        while not client.scheduler_info().get("workers"):
            if self.lost:
                raise ClusterLost(self.lost)
            if time.perf_counter() - last > WAIT_REPORT_SECONDS:
                last = time.perf_counter()
                log.info("waiting for workers (%.0f s so far): %s", last - start, self._jobs())
            time.sleep(0.5)

    def _jobs(self) -> str:
        if isinstance(self._watch, batch.JobWatch):
            return self._watch.describe()
        return "no worker connected yet"

    @contextlib.contextmanager
    def tracking(self, futures: Sequence[Future]) -> Iterator[None]:
        """While inside, a lost cluster cancels ``futures`` (their waits then end)."""
        self.pending.update(futures)
        if self.lost:
            self._give_up(self.lost)
        try:
            yield
        finally:
            self.pending.difference_update(futures)


class IdleWatch:
    """Ends a run that has had no working worker for ``timeout`` seconds (kinds ``local``,
    ``address``, ``slurm-runner``); on a ``local`` cluster it also starts again the workers
    whose nanny gave up.

    A worker is working when two looks in a row find it up and running (not paused by memory).
    A local nanny gives up on its worker when the worker dies while starting (the nanny closes),
    and the LocalCluster closes a nanny whose worker has been gone for
    ``distributed.deploy.lost-worker-timeout`` (15 s) without starting another one: workers
    killed again and again would otherwise leave the run waiting, without a word, for ever.
    """

    def __init__(
        self,
        client: Client,
        timeout: float,
        on_failure: Callable[[str], None],
        local: LocalCluster | None = None,
    ) -> None:
        self.client = client
        self.timeout = timeout
        self.on_failure = on_failure
        self.local = local
        self._n_workers = len(local.worker_spec) if local is not None else 0
        self._next_name = self._n_workers  # local workers are named 0, 1, ...
        self._starting: set[int] = set()  # names of new local workers not up yet
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="idle-watch", daemon=True)

    def start(self) -> IdleWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        since = time.monotonic()
        up: set[str] = set()
        while not self._stop.wait(IDLE_LOOK_SECONDS):
            if self.local is not None:
                with contextlib.suppress(Exception):  # the cluster is closing
                    self.local.loop.add_callback(self._refill)
            try:
                workers = self.client.scheduler_info()["workers"]
            except Exception:  # the scheduler is unreachable: no worker either
                workers = {}
            before, up = up, {a for a, w in workers.items() if w.get("status") == "running"}
            if up & before:
                since = time.monotonic()
            elif time.monotonic() - since > self.timeout:
                self.on_failure(
                    f"the Dask cluster has had no working worker for {self.timeout:.0f} s"
                )
                return

    def _refill(self) -> None:
        """Start a new local worker for each one whose nanny gave up. Runs on the cluster's event
        loop, where the LocalCluster keeps its own books; the new worker gets a name never used,
        as the old nanny may still be closing a worker of the old name."""
        local = self.local
        assert local is not None
        self._starting -= local.workers.keys()
        gone = [
            name
            for name in local.worker_spec
            if (name in local.workers and local.workers[name].status in NANNY_GAVE_UP)
            or (name not in local.workers and name not in self._starting)
        ]
        for name in gone:
            new, self._next_name = self._next_name, self._next_name + 1
            log.warning(
                "local worker %s was not restarted by its nanny; starting worker %s instead",
                name,
                new,
            )
            local.worker_spec[new] = local.worker_spec.pop(name)
            self._starting.add(new)
        if gone:
            # closes the nannies of the old names and starts the new ones
            local.scale(self._n_workers)


# ---- what runs on the cluster ------------------------------------------------------------------


def cluster_precision(requested: str, device: str, cluster: DaskCluster) -> str:
    """``requested`` resolved on every worker (they may be on other machines); one answer."""
    client = cluster.client()
    answers: set[str] = set()
    while not answers:
        cluster.wait_for_workers()
        replies = client.run(worker_device_precision, requested, device, on_error="return")
        for reply in replies.values():
            if isinstance(reply, OSError):  # that worker died while asked; the others answer
                continue
            if isinstance(reply, BaseException):
                raise reply
            answers.add(reply)
    if len(answers) > 1:
        raise ConfigError(
            f"precision={requested} resolves to {sorted(answers)} on different workers (some "
            "have fast half precision, some not); set precision=fp32 or bf16 explicitly"
        )
    return answers.pop()


def finished_result(future: Future) -> Any:
    """The result of a finished task; None if it failed or was cancelled (a lost cluster
    cancels what is pending, which may come between a look at the status and the fetch)."""
    if future.status != "finished":
        return None
    try:
        return future.result()
    except CancelledError:
        return None


def check_receipts(
    cluster: DaskCluster,
    dataset: TokenDatasetDir,
    shards: Sequence[ImageShard],
    receipts: dict[int, dict],
) -> dict[int, str]:
    """:func:`tokenize_corpus.resume.check_receipt` of every shard with a receipt, on the
    workers: shard index -> "" (it holds) or why not."""
    todo = [s for s in shards if s.index in receipts]
    if not todo:
        return {}
    client = cluster.client()
    run_id = uuid.uuid4().hex[:8]
    futures = [
        client.submit(
            check_receipt,
            dataset,
            shard,
            receipts[shard.index],
            key=f"check-{shard.name}-{run_id}",
            priority=-shard.index,
            retries=1,
        )
        for shard in todo
    ]
    names = {f.key: s for f, s in zip(futures, todo, strict=True)}
    verdicts: dict[int, str] = {}
    with cluster.tracking(futures):
        bar = tqdm(as_completed(futures), total=len(futures), desc="check", unit="shard")
        for future in bar:
            shard = names[future.key]
            verdict = finished_result(future)
            if verdict is None:
                if cluster.lost:
                    raise ClusterLost(cluster.lost)
                verdicts[shard.index] = f"could not be checked ({future.exception()})"
            else:
                verdicts[shard.index] = verdict
            future.release()
    return verdicts


def run_tasks(
    cluster: DaskCluster,
    todo: list[ImageShard],
    job: ShardJob,
    retries: int,
    dashboard: bool,
    previous: dict[int, dict] | None = None,
) -> tuple[dict[int, dict], dict[int, str], float]:
    """Submit one task per shard; return (results, failures by shard index, seconds).

    ``previous``: receipts to append seeds to, by shard index (``shard_task.tokenize_shard``).
    """
    previous = previous or {}
    client = cluster.client()
    if dashboard and importlib.util.find_spec("bokeh"):
        log.info("Dask dashboard: %s", client.dashboard_link)
    plugin = TokenizerPlugin(job)
    log.info("loading the tokenizer on the workers")
    tick = time.perf_counter()
    try:
        client.register_plugin(plugin)
        log.info("tokenizer loaded on the workers in %.1f s", time.perf_counter() - tick)
    except Exception as err:  # tasks still load the tokenizer themselves; the error shows there
        log.warning("tokenizer worker plugin failed (%s); workers will load it per task", err)
    run_id = uuid.uuid4().hex[:8]
    start = time.perf_counter()
    futures = [
        client.submit(
            tokenize_shard,
            shard,
            job,
            previous.get(shard.index),
            key=f"tokenize-{shard.name}-{run_id}",
            retries=retries,
            priority=-shard.index,  # roughly in shard order, so a killed run leaves a prefix
        )
        for shard in todo
    ]
    names = {f.key: s for f, s in zip(futures, todo, strict=True)}
    results: dict[int, dict] = {}
    failed: dict[int, str] = {}
    try:
        with cluster.tracking(futures):
            bar = tqdm(as_completed(futures), total=len(futures), desc="tokenize", unit="shard")
            for future in bar:
                shard = names[future.key]
                result = finished_result(future)
                if future.status == "error":
                    err = future.exception()
                    failed[shard.index] = f"{type(err).__name__}: {err}"
                    log.error("%s (%s) failed: %s", shard.name, shard.url, failed[shard.index])
                elif result is None:
                    failed[shard.index] = f"not run: {cluster.lost or 'cancelled'}"
                elif "failed" in result:
                    failed[shard.index] = result["failed"]
                else:
                    results[shard.index] = result
                    bar.set_postfix(images=sum(r["rows"] for r in results.values()))
                future.release()
    finally:
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(plugin.name)
    return results, failed, time.perf_counter() - start
