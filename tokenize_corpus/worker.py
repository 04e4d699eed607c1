"""Worker-side state of stage 2: one tokenizer per Dask worker process (docs/design.md §4).

The tokenizer is loaded once per worker process by :class:`TokenizerPlugin` (a Dask worker
plugin) into worker-local state; tasks carry only its path and fingerprint (:class:`ShardJob`),
never the weights. A worker that (re)starts later loads it on its first task through the same
cache. GPU workers are pinned one per device (worker name modulo the device count).
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from engine.precision import resolve_precision
from tokenize_corpus.tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from shards.views import AugConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardJob:
    """What a shard task needs besides its shard: small, shipped with every task."""

    out_dir: str
    num_shards: int
    seeds: tuple[int, ...]
    aug: AugConfig
    formats: tuple[str, ...]
    batch_size: int
    precision: Literal["fp32", "bf16", "fp16"]  # resolved
    tokenizer: str  # path/URL: workers load it themselves
    fingerprint: str  # the driver's view of the weights; a worker refuses different ones
    device: Literal["auto", "cpu", "cuda"]
    threads: int
    # tokenize_corpus.identity.job_identity(...): stored in every receipt
    identity: dict = field(default_factory=dict)


# Worker-local state: one tokenizer per worker process, keyed by (path, fingerprint, device).
_WORKER: dict[str, Any] = {}
_WORKER_LOCK = threading.Lock()


def pick_device(preference: str, worker_name: Any) -> str:
    """cpu, or the GPU this worker is pinned to: its index modulo the visible device count.

    The index is the worker's name for a LocalCluster (0..n-1) or an srun rank, and the
    trailing number of a dask-jobqueue name (``<job>-<i>`` for the i-th worker of a job with a
    GPU per worker). A worker with another name (started by hand, usually one per GPU with
    ``CUDA_VISIBLE_DEVICES`` set) uses device 0.
    """
    if preference == "cpu" or not torch.cuda.is_available():
        if preference == "cuda":
            raise RuntimeError("cluster.device=cuda but this worker sees no GPU; use device=auto")
        return "cpu"
    count = torch.cuda.device_count()
    match = re.fullmatch(r"(?:.*-)?(\d+)", str(worker_name))
    index = int(match.group(1)) % count if match else 0
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def worker_device_precision(requested: str, preference: str) -> str:
    """``requested`` precision resolved on this worker's device (run on each worker)."""
    gpu = preference != "cpu" and torch.cuda.is_available()
    return resolve_precision(requested, "cuda" if gpu else "cpu")


def worker_tokenizer(job: ShardJob, worker_name: Any = None) -> Tokenizer:
    """The tokenizer of this worker process, loaded on first use and kept for later tasks."""
    key = (job.tokenizer, job.fingerprint, job.device)
    with _WORKER_LOCK:
        if _WORKER.get("key") == key:
            return _WORKER["tokenizer"]

        torch.set_num_threads(max(1, job.threads))
        if worker_name is None:
            worker_name = _worker_name()
        device = pick_device(job.device, worker_name)
        resolve_precision(job.precision, device)  # e.g. fp16 on a CPU worker: a clear error
        tokenizer = load_tokenizer(job.tokenizer, device=device)
        if tokenizer.fingerprint != job.fingerprint:
            raise RuntimeError(
                f"tokenizer at {job.tokenizer} changed during the run (fingerprint "
                f"{tokenizer.fingerprint[:12]} on the worker, {job.fingerprint[:12]} in the driver)"
            )
        _WORKER.clear()
        _WORKER.update(key=key, tokenizer=tokenizer, device=device)
        log.info("worker %s: tokenizer %s loaded on %s", worker_name, job.fingerprint[:12], device)
        return tokenizer


def _worker_name() -> Any:
    try:
        return get_worker().name
    except ValueError:  # not inside a worker (in-process use)
        return 0


class IgnoreCtrlC(WorkerPlugin):
    """Local workers share the terminal's process group, so Ctrl-C reaches them too: they leave
    it to the driver, which closes them (else each would print a KeyboardInterrupt traceback)."""

    name = "beitv2-ignore-ctrl-c"

    def setup(self, worker: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


class TokenizerPlugin(WorkerPlugin):
    """Loads the tokenizer into worker-local state when a worker joins (or at registration)."""

    def __init__(self, job: ShardJob) -> None:
        self.job = job
        self.name = f"beitv2-tokenizer-{job.fingerprint[:16]}"

    def setup(self, worker: Any) -> None:
        worker_tokenizer(self.job, worker.name)

    def teardown(self, worker: Any) -> None:
        with _WORKER_LOCK:
            _WORKER.clear()
