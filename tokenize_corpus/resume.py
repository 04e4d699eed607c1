"""Which finished shards a rerun keeps (docs/design.md §4; README, "Resume, and what it refuses").

A receipt is kept only when everything it was made from still holds:

1. **the job identity** (tokenizer fingerprint, augmentation, seeds, precision, formats, schema
   version) equals the current run's. When any receipt differs, the run is **refused** before
   anything is written, naming the fields: the directory holds another dataset (for example the
   tokenizer file was replaced under the same path), and redoing it silently would destroy a
   dataset someone may be reading. Use a new ``out_dir``, or delete the old one to rebuild.
   One difference is not refused: a receipt whose seeds are a prefix of the current seeds is
   **extended**: only the added seeds are computed for that shard.
2. **the image shard** (listing and checksum, ``tokenize_corpus.identity``) equals the source
   now: otherwise the shard is **redone** (its tokens belong to other pixels). When only the
   number of shards changed (image shards appended), a matching shard is kept and its
   files are renamed to the new count (``train-<i>-of-<n>``), their bytes unchanged.
3. **its token files** exist with the recorded size and sha256: otherwise it is **redone**, so a
   rerun repairs corruption.

Checking costs one read of the image shards and the token files that have receipts (hashing,
no decode), done in a thread pool: a small fraction of the tokenization itself.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.errors import UserError
from tokenize_corpus.identity import (
    added_seeds,
    identity_changes,
    image_shard_changes,
    image_shard_identity,
)

if TYPE_CHECKING:
    from shards.dataset import TokenDatasetDir
    from shards.images import ImageShard

log = logging.getLogger(__name__)

# Threads hashing image shards and token files (I/O bound; hashlib releases the GIL).
HASH_THREADS = 8


class ResumeRefused(UserError):
    """out_dir holds shards made by another job; the message names what differs."""


@dataclass
class ResumePlan:
    """The verdict on each image shard of the current source."""

    kept: dict[int, dict] = field(default_factory=dict)  # shard index -> receipt kept as is
    redo: dict[int, str] = field(default_factory=dict)  # shard index -> why its receipt is not
    extend: dict[int, dict] = field(default_factory=dict)  # shard index -> receipt to add seeds to
    # kept or extended shards whose files carry another shard count in their names (image
    # shards were appended or removed): renamed, bytes unchanged (TokenDatasetDir.renumber)
    renumber: set[int] = field(default_factory=set)
    todo: list[ImageShard] = field(default_factory=list)  # shards to tokenize, in order


def check_job_identity(dataset: TokenDatasetDir, receipts: dict[int, dict], identity: dict) -> None:
    """Refuse (``ResumeRefused``) when any receipt was made by another job."""
    foreign = {
        i: identity_changes(r.get("job"), identity)
        for i, r in receipts.items()
        if added_seeds(r.get("job"), identity) is None
    }
    foreign = {i: changed for i, changed in foreign.items() if changed}
    if not foreign:
        return
    first = min(foreign)
    old = receipts[first].get("job") or {}
    fields = sorted({f for changed in foreign.values() for f in changed})
    detail = "; ".join(
        f"{f}: {_short(old.get(f))} there, {_short(identity.get(f))} now" for f in fields
    )
    if not receipts[first].get("job"):
        detail = "its receipts record no job identity (written by an older version)"
    raise ResumeRefused(
        f"out_dir={dataset.url} holds {len(foreign)} finished shard(s) made by another job "
        f"({detail}). Mixing them with this run would make a dataset of two kinds of tokens. "
        "Use a new out_dir, or delete this one to rebuild it with the current settings."
    )


def _short(value: object) -> str:
    text = repr(value)
    if isinstance(value, str) and len(value) == 64:  # a fingerprint
        text = repr(value[:12] + "...")
    return text if len(text) <= 80 else text[:77] + "..."


def _verdict(dataset: TokenDatasetDir, shard: ImageShard, receipt: dict) -> str:
    """ "" when the receipt still holds for ``shard``, else why it does not."""
    try:
        current = image_shard_identity(shard)
    except Exception as err:  # unreadable now: the task will report it properly
        return f"image shard unreadable now ({type(err).__name__}: {err})"
    changed = image_shard_changes(receipt.get("image_shard"), current)
    if changed:
        return f"image shard changed ({', '.join(changed)})"
    damaged = dataset.damaged_files(receipt)
    if damaged:
        return f"token files missing or damaged ({', '.join(list(damaged)[:3])})"
    return ""


def plan_resume(dataset: TokenDatasetDir, shards: list[ImageShard], identity: dict) -> ResumePlan:
    """Split the current shards into kept and to-do (see the module docstring)."""
    receipts = dataset.receipts()
    check_job_identity(dataset, receipts, identity)
    plan = ResumePlan()
    with_receipt = [s for s in shards if s.index in receipts]
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        verdicts = list(pool.map(lambda s: _verdict(dataset, s, receipts[s.index]), with_receipt))
    for shard, why in zip(with_receipt, verdicts, strict=True):
        receipt = receipts[shard.index]
        if why:
            plan.redo[shard.index] = why
            log.warning("%s will be redone: %s", shard.name, why)
        else:
            if int(receipt["num_shards"]) != len(shards):
                plan.renumber.add(shard.index)
            grows = added_seeds(receipt.get("job"), identity) is not None
            (plan.extend if grows else plan.kept)[shard.index] = receipt
    plan.todo = [s for s in shards if s.index not in plan.kept]
    return plan
