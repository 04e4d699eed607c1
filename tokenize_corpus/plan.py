"""``pipeline plan``: what a stage-2 job will cost, printed before anything runs.

    pipeline plan images=<shards> tokenizer=<ckpt> seeds=[0,1,2,3] [precision=..] [cluster.*=..]
    pipeline plan num_images=1281167 tokenizer=<ckpt> shard_size=1000 cluster.n_workers=64

It takes the keys of ``stage=tokenize`` (plus ``num_images=`` instead of ``images=``, ``epochs=``
for the online comparison, ``gpu=`` for a GPU estimate) and prints: the views to compute, the
tokenizer FLOPs (counted from its config), the expected wall time (from a short calibration of
the real tokenizer forward in a worker-like process on this machine, or from a stated table for a
GPU kind, labelled as an estimate), the bytes on disk (constants fitted to the real writer), the
memory of one worker, and what the same targets would cost computed online over E pretraining
epochs (docs/design.md §1). How close the figures come to a real run is measured by
``benchmarks/bench_plan.py`` (BENCHMARKS.md, "pipeline plan vs a real run").
"""

from __future__ import annotations

import logging
import os
import sys
import tarfile
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow.parquet as pq
import torch

from engine.config import (
    Count,
    Fraction,
    NonNegative,
    build_stage_config,
    describe,
    parse_overrides,
    to_dict,
)
from engine.errors import ConfigError
from engine.precision import resolve_precision
from shards.archives import split_member_name
from shards.images import list_shards
from tokenize_corpus import cost
from tokenize_corpus.calibrate import Request, measure
from tokenize_corpus.config import TokenizeConfig
from tokenize_corpus.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

COUNT_SHARDS = 64  # shards whose images are counted one by one; the rest are scaled by size


@dataclass(frozen=True)
class CalibrationSection:
    """How long the measurement of the tokenizer forward runs."""

    batches: Count = 2  # timed batches of the tokenizer forward (after one warm-up batch)
    batch_size: NonNegative = 0  # views per calibration batch; 0 = min(batch_size, 16)


@dataclass(frozen=True)
class PlanConfig(TokenizeConfig):
    """``pipeline plan``: the keys of stage=tokenize, and what to plan for."""

    num_images: NonNegative = 0  # plan for this many images instead of counting images= (0 = count)
    epochs: Count = 300  # pretraining epochs, for the cost of computing the targets online
    gpu: str = (
        ""  # estimate for this GPU kind from a stated table (t4, v100, a10g, l4, a100, h100, h200)
    )
    gpu_utilisation: Fraction = cost.GPU_UTILISATION  # share of the GPU's peak assumed with gpu=
    calibration: CalibrationSection = field(default_factory=CalibrationSection)


# ---- what the job covers -----------------------------------------------------------------------


def _count_tar(url: str) -> int:
    keys = set()
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if member.isfile():
                key, _ = split_member_name(member.name)
                if key:
                    keys.add(key)
    return len(keys)


def _count_shard(shard: Any) -> int:
    if shard.kind == "folder":
        return len(shard.keys)
    if shard.kind == "parquet":
        with fsspec.open(shard.url, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    return _count_tar(shard.url)


def _shard_size_bytes(shard: Any) -> int:
    fs, path = fsspec.core.url_to_fs(shard.url)
    return int(fs.size(path))


def count_images(cfg: PlanConfig) -> dict[str, Any]:
    """Images per shard: counted (the first COUNT_SHARDS shards), or scaled by file size."""
    if cfg.num_images > 0:
        if cfg.images:
            raise ConfigError("give images= (to count them) or num_images=, not both")
        full, rest = divmod(cfg.num_images, cfg.shard_size)
        per_shard = [cfg.shard_size] * full + ([rest] if rest else [])
        return {"per_shard": per_shard, "how": f"num_images={cfg.num_images}, shard_size"}
    if not cfg.images:
        raise ConfigError("say what to plan for: images=<image source> or num_images=<count>")

    try:
        shards = list_shards(cfg.images, cfg.shard_size)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"images={cfg.images}: {err}") from None
    if not shards:
        raise ConfigError(f"no images found at images={cfg.images}")
    counted = [_count_shard(s) for s in shards[:COUNT_SHARDS]]
    how = f"counted in {len(counted)} of {len(shards)} shards"
    if len(shards) > len(counted):
        sizes = [_shard_size_bytes(s) for s in shards]
        per_byte = sum(counted) / max(1, sum(sizes[: len(counted)]))
        counted += [round(size * per_byte) for size in sizes[len(counted) :]]
        how += ", the rest scaled by file size"
    return {"per_shard": counted, "how": how}


