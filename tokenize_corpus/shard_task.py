"""The stage-2 task: tokenize one image shard and write its token files + receipt (docs/design.md §4).

:func:`tokenize_shard` runs on a Dask worker. It reads the image shard, decodes every image once,
renders its K views (one per seed) from that decode, tokenizes the views in batches and writes
the shard's files and then its receipt (``shards.writer.write_shard``). Decoding runs in a
prefetch thread so it overlaps the tokenizer's forward pass. Each row carries the sha256 of the
image bytes it was rendered from; the receipt carries the job's identity and the image shard's
listing and checksum (``tokenize_corpus.identity``).

Failure model: a bad image is skipped and listed in the receipt; a bad shard (``BadShard``) fails
that shard alone without retries (it is deterministic); any other exception is retried by Dask.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from shards.dataset import TokenDatasetDir
from shards.decode import BadImage, decode_image
from shards.images import iter_shard
from shards.records import BadShard, ImageShard
from shards.views import render_view, sample_view, to_unit
from shards.writer import TokenRow
from tokenize_corpus.append import stored_tokens
from tokenize_corpus.identity import RecordsDigest, image_shard_identity
from tokenize_corpus.prefetch import prefetch
from tokenize_corpus.worker import ShardJob, worker_tokenizer

if TYPE_CHECKING:
    from tokenize_corpus.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def decoded_views(
    shard: ImageShard, job: ShardJob, digest: RecordsDigest, first: int = 0
) -> Iterator[tuple]:
    """Per record, in shard order: ``("row", record, views, pixels [K-first,3,S,S] uint8)`` or
    ``("skip", key, why)``.

    Each image is decoded once and its views are rendered from that decode (docs/design.md §2):
    every seed's parameters, the pixels of seeds ``first`` onwards (the earlier ones are already
    stored when seeds are appended). ``digest`` is fed every record for the receipt's checksum.
    A duplicate key, a hidden file or a name with no key comes as an error record (the key rule
    of ``shards.images``): skipped with its reason like an image that does not decode.
    """
    for record in iter_shard(shard):
        digest.update(record)
        if record.error:
            yield ("skip", record.key, record.error)
            continue
        try:
            image = decode_image(record.data)
        except BadImage as err:
            yield ("skip", record.key, str(err))
            continue
        views = [sample_view(job.aug, record.key, s, image.width, image.height) for s in job.seeds]
        pixels = torch.stack([render_view(image, v) for v in views[first:]])  # [K', 3, S, S]
        yield ("row", record, views, pixels)


def encode_views(tokenizer: Tokenizer, pixels: torch.Tensor, precision: str) -> torch.Tensor:
    """uint8 views [B, 3, S, S] -> tokens [B, N] int64 on CPU.

    The encoder runs under autocast at ``precision``; the task layer and the codebook lookup in
    fp32 (``Tokenizer.encode``, docs/method.md §1).
    """
    with torch.inference_mode():
        unit = to_unit(pixels.to(tokenizer.device, non_blocking=True))  # [B, 3, S, S] in [0, 1]
        tokens = tokenizer.encode(unit, precision=precision)
    return tokens.cpu()  # [B, N]


def tokenize_shard(shard: ImageShard, job: ShardJob, previous: dict | None = None) -> dict:
    """One Dask task: tokenize image shard ``shard`` and write its files + receipt.

    ``previous``: the shard's receipt when seeds are appended to it (its seeds are a prefix of
    ``job.seeds``): only the added seeds are tokenized; the stored ones are read back from its
    files, so every file is what a run with all the seeds from scratch writes.

    Returns ``{"index", "name", "receipt", "rows", "skipped", "views", "seconds", ...}``, or
    ``{"index", "name", "failed": reason}`` for a bad shard (deterministic: not worth a retry).
    """
    start = time.perf_counter()
    tokenizer = worker_tokenizer(job)
    k, num_tokens = len(job.seeds), tokenizer.grid[0] * tokenizer.grid[1]
    rows: list[TokenRow] = []
    skipped: list[tuple[str, str]] = []
    pending: list[tuple[TokenRow, int, torch.Tensor]] = []  # views waiting for a full batch
    encode_seconds = 0.0

    def flush(count: int) -> None:
        nonlocal encode_seconds
        batch, pending[:] = pending[:count], pending[count:]
        tick = time.perf_counter()
        tokens = encode_views(tokenizer, torch.stack([p for _, _, p in batch]), job.precision)
        encode_seconds += time.perf_counter() - tick
        tokens = tokens.numpy().astype(np.uint16)  # [B, N]; codebook < 65536 checked by driver
        for (row, seed_position, _), row_tokens in zip(batch, tokens, strict=True):
            row.tokens[seed_position] = row_tokens

    first = len(previous["seeds"]) if previous else 0
    stored = stored_tokens(job.out_dir, previous) if previous else {}
    digest = RecordsDigest()
    depth = max(2, 2 * job.batch_size // (k - first))  # decoded images for about two batches
    try:
        for item in prefetch(decoded_views(shard, job, digest, first), depth):
            if item[0] == "skip":
                skipped.append((item[1], item[2]))
                continue
            _, record, views, pixels = item
            row = TokenRow(
                key=record.key,
                label=int(record.label),
                views=views,
                tokens=np.zeros((k, num_tokens), np.uint16),
                image_sha256=record.sha256,
            )
            if previous:
                row.tokens[:first] = stored[record.key]  # KeyError: not the same image shard
            rows.append(row)
            pending.extend((row, p, pixels[p - first]) for p in range(first, k))
            while len(pending) >= job.batch_size:
                flush(job.batch_size)
    except BadShard as err:
        log.warning("%s (%s) is a bad shard: %s", shard.name, shard.url, err)
        return {"index": shard.index, "name": shard.name, "failed": f"bad shard {shard.url}: {err}"}
    if pending:
        flush(len(pending))
    receipt = TokenDatasetDir(job.out_dir).write_shard(
        shard.index,
        job.num_shards,
        shard.url,
        job.seeds,
        rows,
        skipped,
        job.formats,
        tokenizer=tokenizer.describe(),
        num_tokens=num_tokens,
        image_shard_info=image_shard_identity(shard, digest),
        job=job.identity,
    )
    return {
        "index": shard.index,
        "name": shard.name,
        "receipt": receipt,
        "rows": len(rows),
        "skipped": len(skipped),
        "views": len(rows) * (k - first),
        "seconds": time.perf_counter() - start,
        "encode_seconds": encode_seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MiB); Linux reports ru_maxrss in KiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)
