"""What a token shard was made from, as every receipt records it (docs/design.md §4, "Resume").

- :func:`job_identity`: the settings every token depends on (tokenizer fingerprint,
  augmentation, seeds, resolved precision, formats, schema version);
- :func:`image_shard_identity`: the image shard's kind, listing and checksum (the file's sha256,
  or :class:`RecordsDigest` over a folder slice's records), and the keys it skips because an
  earlier shard has them;
- the comparisons a rerun makes with them: :func:`identity_changes`,
  :func:`image_shard_changes`, :func:`added_seeds`.

:class:`RecordsDigest` hashes ``key NUL len NUL bytes`` per record in shard order, so a shard task
(while it reads) and a resume check (``tokenize_corpus.resume.check_receipt``) compute the same
value without sharing state.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

from engine.config import to_dict
from shards import schema
from shards.images import iter_shard
from shards.records import ImageRecord, ImageShard
from shards.storage import dataset_fs, file_sha256
from shards.views import AugConfig

# Image-shard fields compared on resume, by shard kind (the URL is not: a moved copy of the same
# bytes is the same input). ``duplicates_sha256``: the keys an earlier shard has, which this
# shard skips (shards.images.source_keys); present only when there are some.
COMPARED = {
    "folder": ("kind", "listing_sha256", "records", "records_sha256", "duplicates_sha256"),
    "webdataset": ("kind", "size", "sha256", "duplicates_sha256"),
    "parquet": ("kind", "size", "sha256", "duplicates_sha256"),
}


def job_identity(
    fingerprint: str,
    aug: AugConfig,
    seeds: tuple[int, ...],
    precision: str,
    formats: tuple[str, ...],
) -> dict[str, Any]:
    """The settings every token of the dataset depends on (JSON-able, stored in each receipt)."""
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "tokenizer_fingerprint": fingerprint,
        "aug": to_dict(aug),  # tuples as lists: equal to its JSON read back
        "seeds": [int(s) for s in seeds],
        "precision": precision,
        "formats": sorted(formats),
    }


def view_facts(
    aug: AugConfig, seeds: Sequence[int], images: str, shard_size: int, shards: Sequence[ImageShard]
) -> dict[str, Any]:
    """What the manifest records about where the views come from: the augmentation, the seeds,
    the image source (absolute) and its shards. The driver writes these into the manifest, and a
    token set is planned against the dataset's (``shards.token_sets.manifest_problems``)."""
    return {
        "aug": dataclasses.asdict(aug),
        "seeds": [int(s) for s in seeds],
        "images": {"source": images, "shard_size": int(shard_size), "kind": shards[0].kind},
        "num_shards": len(shards),
    }


def identity_changes(old: dict | None, new: dict) -> list[str]:
    """Names of the job-identity fields that differ (all of them when ``old`` is missing)."""
    if not isinstance(old, dict):
        return sorted(new)
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


class RecordsDigest:
    """sha256 over the records of one image shard, in order (see the module docstring)."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self.count = 0

    def update(self, record: ImageRecord) -> None:
        self._digest.update(f"{record.key}\0{len(record.data)}\0".encode())
        self._digest.update(record.data)
        self.count += 1

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def listing_sha256(shard: ImageShard) -> str | None:
    """sha256 of a folder slice's listing (key, file, label per image); None for file shards."""
    if shard.kind != "folder":
        return None
    digest = hashlib.sha256()
    labels = shard.labels or (-1,) * len(shard.keys)
    for key, rel, label in zip(shard.keys, shard.files, labels, strict=True):
        digest.update(f"{key}\0{rel}\0{int(label)}\n".encode())
    return digest.hexdigest()


def file_facts(url: str) -> dict[str, Any]:
    """Size and sha256 of one tar/Parquet file."""
    fs, path = dataset_fs(url)
    return {"size": int(fs.size(path)), "sha256": file_sha256(fs, path)}


def image_shard_identity(shard: ImageShard, records: RecordsDigest | None = None) -> dict:
    """The image shard's facts for its receipt: kind, listing and checksum (see module doc).

    ``records``: the digest of the records a shard task just read; None = read them here (a
    resume check; folder slices only, file shards are hashed as files).
    """
    info: dict[str, Any] = {"kind": shard.kind}
    if shard.duplicates:  # an earlier shard gaining or losing a key changes this shard's rows
        text = "\n".join(f"{key}\0{where}" for key, where in shard.duplicates)
        info["duplicates_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    if shard.kind == "folder":
        if records is None:
            records = RecordsDigest()
            for record in iter_shard(shard):
                records.update(record)
        info.update(
            listing_sha256=listing_sha256(shard),
            records=records.count,
            records_sha256=records.hexdigest(),
        )
        return info
    if records is not None:
        info.update(records=records.count, records_sha256=records.hexdigest())
    info.update(file_facts(shard.url))
    return info


def image_shard_changes(stored: dict | None, current: dict) -> list[str]:
    """The compared image-shard fields that differ between a receipt and the source now."""
    stored = stored or {}
    fields = COMPARED.get(current.get("kind", ""), tuple(current))
    return [f for f in fields if stored.get(f) != current.get(f)]


def added_seeds(old: dict | None, new: dict) -> list[int] | None:
    """The seeds ``new`` adds to a receipt of ``old`` (seeds appended to a dataset), else None.

    An extension differs from the receipt's job in ``seeds`` alone, and the receipt's seeds are
    a strict prefix of the new ones (seed order is the order of the K axis in the WebDataset form).
    """
    if not isinstance(old, dict) or identity_changes(old, new) != ["seeds"]:
        return None
    before, after = list(old["seeds"]), list(new["seeds"])
    if len(before) >= len(after) or after[: len(before)] != before:
        return None
    return after[len(before) :]
