"""Which token rows go with which images: the aligned fast path, or matching by key (docs/design.md §5).

Stage 2 writes token shard ``i`` from image shard ``i``, so with the images it tokenized stage 3
reads the two side by side (``aligned``). A team with its own copy of the same images, packed
otherwise (other shard sizes, an ImageFolder, Hugging Face Parquet, other tar names), needs no
repacking: each of its image shards is matched to token rows by key through a
:class:`shards.key_index.KeyIndex` (``key``), and every row is verified by its image digest while
rendering, as in the aligned case. Token-dataset images missing from the copy are counted and
reported; images of the copy without tokens are skipped and counted.

``match="auto"`` takes the aligned path when the copy has the same number of shards and no
receipt contradicts it (same shard kind; same file size for tar/Parquet shards; same listing
for folder slices), otherwise matches by key.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import fsspec

from pretrain.errors import PretrainDataError
from shards.images import list_keys
from shards.key_index import KeyIndex, shard_keys
from shards.reader import TokenDataset
from shards.records import BadShard, ImageShard
from tokenize_corpus.identity import listing_sha256

log = logging.getLogger(__name__)


MATCHES = ("auto", "aligned", "key")


@dataclass(frozen=True)
class ShardInfo:
    """One image shard as stage 3 reads it: rows it will yield, keys stage 2 skipped, and the
    token shards its rows live in (``(index,)`` when aligned)."""

    index: int
    rows: int
    skipped: frozenset[str]
    token_shards: tuple[int, ...] = ()


@dataclass
class ShardPlan:
    """How the image shards map onto the token dataset."""

    mode: str  # "aligned" or "key"
    shards: list[ShardInfo]
    index: KeyIndex | None = None
    report: dict = field(default_factory=dict)


def _skipped_keys(entries: Sequence[object]) -> frozenset[str]:
    # A receipt lists skips as [key, reason] pairs (or {"key":..., "reason":...}).
    keys = []
    for entry in entries:
        if isinstance(entry, dict):
            keys.append(str(entry["key"]))
        elif isinstance(entry, (list, tuple)):
            keys.append(str(entry[0]))
        else:
            keys.append(str(entry))
    return frozenset(keys)


def aligned_with(tokens: TokenDataset, image_shards: Sequence[ImageShard]) -> bool:
    """Whether image shard i is (as far as the receipts tell without reading it) token shard i's."""
    if tokens.num_shards != len(image_shards):
        return False

    for shard in image_shards:
        facts = (tokens.receipts.get(shard.index) or {}).get("image_shard") or {}
        if facts.get("kind") not in (None, shard.kind):
            return False
        if shard.kind == "folder":
            recorded = facts.get("listing_sha256")
            if recorded is not None and recorded != listing_sha256(shard):
                return False
        elif facts.get("size") is not None:
            fs, path = fsspec.core.url_to_fs(shard.url)
            if fs.size(path) != facts["size"]:
                return False
    return True


def plan_shards(
    tokens: TokenDataset, image_shards: Sequence[ImageShard], match: str = "auto"
) -> ShardPlan:
    """The plan for reading ``image_shards`` with ``tokens`` (see the module docstring)."""
    if match not in MATCHES:
        raise ValueError(f"match={match!r}: choose from {list(MATCHES)}")
    if match == "aligned" or (match == "auto" and aligned_with(tokens, image_shards)):
        receipts = tokens.receipts
        shards = [
            ShardInfo(
                i,
                int(receipts[i]["rows"]),
                _skipped_keys(receipts[i].get("skipped", [])),
                (i,),
            )
            for i in range(tokens.num_shards)
        ]
        return ShardPlan("aligned", shards)
    return _plan_by_key(tokens, image_shards)


def _plan_by_key(tokens: TokenDataset, image_shards: Sequence[ImageShard]) -> ShardPlan:
    index = KeyIndex.from_dataset(tokens)
    shards, found, extra, unreadable = [], set(), 0, []
    examples: list[str] = []
    for shard in image_shards:
        try:
            keys = list_keys(shard)
        except BadShard as err:
            unreadable.append(f"{shard.url}: {err}")
            keys = []
        token_shard, row = index.lookup(keys)
        hits = token_shard >= 0
        extra += int((~hits).sum())
        found.update(zip(token_shard[hits].tolist(), row[hits].tolist(), strict=True))
        shards.append(
            ShardInfo(
                shard.index,
                int(hits.sum()),
                frozenset(),
                tuple(sorted(set(token_shard[hits].tolist()))),
            )
        )
    missing = index.rows - len(found)
    if missing:
        for i in sorted(tokens.receipts):
            for j, key in enumerate(shard_keys(tokens, i)):
                if (i, j) not in found:
                    examples.append(key)
                if len(examples) >= 5:
                    break
            if len(examples) >= 5:
                break
    report = {
        "mode": "key",
        "token_rows": index.rows,
        "matched": len(found),
        "missing_from_images": missing,
        "missing_examples": examples,
        "images_without_tokens": extra,
        "unreadable_image_shards": unreadable,
    }
    log.info(
        "matched %d of %d token rows by key in %d image shards", len(found), index.rows, len(shards)
    )
    if missing:
        log.warning(
            "%d images of the token dataset are not in this copy of the images (e.g. %s); "
            "they are left out",
            missing,
            ", ".join(examples),
        )
    if not found:
        raise PretrainDataError(
            f"none of the {extra} images of {image_shards[0].url if image_shards else 'images='} "
            f"has a row in token dataset {tokens.path} (keys compared by the rule of "
            "shards.images): pass the images stage 2 tokenized, or a copy keyed the same way"
        )
    return ShardPlan("key", shards, index, report)
