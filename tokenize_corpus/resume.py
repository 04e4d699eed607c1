"""Which finished shards a rerun keeps; the rules are docs/design.md §4 ("Resume").

The work is split so the driver never reads image or token bytes:

- on the driver, :func:`check_job_identity` compares each receipt's job identity (JSON it has
  read anyway) with the current run's and refuses another job's directory (:class:`ResumeRefused`);
- on the workers, :func:`check_receipt` (one Dask task per shard with a receipt) re-hashes the
  image shard and the shard's token files and says whether the receipt still holds;
- on the driver again, :func:`plan_resume` turns those verdicts into a :class:`ResumePlan`.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from shards.dataset import TokenDatasetDir
from shards.records import ImageShard
from tokenize_corpus.errors import ResumeRefused
from tokenize_corpus.identity import (
    added_seeds,
    identity_changes,
    image_shard_changes,
    image_shard_identity,
)

log = logging.getLogger(__name__)


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


def check_job_identity(
    dataset: TokenDatasetDir,
    receipts: dict[int, dict],
    identity: dict,
    skip: Collection[str] = (),
) -> None:
    """Refuse (``ResumeRefused``) when any receipt was made by another job.

    ``skip``: identity fields not known yet (the precision, before remote workers resolve it).
    """

    def known(job: dict | None) -> dict | None:
        return {k: v for k, v in job.items() if k not in skip} if isinstance(job, dict) else job

    identity = known(identity)
    foreign = {
        i: identity_changes(known(r.get("job")), identity)
        for i, r in receipts.items()
        if added_seeds(known(r.get("job")), identity) is None
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


def check_receipt(dataset: TokenDatasetDir, shard: ImageShard, receipt: dict) -> str:
    """A Dask task: "" when ``receipt`` still holds for ``shard``, else why it does not.

    Reads the image shard (its sha256, or its records for a folder slice) and every token file
    the receipt lists (size, then sha256): the bytes a resume must check, read on a worker.
    """
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


def plan_resume(
    shards: Sequence[ImageShard],
    receipts: dict[int, dict],
    identity: dict,
    verdicts: dict[int, str],
) -> ResumePlan:
    """Split the current shards into kept, extended and to-do, from the workers' ``verdicts``
    (shard index -> :func:`check_receipt`'s answer, for every shard with a receipt)."""
    plan = ResumePlan()
    for shard in shards:
        if shard.index not in receipts:
            continue
        receipt, why = receipts[shard.index], verdicts[shard.index]
        if why:
            plan.redo[shard.index] = why
            log.warning("%s will be redone: %s", shard.name, why)
            continue
        if int(receipt["num_shards"]) != len(shards):
            plan.renumber.add(shard.index)
        grows = added_seeds(receipt.get("job"), identity) is not None
        (plan.extend if grows else plan.kept)[shard.index] = receipt
    plan.todo = [s for s in shards if s.index not in plan.kept]
    return plan
