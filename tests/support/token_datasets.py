"""Synthetic token datasets for the token-dataset tests: the benchmarks' random rows
(``benchmarks/synthetic.py``: random tokens, fake but valid ViewParams) written as a dataset."""

from __future__ import annotations

from pathlib import Path

from benchmarks.synthetic import fake_rows
from shards.dataset import TokenDatasetDir

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
