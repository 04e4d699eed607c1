"""Synthetic token datasets for the token-dataset tests (random tokens, fake but valid ViewParams)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from shards.dataset import TokenDatasetDir
from shards.views import ViewParams
from shards.writer import TokenRow

SEEDS = (0, 1)
GRID = (4, 4)
CODEBOOK = 16
TOKENIZER = {
    "fingerprint": "f" * 64,
    "codebook_size": CODEBOOK,
    "grid": list(GRID),
    "image_size": 32,
    "patch_size": 8,
}


def fake_view(rng: np.random.Generator, seed: int) -> ViewParams:
    """A plausible ViewParams (values need not come from sample_view)."""
    width, height = int(rng.integers(40, 90)), int(rng.integers(40, 90))
    crop_h, crop_w = int(rng.integers(8, height)), int(rng.integers(8, width))
    jitter = bool(rng.integers(2))
    return ViewParams(
        seed=seed,
        width=width,
        height=height,
        top=int(rng.integers(0, height - crop_h + 1)),
        left=int(rng.integers(0, width - crop_w + 1)),
        crop_height=crop_h,
        crop_width=crop_w,
        flip=bool(rng.integers(2)),
        brightness=float(rng.uniform(0.6, 1.4)) if jitter else 1.0,
        contrast=float(rng.uniform(0.6, 1.4)) if jitter else 1.0,
        saturation=float(rng.uniform(0.6, 1.4)) if jitter else 1.0,
        jitter_order=tuple(int(i) for i in rng.permutation(3)) if jitter else (),
        size=32,
        interpolation="bicubic",
    )


def fake_digest(shard: int, j: int) -> str:
    """A stand-in image digest for row ``j`` of ``shard`` (these rows have no image bytes)."""
    return hashlib.sha256(f"image {shard}/{j}".encode()).hexdigest()


def fake_rows(
    shard: int,
    count: int,
    seeds: tuple[int, ...] = SEEDS,
    num_tokens: int = GRID[0] * GRID[1],
    codebook: int = CODEBOOK,
    probs: np.ndarray | None = None,
) -> list[TokenRow]:
    """``count`` rows with keys ``c<shard>/img_<j>``, random labels, views and tokens."""
    rng = np.random.default_rng(1000 + shard)
    rows = []
    for j in range(count):
        tokens = rng.choice(codebook, size=(len(seeds), num_tokens), p=probs).astype(np.uint16)
        views = [fake_view(rng, s) for s in seeds]
        rows.append(
            TokenRow(
                key=f"c{shard}/img_{j:04d}",
                label=int(rng.integers(-1, 5)),
                views=views,
                tokens=tokens,
                image_sha256=fake_digest(shard, j),
            )
        )
    return rows


def make_dataset(out: Path, num_shards: int = 3, per_shard: int = 5) -> dict:
    """Write a complete synthetic dataset (both formats, one skip in shard 1); return its manifest."""
    receipts = []
    for i in range(num_shards):
        skipped = [(f"c{i}/broken", "truncated JPEG")] if i == 1 else []
        receipts.append(
            TokenDatasetDir(str(out)).write_shard(
                i,
                num_shards,
                f"images/shard-{i:06d}.tar",
                SEEDS,
                fake_rows(i, per_shard),
                skipped,
                ("parquet", "webdataset"),
                tokenizer=TOKENIZER,
            )
        )
    info = {
        "tokenizer": TOKENIZER,
        "teacher": "none",
        "aug": {"size": 32},
        "seeds": list(SEEDS),
        "precision": "fp32",
        "images": {"source": "images/", "shard_size": per_shard},
    }
    return TokenDatasetDir(str(out)).write_manifest(receipts, info)
