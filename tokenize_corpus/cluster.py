"""Stage 2's Dask side: start or join a cluster, resolve precision on it, run the shard tasks.

Dask runs one task at a time per worker (``nthreads=1``): memory per worker is bounded by one
shard, whatever the corpus size; ``cluster.threads_per_worker`` sets torch's intra-op threads.
Dask's own logging is quiet unless ``log_level=info|debug``; this module logs its own progress
(cluster starting, workers up, tokenizer loaded) so the first seconds of a run are not silent.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

from engine.config import ConfigError
from tokenize_corpus.config import ClusterConfig
from tokenize_corpus.shard_task import tokenize_shard
from tokenize_corpus.worker import ShardJob, TokenizerPlugin, worker_device_precision

if TYPE_CHECKING:
    from distributed import Client

    from shards.images import ImageShard

log = logging.getLogger(__name__)

# Loggers of Dask and the libraries it drives, set to the run's log_level.
DASK_LOGGERS = ("distributed", "dask", "bokeh", "tornado")


def set_dask_logging(level: str) -> int:
    """Set Dask's loggers (this process) to ``level``; returns the numeric level."""
    numeric = getattr(logging, level.upper())
    for name in DASK_LOGGERS:
        logging.getLogger(name).setLevel(numeric)
    if numeric >= logging.WARNING:  # bokeh warns about its host wildcard on every start
        logging.getLogger("bokeh").setLevel(logging.ERROR)
    return numeric


@contextlib.contextmanager
def open_client(cluster: ClusterConfig, log_level: str = "warning") -> Iterator[Client]:
    """A Client to ``cluster.address``, or to a LocalCluster started (and closed) here."""
    import dask
    from distributed import Client, LocalCluster

    level = set_dask_logging(log_level)
    if cluster.address:
        log.info("connecting to the Dask scheduler at %s", cluster.address)
        try:
            client = Client(cluster.address, timeout="30s")
        except (OSError, TimeoutError) as err:
            raise ConfigError(
                f"cannot reach the Dask scheduler at cluster.address={cluster.address} ({err}); "
                "check the address, or leave cluster.address unset to start a local cluster"
            ) from None
        try:
            yield client
        finally:
            client.close()
        return
    if cluster.dashboard and importlib.util.find_spec("bokeh") is None:
        log.info("the Dask dashboard needs bokeh (pip install bokeh); running without it")
    memory = 0 if cluster.memory_limit.lower() in ("0", "none", "") else cluster.memory_limit
    log.info("starting a local Dask cluster: %d worker processes", cluster.n_workers)
    start = time.perf_counter()
    # Dask's nannies export MALLOC_TRIM_THRESHOLD_=65536, which also pins glibc's mmap threshold:
    # every activation tensor of the tokenizer's forward is then a fresh mmap, and page faults
    # double. Memory stays flat without it (one shard per task), so workers keep glibc's defaults.
    settings = {
        "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
        "logging.distributed": log_level,  # what the worker processes log
    }
    with dask.config.set(settings):
        local = LocalCluster(
            n_workers=cluster.n_workers,
            threads_per_worker=1,  # one shard at a time per worker: bounded memory, one tokenizer
            processes=True,
            memory_limit=memory,
            dashboard_address=":0" if cluster.dashboard else None,  # a free port, never 8787
            silence_logs=level,
        )
    client = Client(local)
    log.info("%d workers up in %.1f s", cluster.n_workers, time.perf_counter() - start)
    try:
        yield client
    finally:
        client.close()
        local.close()


def cluster_precision(requested: str, device: str, client: Client) -> str:
    """``requested`` resolved on every worker (they may be on other machines); one answer."""
    answers = set(client.run(worker_device_precision, requested, device).values())
    if len(answers) > 1:
        raise ConfigError(
            f"precision={requested} resolves to {sorted(answers)} on different workers (some "
            "have fast half precision, some not); set precision=fp32 or bf16 explicitly"
        )
    if not answers:
        raise ConfigError(f"the Dask cluster at {client.scheduler.address} has no workers")
    return answers.pop()


def run_tasks(
    client: Client,
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
    from distributed import as_completed
    from tqdm.auto import tqdm

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
        bar = tqdm(as_completed(futures), total=len(futures), desc="tokenize", unit="shard")
        for future in bar:
            shard = names[future.key]
            if future.status == "error":
                err = future.exception()
                failed[shard.index] = f"{type(err).__name__}: {err}"
                log.error("%s (%s) failed: %s", shard.name, shard.url, failed[shard.index])
            else:
                result = future.result()
                if "failed" in result:
                    failed[shard.index] = result["failed"]
                else:
                    results[shard.index] = result
                    bar.set_postfix(images=sum(r["rows"] for r in results.values()))
            future.release()
    finally:
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(plugin.name)
    return results, failed, time.perf_counter() - start