# ---- measurements ------------------------------------------------------------------------------


def _device(cfg: PlanConfig) -> str:
    has_gpu = torch.cuda.is_available()
    if cfg.cluster.device == "cuda" and not has_gpu and not cfg.gpu:
        raise ConfigError(
            "cluster.device=cuda but this machine has no GPU to calibrate on; pass gpu=<kind> "
            f"({', '.join(cost.GPU_PEAK_TFLOPS)}) for a table estimate"
        )
    return "cuda" if has_gpu and cfg.cluster.device != "cpu" else "cpu"


def _precision(cfg: PlanConfig, device: str) -> str:
    if cfg.gpu:
        half = cost.GPU_PEAK_TFLOPS[cfg.gpu][0]
        return half if cfg.precision == "auto" else cfg.precision
    return resolve_precision(cfg.precision, device)


def _load_shape(cfg: PlanConfig) -> tuple[cost.EncoderShape, dict]:
    """The tokenizer's shape and identity, read from the checkpoint (a user error if unreadable)."""
    if not cfg.tokenizer:
        raise ConfigError("tokenizer is empty; pass tokenizer=<VQ-KD checkpoint>")
    try:
        tokenizer = load_tokenizer(cfg.tokenizer)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None
    c = tokenizer.config
    shape = cost.EncoderShape(
        c.image_size, c.patch_size, c.width, c.depth, c.code_dim, c.codebook_size
    )
    if c.image_size != cfg.aug.size:
        raise ConfigError(
            f"aug.size={cfg.aug.size} does not match the tokenizer's image_size={c.image_size}; "
            f"set aug.size={c.image_size} (stage=tokenize refuses it too)"
        )
    return shape, tokenizer.describe()


def _calibrate(cfg: PlanConfig, device: str, precision: str, processes: int) -> dict[str, Any]:
    batch = cfg.calibration.batch_size or min(cfg.batch_size, 16)
    request = Request(
        tokenizer=cfg.tokenizer,
        precision=precision,
        device=device,
        threads=cfg.cluster.torch_threads,
        batch_size=batch,
        batches=max(1, cfg.calibration.batches),
        images=cfg.images,
        shard_size=cfg.shard_size,
        seeds=tuple(cfg.seeds),
        aug=to_dict(cfg.aug),
        formats=tuple(cfg.formats),
    )
    log.info(
        "calibrating: %d+1 batches of %d views at %s on %s",
        request.batches,
        batch,
        precision,
        device,
    )
    return {**measure(request, processes), "batch_size": batch}


# ---- the plan ----------------------------------------------------------------------------------


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _disk_and_memory(
    cfg: PlanConfig, shape: cost.EncoderShape, per_shard: list[int], measured: dict
) -> tuple[dict, dict, float, dict]:
    """Bytes on disk (upper bound, skewed codes) and one worker's memory (total, by part)."""
    n_images, k = sum(per_shard), len(cfg.seeds)
    bytes_upper = cost.dataset_bytes(
        n_images, len(per_shard), k, shape.num_patches, shape.codebook_size, cfg.formats
    )
    bytes_skewed = cost.dataset_bytes(
        n_images, len(per_shard), k, shape.num_patches, shape.codebook_size, cfg.formats, "zipf"
    )
    buffers = cost.shard_buffer_bytes(
        max(per_shard), k, shape.num_patches, shape.image_size, cfg.batch_size
    )
    activations = max(0, measured["rss_peak"] - measured["rss_after_load"])
    activations = activations * cfg.batch_size / measured["batch_size"]
    worker_memory = measured["rss_after_load"] + activations + sum(buffers.values())
    parts = {
        "process + tokenizer": measured["rss_after_load"],
        f"forward at batch {cfg.batch_size}": activations,
        **buffers,
    }
    return bytes_upper, bytes_skewed, worker_memory, parts


