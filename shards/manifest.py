"""What ``manifest.json`` holds: :func:`build_manifest` assembles it from the per-shard receipts.

A receipt (``receipts/shard-<i>.json``) is written last for each image shard and marks it done;
when every shard is done the stage-2 driver assembles the manifest from the receipts and the
job's facts (docs/design.md §3-§4) and ``shards.dataset.TokenDatasetDir.write_manifest``
publishes it with the dataset card.

A manifest is *sealed*: ``manifest_sha256`` is the sha256 of its own content without that key, so
a hand edit (rows, the shard list, ``codebook_size``) is found by every reader (:func:`seal_problem`).
The seal is not a signature: someone who rewrites the manifest can recompute it. The facts the
data itself carries are checked against the data as well (footers, receipts, token ranges).
"""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from typing import Any

from shards import schema
from shards.storage import dumps

SEAL = "manifest_sha256"  # the sha256 of the manifest's content without this key

# Distributions whose versions a manifest records (those that shape the bytes or the tokens).
SOFTWARE = (
    "beitv2-pipeline",
    "numpy",
    "pyarrow",
    "torch",
    "torchvision",
    "timm",
    "pillow",
    "webdataset",
    "datasets",
    "dask",
    "distributed",
    "fsspec",
)


def software_versions() -> dict[str, str]:
    """Installed versions of the packages that made the dataset (absent ones are left out)."""
    versions = {"python": platform.python_version()}
    for name in SOFTWARE:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


def _tokenizer_value(info: dict, name: str) -> Any:
    """A tokenizer property from the job's info block: ``info["tokenizer"][name]`` or ``info[name]``."""
    tokenizer = info.get("tokenizer") or {}
    return tokenizer.get(name, info.get(name))


def build_manifest(receipts: Sequence[dict], info: dict, num_shards: int | None = None) -> dict:
    """Assemble manifest.json from the per-shard receipts and the job's info block.

    ``info`` is what the job knows: ``tokenizer`` (Tokenizer.describe(): fingerprint,
    codebook_size, grid, ...), ``teacher``, ``aug``, ``seeds``, ``precision`` (resolved; "fp32"
    when absent), ``images`` (the image source as an absolute path or URL, e.g.
    ``{"source": ..., "shard_size": ...}``), ``identity`` (the job identity every receipt
    carries), ``versions`` (the dataset's growth log) and anything else worth keeping; it is
    stored as given. Shards without a receipt are listed under ``missing_shards``.
    """
    receipts = sorted(receipts, key=lambda r: r["shard_index"])
    if num_shards is None:
        num_shards = int(
            info.get("num_shards") or max((r["num_shards"] for r in receipts), default=0)
        )
    seeds = [int(s) for s in info.get("seeds") or (receipts[0]["seeds"] if receipts else [])]
    grid = _tokenizer_value(info, "grid")
    num_tokens = int(grid[0]) * int(grid[1]) if grid else None
    if num_tokens is None and receipts:
        num_tokens = receipts[0].get("num_tokens")
    done = {r["shard_index"] for r in receipts}
    rows = sum(r["rows"] for r in receipts)
    tokens = rows * len(seeds) * (num_tokens or 0)
    bytes_by_format: dict[str, int] = {}
    for receipt in receipts:
        for entry in receipt["files"]:
            bytes_by_format[entry["format"]] = (
                bytes_by_format.get(entry["format"], 0) + entry["size"]
            )
    totals = {
        "shards": num_shards,
        "shards_done": len(done),
        "images": rows,
        "skipped": sum(len(r["skipped"]) for r in receipts),
        "views": rows * len(seeds),
        "tokens": tokens,
        "bytes": bytes_by_format,
        "bytes_per_token": {
            k: (v / tokens if tokens else None) for k, v in bytes_by_format.items()
        },
    }
    manifest = dict(info)
    manifest.update(
        {
            "schema_version": schema.SCHEMA_VERSION,
            # the tokenizer encoder's autocast precision: part of the dataset's identity
            "precision": info.get("precision") or "fp32",
            "num_shards": num_shards,
            "seeds": seeds,
            "num_tokens": num_tokens,
            "grid": list(grid) if grid else None,
            "codebook_size": _tokenizer_value(info, "codebook_size"),
            "fingerprint": _tokenizer_value(info, "fingerprint"),
            "formats": sorted({e["format"] for r in receipts for e in r["files"]}),
            "software": software_versions(),
            "totals": totals,
            "missing_shards": [i for i in range(num_shards) if i not in done],
            "shards": list(receipts),
        }
    )
    return seal(manifest)


def seal(manifest: dict) -> dict:
    """``manifest`` with its :data:`SEAL` (re)computed."""
    content = {k: v for k, v in manifest.items() if k != SEAL}
    return {**content, SEAL: hashlib.sha256(dumps(content)).hexdigest()}


def seal_problem(manifest: dict) -> str | None:
    """Why ``manifest`` is not as stage 2 wrote it (no seal, or a seal its content does not
    match); None when it is."""
    found = manifest.get(SEAL)
    if found is None:
        return f"has no {SEAL} (stage 2 did not write it, or it was edited)"
    if found != seal(manifest)[SEAL]:
        return f"was edited after stage 2 wrote it (its content does not match its {SEAL})"
    return None
