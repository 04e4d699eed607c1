"""Stage 2: tokenize image shards at K view seeds on Dask into a token dataset (docs/design.md §2-§4).

``pipeline run stage=tokenize images=<shards> tokenizer=<ckpt> out_dir=<dir>`` runs
:func:`tokenize`. The driver (this process) lists the image shards, checks the tokenizer against
the view size, skips the shards that already have a valid receipt, submits one Dask task per
remaining shard and assembles ``manifest.json`` from the receipts at the end.

Each task (:func:`tokenize_shard`, on a worker) reads one image shard, decodes every image once,
renders its K views (one per seed) from that decode, tokenizes the views in batches and writes the
shard's files and then its receipt (``shards.writer.write_shard``). Decoding runs in a small
prefetch thread so it overlaps the tokenizer's forward pass.

Where work runs and what it holds:

- The tokenizer is loaded once per worker process by :class:`TokenizerPlugin` (a Dask worker
  plugin) into worker-local state; tasks only carry its path and fingerprint, never the weights.
  A worker that (re)starts later loads it on its first task through the same cache.
- GPU workers are pinned one per device (worker name modulo the device count); ``precision=auto``
  means fp32 on CPU and bf16 autocast on GPU, and the manifest records what was used.
- Dask runs one task at a time per worker (``nthreads=1``): memory per worker is bounded by one
  shard, whatever the corpus size; ``cluster.threads_per_worker`` sets torch's intra-op threads.

Failure model: a bad image is skipped and listed in the receipt; a bad shard (``BadShard``) fails
that shard alone without retries (it is deterministic); any other exception is retried
``cluster.retries`` times by Dask, then reported. The run returns ``exit_code=1`` naming the failed
shards; rerunning the same command redoes only shards without a valid receipt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import yaml
from distributed.diagnostics.plugin import WorkerPlugin

from engine.config import ConfigError, StageConfig, to_dict
from engine.layout import DEMO, RUNS
from shards.views import AugConfig

if TYPE_CHECKING:
    import torch
    from distributed import Client

    from shards.images import ImageShard
    from tokenize_corpus.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
# Config keys that shape the bytes of the dataset: a rerun into an existing out_dir must agree on
# them, or it would mix two datasets. batch_size and cluster only change speed.
OUTPUT_KEYS = ("images", "tokenizer", "seeds", "aug", "formats", "shard_size", "precision")


@dataclass(frozen=True)
class ClusterConfig:
    """Where the tasks run: an existing Dask scheduler, or a LocalCluster started for the run."""

    address: str | None = None  # "tcp://host:8786" = use that scheduler; null = LocalCluster
    n_workers: int = 2  # LocalCluster worker processes (one task at a time each)
    threads_per_worker: int = 1  # torch intra-op threads in each worker
    memory_limit: str = "auto"  # per LocalCluster worker, e.g. "4GiB"; "0" = no limit
    retries: int = 2  # Dask retries of a failed shard task (BadShard is never retried)
    dashboard: bool = True  # serve the Dask dashboard (needs bokeh) and log its link
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: one GPU per worker when there are GPUs


@dataclass(frozen=True)
class TokenizeConfig(StageConfig):
    """Stage 2: tokenize image shards at K view seeds into a token dataset."""

    images: str = ""  # folder, tar shards (brace pattern / glob / comma list), parquet; fsspec ok
    tokenizer: str = ""  # VQ-KD checkpoint (ours or official); local path or fsspec URL
    out_dir: str = RUNS.tokenize  # the token dataset root; local path or fsspec URL
    seeds: tuple[int, ...] = (0, 1, 2, 3)  # one view per seed per image
    aug: AugConfig = field(default_factory=AugConfig)  # aug.size must equal the tokenizer's
    formats: tuple[str, ...] = ("parquet", "webdataset")
    batch_size: int = 64  # views per tokenizer forward
    shard_size: int = 256  # images per shard, for folder sources (tar/parquet: one shard per file)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: fp32 on CPU, bf16 on GPU
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    presets: ClassVar[dict[str, dict]] = {
        "demo": {
            "images": DEMO.pack_shards,
            "tokenizer": DEMO.tokenizer,
            "out_dir": DEMO.tokenize,
            "aug": {"size": 96},  # the demo tokenizer's image size
            "batch_size": 32,
            "cluster": {"n_workers": 2},
        },
        "base": {
            "seeds": [0, 1, 2, 3],
            "aug": {"size": 224},
            "batch_size": 64,
            "shard_size": 1000,
        },
    }


@dataclass(frozen=True)
class ShardJob:
    """What a shard task needs besides its shard: small, shipped with every task."""

    out_dir: str
    num_shards: int
    seeds: tuple[int, ...]
    aug: AugConfig
    formats: tuple[str, ...]
    batch_size: int
    precision: Literal["fp32", "bf16"]  # resolved
    tokenizer: str  # path/URL: workers load it themselves
    fingerprint: str  # the driver's view of the weights; a worker refuses different ones
    device: Literal["auto", "cpu", "cuda"]
    threads: int


# ---- worker side -------------------------------------------------------------------------------

# Worker-local state: one tokenizer per worker process, keyed by (path, fingerprint, device).
_WORKER: dict[str, Any] = {}
_WORKER_LOCK = threading.Lock()


def _pick_device(preference: str, worker_name: Any) -> str:
    """cpu, or the GPU this worker is pinned to (worker name modulo the device count)."""
    import torch

    if preference == "cpu" or not torch.cuda.is_available():
        if preference == "cuda":
            raise RuntimeError("cluster.device=cuda but this worker sees no GPU; use device=auto")
        return "cpu"
    count = torch.cuda.device_count()
    # LocalCluster names workers 0..n-1; external workers are usually started one per GPU with
    # CUDA_VISIBLE_DEVICES already set (count == 1), so any other name maps to device 0.
    index = int(worker_name) % count if str(worker_name).isdigit() else 0
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def worker_tokenizer(job: ShardJob, worker_name: Any = None) -> Tokenizer:
    """The tokenizer of this worker process, loaded on first use and kept for later tasks."""
    key = (job.tokenizer, job.fingerprint, job.device)
    with _WORKER_LOCK:
        if _WORKER.get("key") == key:
            return _WORKER["tokenizer"]
        import torch

        from tokenize_corpus.tokenizer import load_tokenizer

        torch.set_num_threads(max(1, job.threads))
        if worker_name is None:
            worker_name = _worker_name()
        device = _pick_device(job.device, worker_name)
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
        from distributed import get_worker

        return get_worker().name
    except ValueError:  # not inside a worker (in-process use)
        return 0


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


_DONE = object()


def _prefetch(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run ``items`` in a background thread, ``depth`` items ahead (decode overlaps encode).

    PIL decoding and resizing release the GIL, so this overlaps with the tokenizer's forward.
    Exceptions in the thread are re-raised here, in order.
    """
    buffer: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(("done", _DONE))
        except BaseException as err:  # handed to the consumer, which re-raises it
            buffer.put(("error", err))

    thread = threading.Thread(target=produce, name="decode-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = buffer.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join(timeout=5)


def _decoded_views(shard: ImageShard, job: ShardJob, digest: Any) -> Iterator[tuple]:
    """Per record, in shard order: ("row", key, label, views, pixels [K,3,S,S], image sha256) or
    ("skip", key, why).

    Each image is decoded once and its K views are rendered from that decode (docs/design.md §2).
    ``digest`` is fed every record so the receipt carries a checksum of what was read.
    """
    import torch

    from shards.decode import BadImage, decode_image
    from shards.images import iter_shard
    from shards.views import render_view, sample_view

    seen: set[str] = set()
    for record in iter_shard(shard):
        digest.update(f"{record.key}\0{len(record.data)}\0".encode())
        digest.update(record.data)
        if record.error:
            yield ("skip", record.key, record.error)
            continue
        if record.key in seen:
            yield ("skip", record.key, "duplicate key (first occurrence kept)")
            continue
        seen.add(record.key)
        if not record.key or "." in record.key:
            # WebDataset splits member names at the key's first dot: such a key cannot be stored.
            yield ("skip", record.key, "key is empty or contains '.'")
            continue
        try:
            image = decode_image(record.data)
        except BadImage as err:
            yield ("skip", record.key, str(err))
            continue
        views = [sample_view(job.aug, record.key, s, image.width, image.height) for s in job.seeds]
        pixels = torch.stack([render_view(image, v) for v in views])  # [K, 3, S, S] uint8
        yield ("row", record.key, record.label, views, pixels, record.sha256)


def _image_shard_info(shard: ImageShard, records_sha256: str, records: int) -> dict:
    """Facts about the image shard for the receipt: kind, record count/checksum, file size/sha256."""
    info: dict[str, Any] = {
        "kind": shard.kind,
        "records": records,
        "records_sha256": records_sha256,
    }
    if shard.kind == "folder":
        return info
    import fsspec

    fs, path = fsspec.core.url_to_fs(shard.url)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    info.update(size=int(fs.size(path)), sha256=digest.hexdigest())
    return info


def encode_views(tokenizer: Tokenizer, pixels: torch.Tensor, precision: str) -> torch.Tensor:
    """uint8 views [B, 3, S, S] -> tokens [B, N] int64 on CPU (bf16 autocast on GPU if asked)."""
    import torch

    from shards.views import to_unit

    device = tokenizer.device
    with torch.inference_mode():
        unit = to_unit(pixels.to(device, non_blocking=True))  # [B, 3, S, S] in [0, 1]
        if precision == "bf16":
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                tokens = tokenizer.encode(unit)
        else:
            tokens = tokenizer.encode(unit)
    return tokens.cpu()  # [B, N]


def tokenize_shard(shard: ImageShard, job: ShardJob) -> dict:
    """One Dask task: tokenize image shard ``shard`` and write its files + receipt.

    Returns ``{"index", "name", "receipt", "rows", "skipped", "views", "seconds", ...}``, or
    ``{"index", "name", "failed": reason}`` for a bad shard (deterministic: not worth a retry).
    """
    import numpy as np
    import torch

    from shards.images import BadShard
    from shards.writer import TokenRow, write_shard

    start = time.perf_counter()
    tokenizer = worker_tokenizer(job)
    k, num_tokens = len(job.seeds), tokenizer.grid[0] * tokenizer.grid[1]
    rows: list[TokenRow] = []
    skipped: list[tuple[str, str]] = []
    pending: list[tuple[TokenRow, int, torch.Tensor]] = []  # views waiting for a full batch
    encode_seconds = 0.0
    records = 0

    def flush(count: int) -> None:
        nonlocal encode_seconds
        batch, pending[:] = pending[:count], pending[count:]
        tick = time.perf_counter()
        tokens = encode_views(tokenizer, torch.stack([p for _, _, p in batch]), job.precision)
        encode_seconds += time.perf_counter() - tick
        tokens = tokens.numpy().astype(np.uint16)  # [B, N]; codebook < 65536 checked by driver
        for (row, seed_position, _), row_tokens in zip(batch, tokens, strict=True):
            row.tokens[seed_position] = row_tokens

    digest = hashlib.sha256()
    # Enough decoded images ahead to fill about two batches.
    depth = max(2, 2 * job.batch_size // k)
    try:
        for item in _prefetch(_decoded_views(shard, job, digest), depth):
            records += 1
            if item[0] == "skip":
                skipped.append((item[1], item[2]))
                continue
            _, key, label, views, pixels, image_sha256 = item
            row = TokenRow(
                key=key,
                label=int(label),
                views=views,
                tokens=np.zeros((k, num_tokens), np.uint16),
                image_sha256=image_sha256,
            )
            rows.append(row)
            pending.extend((row, position, pixels[position]) for position in range(k))
            while len(pending) >= job.batch_size:
                flush(job.batch_size)
    except BadShard as err:
        log.warning("%s (%s) is a bad shard: %s", shard.name, shard.url, err)
        return {"index": shard.index, "name": shard.name, "failed": f"bad shard {shard.url}: {err}"}
    if pending:
        flush(len(pending))
    info = _image_shard_info(shard, digest.hexdigest(), records)
    receipt = write_shard(
        job.out_dir,
        shard.index,
        job.num_shards,
        shard.url,
        job.seeds,
        rows,
        skipped,
        job.formats,
        tokenizer=tokenizer.describe(),
        num_tokens=num_tokens,
        image_shard_info=info,
    )
    return {
        "index": shard.index,
        "name": shard.name,
        "receipt": receipt,
        "rows": len(rows),
        "skipped": len(skipped),
        "views": len(rows) * k,
        "seconds": time.perf_counter() - start,
        "encode_seconds": encode_seconds,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (MiB); Linux reports ru_maxrss in KiB."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


# ---- driver side -------------------------------------------------------------------------------


def _check_config(cfg: TokenizeConfig) -> None:
    from shards.schema import FORMATS

    if not cfg.images:
        raise ConfigError("images is empty; pass images=<folder, tar shards or parquet files>")
    if not cfg.tokenizer:
        raise ConfigError(
            "tokenizer is empty; pass tokenizer=<VQ-KD checkpoint (stage vqkd output)>"
        )
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"seeds={list(cfg.seeds)} must be a non-empty list of distinct integers")
    if not cfg.formats or set(cfg.formats) - set(FORMATS):
        raise ConfigError(f"formats={list(cfg.formats)}: choose one or more of {list(FORMATS)}")
    if cfg.batch_size < 1 or cfg.shard_size < 1 or cfg.cluster.n_workers < 1:
        raise ConfigError("batch_size, shard_size and cluster.n_workers must be positive")
    if cfg.cluster.retries < 0:
        raise ConfigError("cluster.retries must be >= 0")


def _output_settings(values: dict) -> dict:
    return {k: values.get(k) for k in OUTPUT_KEYS}


def _write_config(cfg: TokenizeConfig) -> None:
    """Save config.yaml in out_dir, refusing an out_dir that holds a dataset made differently."""
    from shards.manifest import dataset_fs, join

    fs, root = dataset_fs(cfg.out_dir)
    path = join(root, CONFIG_NAME)
    new = to_dict(cfg)
    if fs.exists(path):
        with fs.open(path, "rb") as f:
            old = yaml.safe_load(f.read()) or {}
        before, now = _output_settings(old), _output_settings(new)
        changed = [k for k in OUTPUT_KEYS if before[k] != now[k]]
        if changed:
            detail = "; ".join(f"{k}: {before[k]!r} before, {now[k]!r} now" for k in changed)
            raise ConfigError(
                f"out_dir={cfg.out_dir} already holds a token dataset made with other settings "
                f"({detail}); use a new out_dir, or delete the old one to start over"
            )
    text = yaml.safe_dump(new, sort_keys=False).encode()
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(path, text)


def _check_manifest_fingerprint(cfg: TokenizeConfig, fingerprint: str) -> None:
    """Refuse an out_dir whose manifest names other tokenizer weights (same path, new file)."""
    from shards.manifest import dataset_fs, join, read_json
    from shards.schema import MANIFEST_NAME

    fs, root = dataset_fs(cfg.out_dir)
    path = join(root, MANIFEST_NAME)
    if not fs.exists(path):
        return
    old = read_json(fs, path).get("fingerprint")
    if old and old != fingerprint:
        raise ConfigError(
            f"out_dir={cfg.out_dir} holds tokens from tokenizer {old[:12]} but {cfg.tokenizer} "
            f"is now {fingerprint[:12]}; use a new out_dir"
        )


def _remove_partial_files(out_dir: str) -> int:
    """Delete temporary files left by a killed run (the writer's ``.<name>.<random>.tmp``).

    Only local disks have them: object stores publish whole objects. Their random names would
    otherwise make a resumed dataset differ from an uninterrupted one.
    """
    from shards.manifest import dataset_fs, is_local

    fs, root = dataset_fs(out_dir)
    if not is_local(fs) or not fs.exists(root):
        return 0
    stale = [
        p for p in fs.find(root) if p.rsplit("/", 1)[-1].startswith(".") and p.endswith(".tmp")
    ]
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)
    if stale:
        log.info("removed %d partial files left by an interrupted run", len(stale))
    return len(stale)


def _load_driver_tokenizer(cfg: TokenizeConfig) -> dict:
    """Load the tokenizer once in the driver to check it against the config; return describe()."""
    from tokenize_corpus.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(cfg.tokenizer, device="cpu")
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    if tokenizer.image_size != cfg.aug.size:
        raise ConfigError(
            f"aug.size={cfg.aug.size} does not match the tokenizer's image_size="
            f"{tokenizer.image_size} ({cfg.tokenizer}); set aug.size={tokenizer.image_size}"
        )
    if tokenizer.codebook_size > 65536:
        raise ConfigError(
            f"the tokenizer's codebook_size={tokenizer.codebook_size} does not fit uint16 tokens"
        )
    return tokenizer.describe()


def _local_precision(cfg: TokenizeConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    import torch

    gpu = cfg.cluster.device != "cpu" and torch.cuda.is_available()
    return "bf16" if gpu else "fp32"


def _has_gpu(device: str) -> bool:
    import torch

    return device != "cpu" and torch.cuda.is_available()


def _cluster_precision(cfg: TokenizeConfig, client: Client) -> str:
    """Resolve precision=auto from what the workers have (they may be on other machines)."""
    if cfg.precision != "auto":
        return cfg.precision
    gpus = set(client.run(_has_gpu, cfg.cluster.device).values())
    if len(gpus) > 1:
        raise ConfigError(
            "precision=auto but some workers have GPUs and some do not; set precision=fp32 or bf16"
        )
    return "bf16" if gpus == {True} else "fp32"


@contextlib.contextmanager
def open_client(cluster: ClusterConfig) -> Iterator[Client]:
    """A Client to ``cluster.address``, or to a LocalCluster started (and closed) here."""
    import dask
    from distributed import Client, LocalCluster

    if cluster.address:
        client = Client(cluster.address, timeout="30s")
        try:
            yield client
        finally:
            client.close()
        return
    if cluster.dashboard and importlib.util.find_spec("bokeh") is None:
        log.info("the Dask dashboard needs bokeh (pip install bokeh); running without it")
    memory = 0 if cluster.memory_limit.lower() in ("0", "none", "") else cluster.memory_limit
    # Dask's nannies export MALLOC_TRIM_THRESHOLD_=65536, which also pins glibc's mmap threshold:
    # every activation tensor of the tokenizer's forward is then a fresh mmap, and page faults
    # double. Memory stays flat without it (one shard per task), so workers keep glibc's defaults.
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        local = LocalCluster(
            n_workers=cluster.n_workers,
            threads_per_worker=1,  # one shard at a time per worker: bounded memory, one tokenizer
            processes=True,
            memory_limit=memory,
            dashboard_address=":0" if cluster.dashboard else None,  # a free port, never 8787
            silence_logs=logging.WARNING,
        )
    client = Client(local)
    try:
        yield client
    finally:
        client.close()
        local.close()


def _run_tasks(
    cfg: TokenizeConfig, todo: list[ImageShard], job_fields: dict, client: Client
) -> tuple[dict[int, dict], dict[int, str], str, float]:
    """Submit one task per shard; return (results, failures by shard index, precision, seconds)."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    precision = _cluster_precision(cfg, client)
    job = ShardJob(precision=precision, **job_fields)
    if cfg.cluster.address or (cfg.cluster.dashboard and importlib.util.find_spec("bokeh")):
        log.info("Dask dashboard: %s", client.dashboard_link)
    plugin = TokenizerPlugin(job)
    try:
        client.register_plugin(plugin)
    except Exception as err:  # tasks still load the tokenizer themselves; the error shows there
        log.warning("tokenizer worker plugin failed (%s); workers will load it per task", err)
    run_id = uuid.uuid4().hex[:8]
    start = time.perf_counter()
    futures = [
        client.submit(
            tokenize_shard,
            shard,
            job,
            key=f"tokenize-{shard.name}-{run_id}",
            retries=cfg.cluster.retries,
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
    return results, failed, precision, time.perf_counter() - start


def tokenize(cfg: TokenizeConfig) -> dict:
    """Stage 2 run function: tokenize ``cfg.images`` into the token dataset ``cfg.out_dir``.

    Returns a summary: shards done/failed (with reasons), images, skips, views, paths; its
    ``exit_code`` is 1 when a shard failed (rerun the same command to redo only those).
    """
    from shards.images import list_shards
    from shards.manifest import dataset_fs, join, read_receipt
    from shards.schema import MANIFEST_NAME
    from shards.writer import shard_done, write_manifest

    start = time.perf_counter()
    _check_config(cfg)
    _write_config(cfg)
    shards = list_shards(cfg.images, cfg.shard_size)
    if not shards:
        raise ConfigError(f"no images found at images={cfg.images}")
    tokenizer = _load_driver_tokenizer(cfg)
    _check_manifest_fingerprint(cfg, tokenizer["fingerprint"])
    num_shards = len(shards)
    todo = [s for s in shards if not shard_done(cfg.out_dir, s.index)]
    log.info(
        "%d image shards, %d already done, %d to tokenize",
        num_shards,
        num_shards - len(todo),
        len(todo),
    )

    fs, root = dataset_fs(cfg.out_dir)
    results: dict[int, dict] = {}
    failed: dict[int, str] = {}
    precision = _local_precision(cfg)
    run_seconds = 0.0
    if todo:
        # The dataset is incomplete until every shard is done: withdraw a stale manifest.
        with contextlib.suppress(FileNotFoundError):
            fs.rm(join(root, MANIFEST_NAME))
        _remove_partial_files(cfg.out_dir)
        job_fields = {
            "out_dir": cfg.out_dir,
            "num_shards": num_shards,
            "seeds": tuple(cfg.seeds),
            "aug": cfg.aug,
            "formats": tuple(cfg.formats),
            "batch_size": cfg.batch_size,
            "tokenizer": cfg.tokenizer,
            "fingerprint": tokenizer["fingerprint"],
            "device": cfg.cluster.device,
            "threads": cfg.cluster.threads_per_worker,
        }
        with open_client(cfg.cluster) as client:
            results, failed, precision, run_seconds = _run_tasks(cfg, todo, job_fields, client)

    receipts = []
    for shard in shards:
        if shard.index in failed:
            continue
        receipt = (
            results[shard.index]["receipt"]
            if shard.index in results
            else read_receipt(cfg.out_dir, shard.index)
        )
        if receipt is None:  # done at listing time but gone since: report it, do not guess
            failed[shard.index] = "receipt disappeared during the run"
            continue
        receipts.append(receipt)

    summary: dict[str, Any] = {
        "out_dir": cfg.out_dir,
        "shards": num_shards,
        "shards_tokenized": len(results),
        "shards_already_done": num_shards - len(todo),
        "shards_failed": len(failed),
        "images": sum(r["rows"] for r in receipts),
        "images_skipped": sum(len(r["skipped"]) for r in receipts),
        "views": sum(r["rows"] for r in receipts) * len(cfg.seeds),
        "views_this_run": sum(r["views"] for r in results.values()),
        "precision": precision,
        # Timings of this run's tasks (for benchmarks): submit-to-last-result wall time, summed
        # task time, the tokenizer-forward part of it, and the largest worker peak memory.
        "run_seconds": round(run_seconds, 3),
        "task_seconds": round(sum(r["seconds"] for r in results.values()), 3),
        "encode_seconds": round(sum(r["encode_seconds"] for r in results.values()), 3),
        "worker_peak_rss_mb": max((r["peak_rss_mb"] for r in results.values()), default=None),
    }
    if failed:
        by_name = {s.index: s for s in shards}
        summary["failed"] = {by_name[i].name: failed[i] for i in sorted(failed)}
        summary["exit_code"] = 1
        summary["message"] = (
            f"{len(failed)} of {num_shards} shards failed (see 'failed'); fix them and rerun the "
            "same command: finished shards are kept and only these are redone"
        )
        log.error(summary["message"])
    else:
        info = {
            "tokenizer": tokenizer,
            "tokenizer_source": cfg.tokenizer,
            "teacher": tokenizer.get("teacher"),
            "aug": dataclasses.asdict(cfg.aug),
            "seeds": list(cfg.seeds),
            "precision": precision,
            "images": {"source": cfg.images, "shard_size": cfg.shard_size, "kind": shards[0].kind},
            "num_shards": num_shards,
        }
        write_manifest(cfg.out_dir, receipts, info)
        summary["manifest"] = f"{cfg.out_dir.rstrip('/')}/{MANIFEST_NAME}"
        summary["exit_code"] = 0
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary
