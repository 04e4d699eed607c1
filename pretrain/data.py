"""Stage 3 data path (docs/design.md §5): image shards and their aligned token shards, read side by side.

Each sample is one image: it picks one of its K stored views (a deterministic function of run
seed, epoch and key), re-renders that view from the *stored* ``ViewParams`` with the same function
stage 2 used (``shards.views.render_view``: never re-sampled), normalises it with the ImageNet
mean/std, gets a block-wise mask drawn from (run seed, epoch, key), and carries the stored tokens
of that view. Images that stage 2 skipped are skipped here too, and counted.

Work is split by whole shards over DDP ranks and DataLoader workers: every epoch the shard order
is shuffled with a generator seeded by (run seed, epoch), identically on every rank, and global
worker ``w`` of ``W`` takes shards ``w, w + W, ...`` of that order. Inside a worker a seeded
shuffle buffer mixes samples. Because shard sizes are known from the receipts, every rank can
compute the same number of batches per epoch without talking to the others.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pretrain.masking import block_mask
from shards.decode import decode_image
from shards.images import ImageShard, iter_shard, list_shards
from shards.reader import TokenDataset, TokenDatasetMismatch
from shards.views import IMAGENET_MEAN, IMAGENET_STD, normalize, render_view, to_unit

log = logging.getLogger(__name__)


class PretrainDataError(ValueError):
    """Image shards and token shards do not fit together; the message says what to do."""


def stable_hash(*parts: object) -> int:
    """A 63-bit integer from sha256 over the parts' text: stable across processes and machines
    (Python's ``hash()`` is salted per process, so it must never pick a view or a mask)."""
    text = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def seed_index(num_seeds: int, run_seed: int, epoch: int, key: str) -> int:
    """Which of an image's K stored views it uses in ``epoch``.

    A per-image offset (from run seed and key) plus the epoch, modulo K: every image cycles
    through all K views once every K epochs, in an order that differs between images.
    """
    return (stable_hash("view", run_seed, key) + epoch) % num_seeds


def sample_rng(run_seed: int, epoch: int, key: str) -> np.random.Generator:
    """The generator that draws one sample's mask: a function of (run seed, epoch, key) only."""
    return np.random.default_rng([stable_hash("mask", run_seed, epoch, key), run_seed, epoch])


def shard_order(num_shards: int, run_seed: int, epoch: int) -> list[int]:
    """The epoch's shard order: the same on every rank and worker."""
    rng = np.random.default_rng([stable_hash("shards", run_seed), epoch])
    return [int(i) for i in rng.permutation(num_shards)]


def shards_for(
    num_shards: int, run_seed: int, epoch: int, worker: int, num_workers: int
) -> list[int]:
    """Shards that global worker ``worker`` of ``num_workers`` (ranks x loader workers) reads."""
    return shard_order(num_shards, run_seed, epoch)[worker::num_workers]


@dataclass(frozen=True)
class ShardInfo:
    """What the receipts say about one token shard: rows written and keys skipped in stage 2."""

    index: int
    rows: int
    skipped: frozenset[str]


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


def check_token_dataset(
    tokens: TokenDataset,
    image_shards: Sequence[ImageShard],
    *,
    vocab_size: int,
    grid: tuple[int, int],
    image_size: int,
) -> list[ShardInfo]:
    """Refuse a token dataset that does not fit the model or the images; return its shards.

    Checks schema, codebook size vs the LM head, patch grid and image size (``TokenDataset.check``
    names both values on a mismatch), that there is one token shard per image shard and that every
    token shard is done (has a receipt).
    """
    tokens.check(codebook_size=vocab_size, grid=tuple(grid), image_size=image_size)
    if tokens.num_shards != len(image_shards):
        raise TokenDatasetMismatch(
            f"the token dataset has {tokens.num_shards} shards but the image source has "
            f"{len(image_shards)}: stage 3 needs the images stage 2 tokenized, sharded the same way "
            "(check images= and shard_size=)"
        )
    receipts = tokens.receipts
    missing = sorted(set(tokens.missing_shards) | (set(range(tokens.num_shards)) - set(receipts)))
    if missing:
        names = ", ".join(f"{i} ({image_shards[i].name})" for i in missing[:20])
        raise PretrainDataError(
            f"token dataset {tokens.path} is missing the token shards of image shards {names}"
            f"{' ...' if len(missing) > 20 else ''}: rerun stage 2 (pipeline run stage=tokenize) "
            "with the same out_dir; it redoes only the missing shards"
        )
    return [
        ShardInfo(i, int(receipts[i]["rows"]), _skipped_keys(receipts[i].get("skipped", [])))
        for i in range(tokens.num_shards)
    ]


class MIMDataset(IterableDataset):
    """Masked-image-modelling samples from image shards + their token dataset.

    Yields dicts: ``key`` (the image key), ``view`` float32 [3, H, W] (normalised), ``mask`` bool [N], ``tokens`` int64 [N]
    (the stored tokens of that view), ``skipped`` int (images skipped since the previous sample of
    this worker) and, with ``online=True``, ``view_uint8`` uint8 [3, H, W] (the same view before
    normalisation, for a tokenizer in the loop).
    """

    def __init__(
        self,
        images: str,
        tokens: TokenDataset,
        *,
        vocab_size: int,
        grid: tuple[int, int],
        image_size: int,
        num_masked: int,
        min_patches: int = 16,
        run_seed: int = 0,
        shard_size: int = 256,
        shuffle_buffer: int = 0,
        rank: int = 0,
        world_size: int = 1,
        online: bool = False,
    ) -> None:
        super().__init__()
        self.image_shards = list_shards(images, shard_size=shard_size)
        self.tokens = tokens
        self.shards = check_token_dataset(
            tokens, self.image_shards, vocab_size=vocab_size, grid=grid, image_size=image_size
        )
        self.seeds = tuple(int(s) for s in tokens.seeds)
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_masked = num_masked
        self.min_patches = min_patches
        self.run_seed = run_seed
        self.shuffle_buffer = shuffle_buffer
        self.rank = rank
        self.world_size = world_size
        self.online = online
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: shard order, view choice and masks all depend on it."""
        self.epoch = epoch

    def worker_shards(self, epoch: int, rank: int, worker: int, num_workers: int) -> list[int]:
        """Shard indices read by loader worker ``worker`` of rank ``rank`` in ``epoch``."""
        total = self.world_size * max(1, num_workers)
        glob = rank * max(1, num_workers) + worker
        return shards_for(len(self.shards), self.run_seed, epoch, glob, total)

    def batches_per_epoch(self, batch_size: int, num_workers: int) -> int:
        """Full batches every rank can produce in ``self.epoch`` (the minimum over ranks).

        A DataLoader over an IterableDataset batches each worker's stream separately and drops each
        worker's last partial batch, so a rank yields sum_w floor(rows_w / batch) batches. DDP needs
        the same step count on every rank, hence the minimum.
        """
        per_rank = []
        for rank in range(self.world_size):
            total = 0
            for worker in range(max(1, num_workers)):
                idx = self.worker_shards(self.epoch, rank, worker, num_workers)
                total += sum(self.shards[i].rows for i in idx) // batch_size
            per_rank.append(total)
        return min(per_rank)

    @property
    def num_rows(self) -> int:
        """Images with tokens (one sample each per epoch, before splitting)."""
        return sum(s.rows for s in self.shards)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor | int | str]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        shards = self.worker_shards(epoch, self.rank, worker, num_workers)
        glob = self.rank * num_workers + worker
        rng = np.random.default_rng([stable_hash("buffer", self.run_seed), epoch, glob])
        # Keep at least one sample back so skips seen after it are reported with a later sample.
        size = max(1, self.shuffle_buffer)
        buffer: list[tuple[str, bytes, object]] = []
        skipped = 0
        for item in self._records(shards):
            if item is None:
                skipped += 1
                continue
            buffer.append(item)
            if len(buffer) > size:
                yield self._sample(*self._pop(buffer, rng), epoch, skipped)
                skipped = 0
        while buffer:
            yield self._sample(*self._pop(buffer, rng), epoch, skipped)
            skipped = 0

    @staticmethod
    def _pop(buffer: list, rng: np.random.Generator) -> tuple[str, bytes, object]:
        pick = int(rng.integers(len(buffer)))
        buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
        return buffer.pop()

    def _records(self, shard_indices: Sequence[int]) -> Iterator[tuple[str, bytes, object] | None]:
        """(key, image bytes, token row) per image with tokens; None for an image stage 2 skipped."""
        for i in shard_indices:
            rows = self.tokens.read_shard(i)  # key -> TokenRow (all seeds)
            known = self.shards[i].skipped
            seen = 0
            for record in iter_shard(self.image_shards[i]):
                row = rows.get(record.key)
                if row is None:
                    if record.error is not None or record.key in known:
                        yield None
                        continue
                    raise PretrainDataError(
                        f"image {record.key!r} of {self.image_shards[i].name} has no tokens in token "
                        f"shard {i} and was not skipped by stage 2: these images are not the ones "
                        "that were tokenized (check images= against the token dataset's manifest)"
                    )
                seen += 1
                yield record.key, record.data, row
            if seen != len(rows):
                raise PretrainDataError(
                    f"token shard {i} has {len(rows)} rows but {self.image_shards[i].name} holds "
                    f"only {seen} of their images: the image shard changed since stage 2"
                )

    def _sample(
        self, key: str, data: bytes, row: object, epoch: int, skipped: int
    ) -> dict[str, torch.Tensor | int | str]:
        k = seed_index(len(self.seeds), self.run_seed, epoch, key)
        params = row.views[k]  # type: ignore[attr-defined]
        view_uint8 = render_view(decode_image(data), params)  # uint8 [3, H, W]
        view = normalize(to_unit(view_uint8), IMAGENET_MEAN, IMAGENET_STD)  # float32 [3, H, W]
        mask = block_mask(
            self.grid, self.num_masked, sample_rng(self.run_seed, epoch, key), self.min_patches
        )  # bool [N]
        tokens = torch.from_numpy(np.asarray(row.tokens[k], dtype=np.int64))  # type: ignore[attr-defined]
        sample: dict[str, torch.Tensor | int | str] = {
            "key": key,
            "view": view,
            "mask": torch.from_numpy(np.asarray(mask, dtype=bool)),
            "tokens": tokens,
            "skipped": skipped,
        }
        if self.online:
            sample["view_uint8"] = view_uint8
        return sample
