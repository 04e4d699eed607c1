"""The key index at ImageNet scale: build time, memory and lookups for 1.28 M keys.

1. Build: 1,281,167 synthetic ImageNet-style keys (``n<wnid>/n<wnid>_<i>``, 1000 classes) in 5005
   token shards of 256 -> ``shards.key_index.KeyIndex``: wall time (median of --rounds), the
   index's own arrays, the peak of Python/numpy allocations during the build (tracemalloc) and
   the process's peak RSS growth.
2. Lookup: every key looked up again, split as another copy would hold them (files of 1024),
   i.e. what stage 3 does once per image shard of a differently packed copy.
3. Reading keys: the key column of real token shards (``shard_keys``, Parquet, 256 rows, 4 seeds
   written, one read) timed on --files shards and scaled to 5005 (labelled as extrapolated).

    .venv/bin/python benchmarks/bench_key_index.py --rounds 3 --files 100

Prints JSON and writes benchmarks/results/key_index.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import smoke

from shards.dataset import TokenDatasetDir
from shards.key_index import KeyIndex
from shards.reader import open_token_dataset
from shards.views import ViewParams
from shards.writer import TokenRow

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_TRAIN = 1_281_167
SHARD = 256
SMOKE = ["--keys=5000", "--rounds=1", "--files=2", "--out={tmp}/key_index.json"]


def imagenet_keys(total: int = IMAGENET_TRAIN, classes: int = 1000) -> list[str]:
    """``total`` distinct keys shaped like ImageNet's (class folder / file stem)."""
    per, extra = divmod(total, classes)
    keys = []
    for c in range(classes):
        wnid = f"n{1440764 + 7919 * c:08d}"
        keys.extend(f"{wnid}/{wnid}_{i}" for i in range(per + (c < extra)))
    return keys


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bench_build(keys: list[str], rounds: int) -> dict:
    by_shard = [keys[i : i + SHARD] for i in range(0, len(keys), SHARD)]
    rss_before = peak_rss_mib()
    times = []
    for _ in range(rounds):
        tick = time.perf_counter()
        index = KeyIndex(by_shard)
        times.append(time.perf_counter() - tick)
    rss_growth = peak_rss_mib() - rss_before
    tracemalloc.start()
    KeyIndex(by_shard)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    other = [keys[i : i + 1024] for i in range(0, len(keys), 1024)]
    tick = time.perf_counter()
    found = 0
    for chunk in other:
        shard, _ = index.lookup(chunk)
        found += int((shard >= 0).sum())
    lookup_s = time.perf_counter() - tick
    assert found == len(keys) and index.rows == len(keys)
    return {
        "keys": len(keys),
        "token_shards": len(by_shard),
        "build_seconds": times,
        "build_seconds_median": statistics.median(times),
        "index_bytes": index.nbytes,
        "build_peak_traced_bytes": peak,
        "peak_rss_growth_mib": rss_growth,
        "lookup_all_seconds": lookup_s,
        "lookup_keys_per_s": len(keys) / lookup_s,
    }


def bench_key_reads(keys: list[str], files: int, seeds: int = 4) -> dict:
    keys = keys[: files * SHARD]
    rng = np.random.default_rng(0)
    view = ViewParams(0, 500, 375, 10, 20, 200, 300, False, 1.0, 1.0, 1.0, (), 224, "bicubic")
    tok = {"fingerprint": "c" * 64, "codebook_size": 8192, "grid": [14, 14], "image_size": 224}
    with tempfile.TemporaryDirectory() as tmp:
        out = TokenDatasetDir(tmp)
        receipts = []
        for i in range(files):
            rows = [
                TokenRow(
                    k,
                    0,
                    [dataclasses.replace(view, seed=s) for s in range(seeds)],
                    rng.integers(0, 8192, (seeds, 196), dtype=np.uint16),
                    f"{i:032x}{j:032x}",
                )
                for j, k in enumerate(keys[i * SHARD : (i + 1) * SHARD])
            ]
            receipts.append(
                out.write_shard(
                    i, files, "x", tuple(range(seeds)), rows, [], ("parquet",), tokenizer=tok
                )
            )
        out.write_manifest(receipts, {"tokenizer": tok, "seeds": list(range(seeds))})
        ds = open_token_dataset(tmp)
        tick = time.perf_counter()
        index = KeyIndex.from_dataset(ds)
        seconds = time.perf_counter() - tick
    assert index.rows == files * SHARD
    per_shard = seconds / files
    return {
        "files_read": files,
        "rows_per_file": SHARD,
        "seconds": seconds,
        "seconds_per_shard": per_shard,
        "extrapolated_imagenet_seconds": per_shard * 5005,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=IMAGENET_TRAIN, help="keys to index")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/key_index.json"))
    args = smoke.parse_args(parser, SMOKE)
    load_before = os.getloadavg()
    tick = time.perf_counter()
    keys = imagenet_keys(args.keys)
    make_keys_s = time.perf_counter() - tick
    result = {
        "make_keys_seconds": make_keys_s,
        "build": bench_build(keys, args.rounds),
        "read_keys_from_token_shards": bench_key_reads(keys, args.files),
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
