"""Bytes on disk per token of the token dataset formats (targets: Parquet <= 1.8, WebDataset <= 2.3).

A realistic shard: 256 images, K=4 seeds, N=196 tokens (14x14 grid), codebook 8192, tokens drawn
from a Zipf-like distribution (p ~ 1/(rank+20)), plus a uniform draw as the worst case (13 bits =
1.625 bytes is its floor). Bytes include the view parameters, keys, labels and file overheads.

    .venv/bin/python benchmarks/bench_token_bytes.py [--out token_bytes.json]

Prints one line per shard (and writes them as JSON to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import smoke
from synthetic import fake_rows

from shards.dataset import TokenDatasetDir

CODEBOOK, NUM_TOKENS, SEEDS = 8192, 196, (0, 1, 2, 3)
SMOKE = ["--images=8", "--large-images=16", "--out={tmp}/token_bytes.json"]


def measure(name: str, probs: np.ndarray | None, images: int) -> dict:
    """Write one shard with both formats and return bytes/token per format."""
    rows = fake_rows(0, images, SEEDS, NUM_TOKENS, CODEBOOK, probs)
    tokens = images * len(SEEDS) * NUM_TOKENS
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        receipt = TokenDatasetDir(out).write_shard(
            0,
            1,
            "images/shard-000000.tar",
            SEEDS,
            rows,
            [],
            ("parquet", "webdataset"),
            tokenizer={"codebook_size": CODEBOOK, "grid": [14, 14], "fingerprint": "0" * 64},
        )
        seconds = time.perf_counter() - start
    sizes: dict[str, int] = {}
    for entry in receipt["files"]:
        sizes[entry["format"]] = sizes.get(entry["format"], 0) + entry["size"]
    result = {fmt: size / tokens for fmt, size in sizes.items()}
    if probs is not None:
        entropy = float(-(probs * np.log2(probs)).sum())
    else:
        entropy = float(np.log2(CODEBOOK))
    print(
        f"{name:8s} {images:5d} images | entropy {entropy / 8:.3f} B/token | parquet {result['parquet']:.3f} B/token | "
        f"webdataset {result['webdataset']:.3f} B/token | write {seconds:.2f} s"
    )
    return {"tokens": name, "images": images, "entropy_bytes_per_token": entropy / 8, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="images per shard")
    parser.add_argument("--large-images", type=int, default=1024, help="the bigger shard")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = smoke.parse_args(parser, SMOKE)
    ranks = np.arange(CODEBOOK, dtype=np.float64)
    zipf = 1.0 / (ranks + 20.0)
    results = [
        measure("zipf", zipf / zipf.sum(), args.images),
        measure("uniform", None, args.images),
        # Parquet files carry ~10 KB of fixed overhead (footer + Arrow schema): bigger shards
        # amortise it.
        measure("uniform", None, args.large_images),
    ]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
