"""Short measurements for ``pipeline plan``, taken in a fresh process shaped like a stage-2 worker.

:func:`measure` runs :func:`child` in a subprocess (``python -m tokenize_corpus.calibrate``) so its
figures are those of a worker, not of the planning process: torch's thread count is the worker's
``cluster.threads_per_worker``, the peak memory is that of a process which imported what a worker
imports, loaded the tokenizer and ran its forward at the job's batch size. It measures:

- the tokenizer forward: one warm-up batch, then ``batches`` timed batches of random views through
  the worker's own encode path at the job's precision (speed does not depend on pixel values);
- decode + render: the first few images of the first image shard (or a synthetic 500x375 JPEG,
  ImageNet's typical size, when only an image count is given), decoded once and rendered at every
  seed, as a task does (docs/design.md §4);
- what a worker pays once: importing the task's modules, and the first (cold) forward batch;
- writing a shard's files and receipt (synthetic rows through the real writer, at the job's
  formats, seeds and grid);
- peak resident memory before and after loading the tokenizer and running the forward.

Only the standard library and ``engine`` are imported at the top: the child times the imports a
worker makes and measures the memory they take, so each function imports what it uses itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from engine.config import from_dict
from engine.errors import UserError

log = logging.getLogger(__name__)

SYNTHETIC_SIZE = (500, 375)  # width, height: a typical ImageNet photo
DECODE_IMAGES = 12  # images decoded for the decode + render figure
WRITE_IMAGES = (8, 64)  # synthetic images in the two shards written for the write figures


@dataclass(frozen=True)
class Request:
    """What the child measures (JSON-able: it travels on the command line)."""

    tokenizer: str
    precision: str  # resolved: fp32 | bf16 | fp16
    device: str  # cpu | cuda
    threads: int
    batch_size: int
    batches: int
    images: str  # "" = synthetic JPEG
    shard_size: int
    seeds: tuple[int, ...]
    aug: dict
    formats: tuple[str, ...]
    barrier: str = ""  # a folder where the processes measured at once meet before timing
    processes: int = 1


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _records(req: Request, count: int) -> list[tuple[str, bytes]]:
    """(key, stored bytes) of up to ``count`` readable images of the first shard, or synthetic."""
    if not req.images:
        import numpy as np  # local: see the module docstring
        from PIL import Image

        rng = np.random.default_rng(0)
        # Smooth noise compresses like a photo; pure noise would make an unusually large JPEG.
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(SYNTHETIC_SIZE, Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        return [(f"synthetic_{i}", buffer.getvalue()) for i in range(count)]
    from shards.images import iter_shard, list_shards  # local: see the module docstring
    from shards.records import BadShard

    shards = list_shards(req.images, req.shard_size)
    out: list[tuple[str, bytes]] = []
    for shard in shards:
        try:
            for record in iter_shard(shard):
                if record.error is None:
                    out.append((record.key, record.data))
                if len(out) >= count:
                    return out
        except BadShard:  # a damaged shard: time the images of the others (stage 2 lists it)
            continue
    return out


def decode_seconds(req: Request) -> tuple[float, int]:
    """Mean seconds to decode one image and render its K views; and how many were timed."""
    import torch  # local: see the module docstring

    from shards.decode import BadImage, decode_image
    from shards.views import AugConfig, render_view, sample_view

    aug = from_dict(AugConfig, req.aug)
    records = _records(req, DECODE_IMAGES)
    timed, seconds = 0, 0.0
    for key, data in records:
        start = time.perf_counter()
        try:
            image = decode_image(data)
        except BadImage:
            continue
        views = [sample_view(aug, key, s, image.width, image.height) for s in req.seeds]
        torch.stack([render_view(image, v) for v in views])
        seconds += time.perf_counter() - start
        timed += 1
    return (seconds / timed if timed else 0.0), timed


def _wait_for_peers(req: Request, timeout: float = 120.0) -> None:
    """Start timing together: each process leaves a file in ``req.barrier`` and waits for all."""
    if not req.barrier or req.processes <= 1:
        return

    tempfile.NamedTemporaryFile(dir=req.barrier, prefix="ready-", delete=False).close()
    deadline = time.monotonic() + timeout
    while len(os.listdir(req.barrier)) < req.processes and time.monotonic() < deadline:
        time.sleep(0.02)


def forward_seconds(req: Request) -> dict[str, float]:
    """Tokenizer load time, seconds per view of the encode path, and memory before/after."""
    import torch  # local: see the module docstring

    from tokenize_corpus.shard_task import encode_views
    from tokenize_corpus.tokenizer import load_tokenizer

    before = _peak_rss_bytes()
    start = time.perf_counter()
    tokenizer = load_tokenizer(req.tokenizer, device=req.device)
    load = time.perf_counter() - start
    loaded = _peak_rss_bytes()
    size = tokenizer.image_size
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(
        0, 256, (req.batch_size, 3, size, size), dtype=torch.uint8, generator=generator
    )  # [B, 3, S, S] as rendered views are
    start = time.perf_counter()
    encode_views(tokenizer, pixels, req.precision)  # warm-up: allocator, kernels, caches
    cold = time.perf_counter() - start
    _wait_for_peers(req)  # the peers' timed batches overlap, as the workers' forwards will
    start = time.perf_counter()
    for _ in range(req.batches):
        encode_views(tokenizer, pixels, req.precision)  # returns on CPU: synchronised
    per_view = (time.perf_counter() - start) / (req.batches * req.batch_size)
    return {
        "load_seconds": load,
        "seconds_per_view": per_view,
        "warmup_seconds": max(0.0, cold - per_view * req.batch_size),
        "grid": list(tokenizer.grid),
        "codebook_size": tokenizer.codebook_size,
        "rss_before_tokenizer": before,
        "rss_after_load": loaded,
        "rss_peak": _peak_rss_bytes(),
    }


def write_seconds(req: Request, images: int, num_tokens: int, codebook_size: int) -> float:
    """Seconds to write one shard of ``images`` synthetic rows (both files and the receipt)."""
    import numpy as np  # local: see the module docstring

    from shards.dataset import TokenDatasetDir
    from shards.views import AugConfig, sample_view
    from shards.writer import TokenRow

    aug = from_dict(AugConfig, req.aug)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(images):
        key = f"image_{i:06d}"
        rows.append(
            TokenRow(
                key=key,
                label=i % 1000,
                views=[sample_view(aug, key, s, *SYNTHETIC_SIZE) for s in req.seeds],
                tokens=rng.integers(0, codebook_size, (len(req.seeds), num_tokens), np.uint16),
                image_sha256=hashlib.sha256(key.encode()).hexdigest(),
            )
        )
    tokenizer = {"codebook_size": codebook_size, "fingerprint": "0" * 64}
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        TokenDatasetDir(out).write_shard(
            0, 1, "images", req.seeds, rows, [], req.formats, tokenizer=tokenizer
        )
        return time.perf_counter() - start


def child(req: Request) -> dict[str, Any]:
    """Every measurement, in this process (call it in a fresh one: see :func:`measure`)."""
    import distributed  # noqa: F401  (a worker has it loaded: part of its memory)
    import torch  # before measure_start: part of what startup_seconds counts

    measure_start = time.time()  # the parent subtracts its own start: process startup
    torch.set_num_threads(max(1, req.threads))
    start = time.perf_counter()
    import shards.writer  # noqa: F401  (what a worker's first task imports)
    import tokenize_corpus.shard_task  # noqa: F401

    imports = time.perf_counter() - start
    result = forward_seconds(req)
    decode, decoded = decode_seconds(req)
    tokens = result["grid"][0] * result["grid"][1]
    # Two shard sizes separate a shard's fixed cost (fsyncs, receipt, footers) from its per-image one.
    write_seconds(req, WRITE_IMAGES[0], tokens, result["codebook_size"])  # warm-up
    small, large = (write_seconds(req, n, tokens, result["codebook_size"]) for n in WRITE_IMAGES)
    per_image = max(0.0, (large - small) / (WRITE_IMAGES[1] - WRITE_IMAGES[0]))
    result.update(
        decode_seconds_per_image=decode,
        decoded_images=decoded,
        import_seconds=imports,
        write_seconds_per_image=per_image,
        write_seconds_per_shard=max(0.0, small - per_image * WRITE_IMAGES[0]),
        measure_start=measure_start,
    )
    return result


def measure(req: Request, processes: int = 1, timeout: float = 600.0) -> dict[str, Any]:
    """Run :func:`child` in ``processes`` fresh Python processes at once; their mean figures.

    Several processes at once share the machine as the job's workers will (cores, memory
    bandwidth, whatever else runs there now), so the per-view and per-image times are those of
    a worker among its peers. ``startup_seconds`` is the mean time a process took to start and
    import torch and Dask before measuring: what starting each worker (and the driver) costs.
    """
    with tempfile.TemporaryDirectory(prefix="plan-barrier-") as barrier:
        req = dataclasses.replace(req, barrier=barrier, processes=max(1, processes))
        return _run_children(req, timeout)


def _run_children(req: Request, timeout: float) -> dict[str, Any]:
    payload = json.dumps(req.__dict__)
    command = [sys.executable, "-m", "tokenize_corpus.calibrate", payload]
    start = time.time()
    running = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(req.processes)
    ]
    results = []
    for proc in running:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in running:
                other.kill()
            raise UserError(
                f"calibration took over {timeout:.0f} s; use fewer calibration.batches or a "
                "smaller calibration.batch_size"
            ) from None
        if proc.returncode != 0:
            tail = "\n".join(err.strip().splitlines()[-8:])
            raise RuntimeError(f"calibration process failed (exit {proc.returncode}):\n{tail}")
        result = json.loads(out.strip().splitlines()[-1])
        result["startup_seconds"] = result.pop("measure_start") - start
        results.append(result)
    keys = [k for k, v in results[0].items() if isinstance(v, (int, float))]
    mean = {k: sum(r[k] for r in results) / len(results) for k in keys}
    return {**results[0], **mean, "processes": len(results)}


def _main() -> None:
    raw = json.loads(sys.argv[1])
    raw["seeds"], raw["formats"] = tuple(raw["seeds"]), tuple(raw["formats"])
    print(json.dumps(child(Request(**raw))))


if __name__ == "__main__":
    _main()
