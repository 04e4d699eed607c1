"""Growing a token dataset without recomputing it: stored tokens and the version log.

Appending seeds: a rerun with ``seeds=[0..7]`` on a dataset made with ``[0..3]`` tokenizes only
seeds 4-7 of each shard (each image still decoded once per task). The stored seeds' tokens are
read back from the shard's files (:func:`stored_tokens`), checked against the receipt's sha256,
so the Parquet files of seeds 0-3 are rewritten with the same bytes and the WebDataset tar, which
holds all K seeds of an image in one sample, becomes exactly what a from-scratch run writes.

Every change of the dataset's extent is a version (:func:`next_versions`), kept in
``versions.json`` and copied into the manifest: version 1 is what the first run made (no time,
so that two runs from the same inputs stay byte-identical); each later version records what was
added, when (UTC) and the job identity that added it.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import tarfile

import numpy as np
import pyarrow.parquet as pq

from shards import schema
from shards.dataset import TokenDatasetDir

VERSIONS_NAME = "versions.json"


def _verified_bytes(dataset: TokenDatasetDir, entry: dict) -> bytes:
    data = dataset.fs.cat_file(dataset.path(entry["path"]))
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise RuntimeError(f"{entry['path']} changed since its receipt; rerun to redo the shard")
    return data


def stored_tokens(out_dir: str, receipt: dict) -> dict[str, np.ndarray]:
    """key -> uint16 tokens [K_old, N] of the receipt's seeds, from its Parquet or WebDataset files."""
    dataset = TokenDatasetDir(out_dir)
    seeds = [int(s) for s in receipt["seeds"]]
    files = receipt["files"]
    by_seed = {e["seed"]: e for e in files if e["format"] == schema.FORMAT_PARQUET}
    if all(s in by_seed for s in seeds):
        columns: list[dict[str, np.ndarray]] = []
        for seed in seeds:
            table = pq.read_table(io.BytesIO(_verified_bytes(dataset, by_seed[seed])))
            keys = table[schema.KEY].to_pylist()
            tokens = np.asarray(table[schema.TOKENS].to_pylist(), dtype=np.uint16)  # [R, N]
            columns.append(dict(zip(keys, tokens, strict=True)))
        return {key: np.stack([c[key] for c in columns]) for key in columns[0]}
    tar_entry = next(e for e in files if e["format"] == schema.FORMAT_WEBDATASET)
    out: dict[str, np.ndarray] = {}
    data = _verified_bytes(dataset, tar_entry)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar:
            if member.name.endswith("." + schema.WDS_TOKENS):
                key = member.name[: -len(schema.WDS_TOKENS) - 1]
                out[key] = np.load(io.BytesIO(tar.extractfile(member).read()))  # [K_old, N]
    return out


def next_versions(
    dataset: TokenDatasetDir,
    seeds: list[int],
    num_shards: int,
    identity: dict,
    previous: dict | None = None,
) -> list[dict]:
    """The version log after this run: unchanged, or one more entry for what it added.

    ``previous``: a receipt the run started from, standing in for version 1 when the dataset
    has no log yet (made before versions were recorded).
    """
    try:
        versions = dataset.read_json(VERSIONS_NAME)
    except FileNotFoundError:
        versions = []
    state = {"seeds": [int(s) for s in seeds], "shards": int(num_shards)}
    if not versions and previous is not None:
        first = {"seeds": previous["seeds"], "shards": previous["num_shards"]}
        versions = [{"version": 1, **first, "identity": previous.get("job")}]
    if not versions:
        return [{"version": 1, **state, "identity": identity}]
    last = versions[-1]
    if last["seeds"] == state["seeds"] and last["shards"] == state["shards"]:
        return versions
    added = {
        "seeds": [s for s in state["seeds"] if s not in last["seeds"]],
        "shards": state["shards"] - last["shards"],
    }
    at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    entry = {"version": last["version"] + 1, **state, "added": added, "at": at}
    return [*versions, {**entry, "identity": identity}]