def make_plan(cfg: PlanConfig) -> dict[str, Any]:
    """Every figure of the plan, as a dict (``format_plan`` prints it)."""
    if cfg.gpu and cfg.gpu not in cost.GPU_PEAK_TFLOPS:
        raise ConfigError(f"gpu={cfg.gpu!r}: known kinds are {', '.join(cost.GPU_PEAK_TFLOPS)}")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"seeds={list(cfg.seeds)} must be a non-empty list of distinct integers")
    images = count_images(cfg)
    per_shard, k = images["per_shard"], len(cfg.seeds)
    shape, identity = _load_shape(cfg)
    device = _device(cfg)
    precision = _precision(cfg, device)
    local = cfg.cluster.effective_kind == "local"
    gpu_workers = bool(cfg.gpu) or device == "cuda"
    cores = _cores() if local and not gpu_workers else None
    # LocalCluster workers share this machine: calibrate as many processes at once (up to
    # twice the cores; more workers than that are scaled). Otherwise one, as one remote worker.
    processes = min(cfg.cluster.planned_workers, 2 * cores) if cores else 1
    # The forward is calibrated on this machine; with gpu= only decode is measured here.
    measured = _calibrate(
        cfg, "cpu" if cfg.gpu else device, "fp32" if cfg.gpu else precision, processes
    )
    flops = cost.encode_flops(shape)
    n_images = sum(per_shard)
    source = (
        f"calibrated on this machine ({device}, {precision}, {measured['processes']} "
        "worker-like processes at once)"
    )
    if cfg.gpu:
        measured["seconds_per_view"] = cost.gpu_seconds_per_view(
            cfg.gpu, precision, flops["total"], cfg.gpu_utilisation
        )
        source = (
            f"ESTIMATE for {cfg.gpu} at {precision}: {flops['total'] / 1e9:.2f} GFLOP/view at "
            f"{cfg.gpu_utilisation:.0%} of its data-sheet peak (not measured)"
        )
    wall = cost.wall_seconds(
        per_shard,
        k,
        measured,
        cfg.cluster.planned_workers,
        cfg.cluster.torch_threads,
        cores,
        gpu_workers,
    )
    bytes_upper, bytes_skewed, worker_memory, memory_parts = _disk_and_memory(
        cfg, shape, per_shard, measured
    )
    online_views = n_images * cfg.epochs
    return {
        "images": n_images,
        "shards": len(per_shard),
        "images_how": images["how"],
        "seeds": k,
        "views": n_images * k,
        "tokens": n_images * k * shape.num_patches,
        "tokenizer": {**identity, "width": shape.width, "depth": shape.depth},
        "device": f"{cfg.gpu} (estimate)" if cfg.gpu else device,
        "precision": precision,
        "flops_per_view": flops,
        "flops": flops["total"] * n_images * k,
        "measured": measured,
        "time_source": source,
        "workers": cfg.cluster.planned_workers,
        "cluster_kind": cfg.cluster.effective_kind,
        "cores": cores,
        "wall_seconds": wall,
        "bytes": bytes_upper,
        "bytes_skewed": bytes_skewed,
        "worker_memory_bytes": worker_memory,
        "worker_memory_parts": memory_parts,
        "online": {
            "epochs": cfg.epochs,
            "views": online_views,
            "flops": flops["total"] * online_views,
            "seconds_one_device": online_views * measured["seconds_per_view"],
            "ratio": online_views / (n_images * k),
        },
    }


# ---- printing ----------------------------------------------------------------------------------


