"""The token dataset's index: where it lives (fsspec), its per-shard receipts and manifest.json.

A receipt (``receipts/shard-<i>.json``) is written last for each image shard and marks it done;
the manifest is assembled from the receipts at the end of a run (docs/design.md §3-§4). Every read and
write goes through fsspec, so a dataset may live on a local disk or an object store (``s3://``).
``shards.dataset.TokenDatasetDir`` is the object a writer holds for one dataset directory; the
functions here are the format-level pieces it and the readers share.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from shards import schema

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


def dataset_fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """A dataset URL or local path -> (filesystem, root path inside it without a trailing slash)."""
    fs, root = fsspec.core.url_to_fs(str(path))
    return fs, root.rstrip("/") or root


def join(root: str, relative: str) -> str:
    """Path of a dataset member: ``root/relative`` (fsspec paths always use '/')."""
    return f"{root}/{relative}"


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Local disks can rename atomically; object stores cannot (they publish the receipt last)."""
    return isinstance(fs, LocalFileSystem)


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    """Parse one JSON file."""
    with fs.open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def dumps(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys) so reruns write byte-identical receipts/manifests."""
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def named_sets(root_url: str) -> list[str]:
    """Names of the finished named token sets of a dataset (``token_sets/<name>/manifest.json``).

    See ``shards.token_sets``; listed here so the card writer can name them without the reader.
    """
    fs, root = dataset_fs(root_url)
    folder = join(root, schema.TOKEN_SETS_DIR)
    if not fs.isdir(folder):
        return []
    names = []
    for entry in fs.ls(folder, detail=False):
        name = str(entry).rstrip("/").rsplit("/", 1)[-1]
        if schema.TOKEN_SET_NAME.fullmatch(name) and fs.exists(
            join(join(folder, name), schema.MANIFEST_NAME)
        ):
            names.append(name)
    return sorted(names)


def read_receipt(out_dir: str, shard_index: int) -> dict | None:
    """The receipt of image shard ``shard_index``, or None when it has none (not done)."""
    fs, root = dataset_fs(out_dir)
    path = join(root, schema.receipt_path(shard_index))
    if not fs.exists(path):
        return None
    return read_json(fs, path)


def read_receipts(out_dir: str) -> list[dict]:
    """Every receipt under ``out_dir/receipts``, ordered by shard index."""
    fs, root = dataset_fs(out_dir)
    folder = join(root, schema.RECEIPTS_DIR)
    if not fs.exists(folder):
        return []
    paths = sorted(p for p in fs.ls(folder, detail=False) if str(p).endswith(".json"))
    receipts = [read_json(fs, p) for p in paths]
    return sorted(receipts, key=lambda r: r["shard_index"])


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
    return manifest
