"""What stage 3's verification costs: loader throughput with checks vs without.

Builds a token dataset (random tokens, real views: sample_view over the decoded image, 224 px,
K seeds) over the first --limit images of the ImageNet sample, then reads one epoch of
``pretrain.data.MIMDataset`` (decode, view rebuild, normalise, mask) with ``verify=True``
(sha256 of every token file against its receipt when read, sha256 of every image against its
row's image_sha256 before rendering) and ``verify=False``, interleaved A/B/A/B... in one process
(the machine is shared, so only same-run ratios mean anything), alternating every block of about
two shards. The checks alone (the two sha256s per sample) are also timed, which gives the ratio
without the machine's noise. Also times the one-off preflight
(fingerprints of manifest/receipts/footers, file sizes) and the by-key path (the same images
listed with another shard size, matched through the key index).

    .venv/bin/python benchmarks/bench_verify.py --limit 256 --rounds 5

Prints JSON and writes benchmarks/results/verify.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import smoke
import torch
from synthetic import random_token_dataset

from engine.layout import imagenet_sample_dir
from pretrain.data import MIMDataset
from shards.images import iter_shard, list_shards
from shards.reader import open_token_dataset
from shards.verify import preflight
from shards.views import AugConfig

ROOT = Path(__file__).resolve().parents[1]
SMOKE = [
    "--images={imagenet}", "--limit=16", "--shard-size=8", "--seeds=2", "--rounds=1",
    "--out={tmp}/verify.json",
]  # fmt: skip


def build(images: Path, out: Path, shard_size: int, seeds: tuple[int, ...]) -> None:
    """A token dataset as stage 2 lays it out, with random tokens (speed does not depend on them)."""
    tok = {"fingerprint": "b" * 64, "codebook_size": 8192, "grid": [14, 14], "image_size": 224}
    random_token_dataset(str(images), out, shard_size, seeds, AugConfig(size=224), tok)


def make(images: str, tokens: str, shard_size: int, verify: bool, blocks: int) -> MIMDataset:
    """The stage-3 dataset, split into ``blocks`` parts (as DDP ranks) so A and B can alternate
    every few hundred milliseconds instead of every epoch (load drifts on a shared machine)."""
    return MIMDataset(
        images,
        open_token_dataset(tokens),
        vocab_size=8192,
        grid=(14, 14),
        image_size=224,
        num_masked=75,
        shard_size=shard_size,
        world_size=blocks,
        verify=verify,
    )


def block_rate(ds: MIMDataset, block: int) -> float:
    """Samples per second of one block (one process, no loader workers: per-sample cost only)."""
    ds.rank = block
    start = time.perf_counter()
    count = sum(1 for _ in ds)
    return count / (time.perf_counter() - start)


def verify_cost(images: Path, tokens: Path) -> dict:
    """The checks alone, per sample: sha256 of each image's bytes and of each token file."""
    records = [r for s in list_shards(str(images), shard_size=10**9) for r in iter_shard(s)]
    files = [p.read_bytes() for p in tokens.rglob("*.tar.gz")]
    tick = time.perf_counter()
    for r in records:
        hashlib.sha256(r.data).hexdigest()
    image_s = (time.perf_counter() - tick) / len(records)
    tick = time.perf_counter()
    for data in files:
        hashlib.sha256(data).hexdigest()
    token_s = (time.perf_counter() - tick) / len(records)
    return {
        "image_sha256_us_per_sample": image_s * 1e6,
        "token_file_sha256_us_per_sample": token_s * 1e6,
        "mean_image_bytes": sum(len(r.data) for r in records) / len(records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(imagenet_sample_dir()))
    parser.add_argument("--limit", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/verify.json"))
    args = smoke.parse_args(parser, SMOKE)
    # One intra-op thread, as in a DataLoader worker (torch sets 1 there): with several, the
    # per-sample tensor ops contend with the other processes of a shared machine.
    torch.set_num_threads(1)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() == ".jpeg")
        for path in files[: args.limit]:
            os.symlink(path.resolve(), folder / path.name)
        tokens = Path(tmp) / "tokens"
        build(folder, tokens, args.shard_size, tuple(range(args.seeds)))

        ds = open_token_dataset(str(tokens))
        tick = time.perf_counter()
        preflight(ds)
        preflight_s = time.perf_counter() - tick

        blocks = max(1, len(list_shards(str(folder), shard_size=args.shard_size)) // 2)
        other = args.shard_size // 2 + 1  # another packing of the same images: matched by key
        datasets = {
            "verify": make(str(folder), str(tokens), args.shard_size, True, blocks),
            "no_verify": make(str(folder), str(tokens), args.shard_size, False, blocks),
            "by_key": make(str(folder), str(tokens), other, True, blocks),
        }
        assert datasets["by_key"].plan.mode == "key"
        rates: dict[str, list[float]] = {name: [] for name in datasets}
        for ds in datasets.values():  # warm the page cache and every code path
            block_rate(ds, 0)
        names = list(datasets)
        for _ in range(args.rounds):  # interleaved per block, A B C then C B A: no position bias
            for block in range(blocks):
                for name in names if block % 2 == 0 else names[::-1]:
                    rates[name].append(block_rate(datasets[name], block))
        cost = verify_cost(folder, tokens)
    medians = {k: statistics.median(v) for k, v in rates.items()}
    pairs = [a / b for a, b in zip(rates["verify"], rates["no_verify"], strict=True)]
    key_pairs = [a / b for a, b in zip(rates["by_key"], rates["verify"], strict=True)]
    per_sample_us = 1e6 / medians["no_verify"]
    checks_us = cost["image_sha256_us_per_sample"] + cost["token_file_sha256_us_per_sample"]
    result = {
        "images": min(args.limit, len(files)),
        "seeds": args.seeds,
        "shard_size": args.shard_size,
        "rounds": args.rounds,
        "samples_per_s": rates,
        "median_samples_per_s": medians,
        "ratio_verify_over_no_verify": medians["verify"] / medians["no_verify"],
        "ratio_per_block_median": statistics.median(pairs),
        "ratio_by_key_over_aligned": medians["by_key"] / medians["verify"],
        "ratio_by_key_per_block_median": statistics.median(key_pairs),
        "blocks_per_round": blocks,
        "checks_alone": cost,
        "ratio_from_checks_alone": per_sample_us / (per_sample_us + checks_us),
        "preflight_seconds": preflight_s,
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