def _si(value: float, unit: str) -> str:
    for scale, prefix in (
        (1e18, "E"),
        (1e15, "P"),
        (1e12, "T"),
        (1e9, "G"),
        (1e6, "M"),
        (1e3, "k"),
    ):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def _bytes(value: float) -> str:
    for scale, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as the text ``pipeline plan`` prints."""
    tok, wall, m, online = plan["tokenizer"], plan["wall_seconds"], plan["measured"], plan["online"]
    flops = plan["flops_per_view"]
    parts = ", ".join(f"{name} {_si(v, 'FLOP')}" for name, v in flops.items() if name != "total")
    where = f"{plan['workers']} workers" + (f" on {plan['cores']} cores" if plan["cores"] else "")
    b, skew = plan["bytes"], plan["bytes_skewed"]
    tokens = max(1, plan["tokens"])
    formats = ", ".join(
        f"{k} {_bytes(v)}" + (f" = {v / tokens:.2f} B/token" if k != "receipts" else "")
        for k, v in b.items()
        if k != "total"
    )
    pace = ""
    if m["decode_seconds_per_image"] > plan["seeds"] * m["seconds_per_view"]:
        pace = " (decode-bound: decode + render of an image outlasts its views' forward)"
    lines = [
        f"images  {plan['images']:,} in {plan['shards']:,} shards ({plan['images_how']})",
        f"views   {plan['views']:,} = {plan['images']:,} images x {plan['seeds']} seeds "
        f"({plan['tokens']:,} tokens)",
        f"tokenizer {tok['fingerprint'][:12]}: {tok['image_size']} px, patch {tok['patch_size']}, "
        f"width {tok['width']} x {tok['depth']} blocks, codebook {tok['codebook_size']} x "
        f"{tok['code_dim']}",
        f"FLOPs   {_si(flops['total'], 'FLOP')} per view ({parts}); "
        f"{_si(plan['flops'], 'FLOP')} in all",
        f"time    {_duration(wall['total'])} on {where} at {plan['precision']} "
        f"(start {_duration(wall['start'])} + tasks {_duration(wall['tasks'])})",
        f"        forward {m['seconds_per_view'] * 1e3:.1f} ms/view, decode + render "
        f"{m['decode_seconds_per_image'] * 1e3:.1f} ms/image{pace}: {plan['time_source']}",
        f"disk    {_bytes(b['total'])} at most ({formats}); ~{_bytes(skew['total'])} if codes "
        "are used as unevenly as a trained tokenizer's",
        f"memory  {_bytes(plan['worker_memory_bytes'])} per worker ("
        + ", ".join(f"{k} {_bytes(v)}" for k, v in plan["worker_memory_parts"].items())
        + ")",
        f"online  {online['epochs']} epochs of fresh targets = {online['views']:,} forwards, "
        f"{_si(online['flops'], 'FLOP')}, {_duration(online['seconds_one_device'])} of forward on "
        f"one such worker: {online['ratio']:.1f}x this job's views",
    ]
    if plan.get("cluster_kind") in ("slurm", "pbs"):
        lines.append(
            "jobs    the worker job script: the same command as `pipeline run stage=tokenize "
            "... --print-job-script` (nothing is submitted)"
        )
    return "\n".join(lines)


USAGE = """usage: pipeline plan images=<image source> tokenizer=<ckpt> [key=value ...]
       pipeline plan num_images=<count> tokenizer=<ckpt> [key=value ...]

Prints what `pipeline run stage=tokenize` with the same keys would cost, before anything runs.
Keys: those of stage=tokenize (see `pipeline run stage=tokenize --help`) and:
"""


def main(argv: list[str]) -> int:
    """``pipeline plan key=value ...``: print the plan; exit 0, or 2 on a bad setting."""
    if not argv or any(a in ("-h", "--help") for a in argv):
        own = {"num_images", "epochs", "gpu", "gpu_utilisation", "calibration"}
        out = sys.stdout if argv else sys.stderr
        print(USAGE, end="", file=out)
        for key, type_name, default, doc in describe(PlanConfig):
            if key.split(".")[0] in own:
                print(f"  {key}={default}  [{type_name}]  {doc}", file=out)
        return 0 if argv else 2
    cfg = build_stage_config(PlanConfig, parse_overrides(argv), stage="plan")
    plan = make_plan(cfg)
    print(format_plan(plan))
    return 0
