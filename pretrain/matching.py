"""Which token rows go with which images: the aligned fast path, or matching by key (docs/design.md §5).

Stage 2 writes token shard ``i`` from image shard ``i``, so with the images it tokenized stage 3
reads the two side by side (``aligned``). A team with its own copy of the same images, packed
otherwise (other shard sizes, an ImageFolder, Hugging Face Parquet, other tar names), needs no
repacking: each of its image shards is matched to token rows by key through a
:class:`shards.key_index.KeyIndex` (``key``), and every row is verified by its image digest while
rendering, as in the aligned case. Token-dataset images missing from the copy are counted and
reported; images of the copy without tokens are skipped and counted. Keys follow the one rule of
``shards.images`` on both sides: a token dataset that holds a key twice is refused (``KeyIndex``),
and a key the copy has in two shards binds the first one's image, the later one is skipped.

``match="auto"`` takes the aligned path when the copy has the same number of shards and no
receipt contradicts it (same shard kind; same file size for tar/Parquet shards; same listing
for folder slices), otherwise matches by key.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import fsspec
import numpy as np

from pretrain.errors import PretrainDataError
from shards.images import source_keys
from shards.key_index import KeyIndex, shard_keys
from shards.reader import TokenDataset
from shards.records import ImageShard
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
    # the image shards as read; by key, a key an earlier shard of the copy has is marked on the
    # later one (shards.images.source_keys), so one image of the copy binds to each row
    image_shards: list[ImageShard]
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
        return ShardPlan("aligned", shards, list(image_shards))
    return _plan_by_key(tokens, image_shards)


def _plan_by_key(tokens: TokenDataset, image_shards: Sequence[ImageShard]) -> ShardPlan:
    index = KeyIndex.from_dataset(tokens)  # refuses a token dataset that holds a key twice
    listing = source_keys(image_shards)
    rows = index.shard.astype(np.int64) << 32 | index.row  # one number per token row [R]
    shards, hit, extra = [], [], 0
    for shard, keys in zip(listing.shards, listing.keys, strict=True):
        token_shard, row = index.lookup(keys)
        hits = token_shard >= 0
        extra += int((~hits).sum())
        hit.append(token_shard[hits].astype(np.int64) << 32 | row[hits])
        shards.append(
            ShardInfo(
                shard.index,
                int(hits.sum()),
                frozenset(),
                tuple(sorted(set(token_shard[hits].tolist()))),
            )
        )
    matched = np.unique(np.concatenate(hit or [np.zeros(0, np.int64)]))
    left_out = np.sort(rows[~np.isin(rows, matched)])  # token rows whose image the copy lacks
    examples = _keys_of(tokens, left_out[:5])
    why = listing.unreadable
    unreadable = [f"{s.url}: {why[s.index]}" for s in listing.shards if s.index in why]
    report = {
        "mode": "key",
        "token_rows": index.rows,
        "matched": len(matched),
        "missing_from_images": len(left_out),
        "missing_examples": examples,
        "images_without_tokens": extra,
        "unreadable_image_shards": unreadable,
    }
    log.info(
        "matched %d of %d token rows by key in %d image shards",
        len(matched),
        index.rows,
        len(shards),
    )
    if len(left_out):
        log.warning(
            "%d images of the token dataset are not in this copy of the images (e.g. %s); "
            "they are left out",
            len(left_out),
            ", ".join(examples),
        )
    if not len(matched):
        raise PretrainDataError(
            f"none of the {extra} images of {image_shards[0].url if image_shards else 'images='} "
            f"has a row in token dataset {tokens.path} (keys compared by the rule of "
            "shards.images): pass the images stage 2 tokenized, or a copy keyed the same way"
        )
    return ShardPlan("key", shards, listing.shards, index, report)


def _keys_of(tokens: TokenDataset, rows: np.ndarray) -> list[str]:
    """The keys of token rows given as ``shard << 32 | row``, in that order."""
    keys: dict[int, list[str]] = {}
    found = []
    for code in rows.tolist():
        shard = code >> 32
        if shard not in keys:
            keys[shard] = shard_keys(tokens, shard)
        found.append(keys[shard][code & 0xFFFFFFFF])
    return found
