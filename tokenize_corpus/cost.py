"""What a stage-2 job costs, from its settings and a few measurements (``pipeline plan``).

Pure arithmetic, no torch: tokenizer FLOPs counted from the model shape, bytes on disk from
constants fitted to the real writer, per-worker memory, and the wall time of shard tasks
scheduled on the workers. The measurements these models take as input (seconds per view of the
tokenizer forward, seconds per image of decode + render, the memory of a loaded worker) come from
``tokenize_corpus.calibrate``; the constants here are measured by ``benchmarks/bench_plan.py`` and
listed in BENCHMARKS.md ("pipeline plan vs a real run").
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

# ---- FLOPs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderShape:
    """The parts of a VQ-KD config that the encode path's cost depends on."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    code_dim: int
    codebook_size: int
    mlp_ratio: int = 4  # tokenize_corpus.vqkd.Block

    @property
    def num_patches(self) -> int:
        """Tokens per view."""
        return (self.image_size // self.patch_size) ** 2


def encode_flops(shape: EncoderShape) -> dict[str, int]:
    """FLOPs of one view's encode (1 multiply-add = 2 FLOPs), by part, plus ``total``.

    The encode path of docs/method.md §1: patch embedding, ``depth`` pre-norm blocks over N+1
    tokens (CLS kept inside the encoder), the task layer (W->W, tanh, W->D) on the N patch tokens
    and the nearest-code search (one dot product per code and token). Norms, softmax, GELU and
    tanh are elementwise and left out (< 1% at ViT-B); the decoder does not run when encoding.
    """
    n, w, d = shape.num_patches, shape.width, shape.code_dim
    t = n + 1  # tokens inside the blocks (CLS + patches)
    patch_embed = n * (3 * shape.patch_size**2) * w
    # qkv (3 W^2) + proj (W^2) + MLP (2 * ratio * W^2) per token, and two T x T x W products.
    per_block = t * (4 + 2 * shape.mlp_ratio) * w * w + 2 * t * t * w
    task_layer = n * (w * w + w * d)
    codebook = n * shape.codebook_size * d
    macs = {
        "patch_embed": patch_embed,
        "blocks": shape.depth * per_block,
        "task_layer": task_layer,
        "codebook": codebook,
    }
    flops = {part: 2 * value for part, value in macs.items()}
    flops["total"] = sum(flops.values())
    return flops


# ---- bytes on disk -----------------------------------------------------------------------------

# Bytes of the files stage 2 writes, as fitted by ``benchmarks/bench_plan.py bytes`` to the real
# writer (shards.writer.parquet_bytes / wds_bytes, schema version 2: keys, labels, view
# parameters, image digests, tokens) over codebooks of 512 and 8192 codes, grids of 36 and 196
# tokens, 64 and 256 images per shard, K of 1 and 4. Token ids cost ``tok + tok_bit * log2(C)``
# bytes each: byte-stream-split + zstd (Parquet) or gzip (WebDataset) bring a token close to its
# entropy, so uniform ids (every code equally used) are the upper bound and a trained tokenizer's
# skewed ids cost less ("zipf": p ~ 1/(rank + 20), 1.41 bytes of entropy at 8192 codes).
# Largest error of the fit against the writer: 5.7% (Parquet, uniform), 5.3% (WebDataset).
PARQUET_BYTES = {  # one file per (seed, image shard); rows = images
    "uniform": {"file": 4614.0, "row": 49.46, "tok": -0.1292, "tok_bit": 0.14018},
    "zipf": {"file": 4252.0, "row": 50.65, "tok": 0.1124, "tok_bit": 0.10753},
}
WDS_BYTES = {  # one .tar.gz per image shard holding every seed of each image
    "uniform": {"file": 531.0, "image": 109.1, "view": 37.46, "tok": 0.6055, "tok_bit": 0.09903},
    "zipf": {"file": 276.0, "image": 110.2, "view": 36.95, "tok": 0.8607, "tok_bit": 0.06553},
}
RECEIPT_BYTES = 1700.0  # one receipt JSON per image shard: 1630-1705 B in the bench_plan.py runs


def dataset_bytes(
    images: int,
    shards: int,
    seeds: int,
    num_tokens: int,
    codebook_size: int,
    formats: tuple[str, ...],
    tokens: str = "uniform",
) -> dict[str, float]:
    """Bytes on disk per format (and ``total``) for ``images`` images in ``shards`` shards.

    ``tokens`` is ``uniform`` (the upper bound) or ``zipf`` (a skewed, trained-like code use).
    """
    bits = math.log2(max(2, codebook_size))
    if tokens == "zipf":  # below 512 codes the fit extrapolates; skewed never exceeds uniform
        upper = dataset_bytes(images, shards, seeds, num_tokens, codebook_size, formats)
    views = images * seeds
    out: dict[str, float] = {}
    if "parquet" in formats:
        c = PARQUET_BYTES[tokens]
        per_token = c["tok"] + c["tok_bit"] * bits
        out["parquet"] = shards * seeds * c["file"] + views * (c["row"] + num_tokens * per_token)
    if "webdataset" in formats:
        c = WDS_BYTES[tokens]
        per_token = c["tok"] + c["tok_bit"] * bits
        out["webdataset"] = (
            shards * c["file"] + images * c["image"] + views * (c["view"] + num_tokens * per_token)
        )
    out["receipts"] = shards * RECEIPT_BYTES
    if tokens == "zipf":
        out = {k: min(v, upper[k]) for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


# ---- memory ------------------------------------------------------------------------------------


def shard_buffer_bytes(
    images_per_shard: int, seeds: int, num_tokens: int, image_size: int, batch_size: int
) -> dict[str, int]:
    """Memory a task holds besides the loaded tokenizer, by part (bytes).

    A task keeps its whole shard's rows until it writes them (uint16 tokens + view parameters,
    ~600 B of Python objects per view), up to ``batch_size`` rendered views waiting for the
    forward, the prefetch queue (about two batches of rendered views, uint8) and the output
    files built in memory (~2 copies of the tokens).
    """
    view_pixels = 3 * image_size * image_size  # uint8 [3, S, S]
    views = images_per_shard * seeds
    return {
        "rows": views * (2 * num_tokens + 600),
        "pending_views": batch_size * view_pixels,
        "prefetch": 2 * batch_size * view_pixels,
        "output_files": 2 * views * 2 * num_tokens,
    }


# ---- wall time ---------------------------------------------------------------------------------


def makespan(shard_seconds: list[float], workers: int, first: float = 0.0) -> float:
    """Time until the last of ``shard_seconds`` tasks ends on ``workers`` workers.

    Tasks start in submission (shard) order on the first free worker, as Dask does with one task
    slot per worker; each worker's first task costs ``first`` seconds more.
    """
    if not shard_seconds:
        return 0.0
    free = [first] * max(1, min(workers, len(shard_seconds)))
    for seconds in shard_seconds:
        start = heapq.heappop(free)
        heapq.heappush(free, start + seconds)
    return max(free)


def wall_seconds(
    per_shard: list[int],
    seeds: int,
    measured: dict,
    workers: int,
    threads: int,
    cores: int | None,
    gpu: bool,
) -> dict[str, float]:
    """Expected wall time of the job: fixed costs, tokenizer loads, shard tasks on the workers.

    ``measured`` comes from ``measured["processes"]`` calibration processes run at once, so its
    per-view and per-image times already include the workers' competition for the machine; more
    workers than that stretch the task phase in proportion. ``cores`` is None for workers that
    are not this machine's CPU cores (GPUs, a remote scheduler): no contention beyond what was
    measured.

    A task renders its views in a prefetch thread while the forward runs: on a GPU, or with a
    spare core per worker, decode hides behind the forward (the slower of the two sets the pace);
    when the workers' threads fill the cores, they take turns and the two add up.
    """
    encode = seeds * measured["seconds_per_view"]
    decode = measured["decode_seconds_per_image"]
    spare = cores is not None and workers * (threads + 1) <= cores
    per_image = max(encode, decode) if gpu or spare else encode + decode
    per_image += measured["write_seconds_per_image"]
    # A worker's first task imports the task's modules and runs a cold first batch.
    first = measured["import_seconds"] + measured["warmup_seconds"]
    per_shard_seconds = [n * per_image + measured["write_seconds_per_shard"] for n in per_shard]
    tasks = makespan(per_shard_seconds, workers, first)
    if cores is not None:
        tasks *= max(1.0, workers / measured.get("processes", 1))
    # The driver starts and loads the tokenizer; then the workers start and load it (in
    # parallel). What else a local run spends outside its tasks (scheduler, nannies, closing the
    # cluster, the manifest) measured -0.6 s beyond this (median of 3 "demo" runs of
    # benchmarks/bench_plan.py, BENCHMARKS.md): nothing is added for it.
    start = 2 * (measured["startup_seconds"] + measured["load_seconds"])
    return {"start": start, "tasks": tasks, "total": start + tasks, "per_image": per_image}


# ---- GPU kinds (estimates, not measurements) ---------------------------------------------------

# Dense tensor-core peak for the half precision the kind runs (bf16, or fp16 where it has no
# bf16) and the plain fp32 peak, in TFLOP/s, from the vendors' data sheets.
GPU_PEAK_TFLOPS: dict[str, tuple[str, float, float]] = {
    "t4": ("fp16", 65.0, 8.1),
    "v100": ("fp16", 125.0, 15.7),
    "a10g": ("bf16", 70.0, 31.2),
    "l4": ("bf16", 121.0, 30.3),
    "a100": ("bf16", 312.0, 19.5),
    "h100": ("bf16", 989.0, 67.0),
    "h200": ("bf16", 989.0, 67.0),
}
# Share of peak an inference ViT forward reaches at batch 64-256; an assumption, not a measurement
# of this code (set gpu_utilisation= to use your own figure).
GPU_UTILISATION = 0.35


def gpu_seconds_per_view(
    kind: str, precision: str, flops_per_view: float, utilisation: float = GPU_UTILISATION
) -> float:
    """Estimated encode seconds per view on one GPU of ``kind`` at ``precision``."""
    if kind not in GPU_PEAK_TFLOPS:
        raise KeyError(kind)
    _, half, fp32 = GPU_PEAK_TFLOPS[kind]
    peak = fp32 if precision == "fp32" else half
    return flops_per_view / (peak * 1e12 * utilisation)
