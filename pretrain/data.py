"""Stage 3 data path: :class:`MIMDataset` reads image shards and their token shards side by side.

Each sample is one image: one of its K stored views, re-rendered from its stored ``ViewParams``
with the function stage 2 used (``shards.views.render_view``), normalised, with a block mask and
the view's stored tokens. Which view each epoch, what is verified before and while reading
(``shards.verify``), how a copy of the images is matched by key (``pretrain.matching``) and how
shards are split over ranks and DataLoader workers are docs/design.md §5.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pretrain.errors import PretrainDataError
from pretrain.masking import block_mask
from pretrain.matching import ShardPlan, plan_shards
from shards.decode import decode_image
from shards.errors import TokenDatasetMismatch
from shards.images import iter_shard, list_shards
from shards.key_index import KeyIndex
from shards.reader import TokenDataset
from shards.records import BadShard, ImageRecord, ImageShard
from shards.verify import check_image_digest, preflight
from shards.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugConfig,
    normalize,
    render_view,
    sample_view,
    to_unit,
)
from shards.writer import TokenRow

# Token shards a loader worker keeps decoded (matching by key reads a token shard for every image
# shard whose rows live in it; neighbouring image shards usually share one).
TOKEN_CACHE = 8

log = logging.getLogger(__name__)


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


def fresh_seed(run_seed: int, epoch: int) -> int:
    """The view seed of ``views.source=fresh`` in ``epoch``: new every epoch, fixed per run seed
    (>= 2**31, so it never equals a stored seed nor seed 0, the optional evaluation view)."""
    return 2**31 + stable_hash("fresh", run_seed, epoch) % 2**31


def aug_from_manifest(tokens: TokenDataset) -> AugConfig:
    """The augmentation stage 2 sampled its views with (the manifest's ``aug``)."""
    stored = tokens.manifest.get("aug")
    if not isinstance(stored, dict):
        raise PretrainDataError(
            f"token dataset {tokens.path} records no augmentation (manifest 'aug'), which "
            "views.source=fresh samples from; use views.source=stored"
        )
    known = {f.name for f in dataclasses.fields(AugConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in known}
    return AugConfig(**values)


def check_token_dataset(
    tokens: TokenDataset,
    image_shards: Sequence[ImageShard],
    *,
    vocab_size: int,
    grid: tuple[int, int],
    image_size: int,
    match: str = "auto",
    verify: bool = True,
) -> ShardPlan:
    """Refuse a token dataset that does not fit the model or the images; return the read plan.

    Checks schema, codebook size vs the LM head, patch grid and image size (``TokenDataset.check``
    names both values on a mismatch), that every token shard is done (has a receipt), and with
    ``verify`` that manifest, receipts and footers agree and every file is there at its size
    (``shards.verify.preflight``). Then plans which token rows go with which image shard; a key
    with two rows in the token dataset is refused (``shards.errors.DuplicateKeys``), matched by
    key or, with ``verify``, aligned.
    """
    tokens.check(codebook_size=vocab_size, grid=tuple(grid), image_size=image_size)
    if match == "aligned" and tokens.num_shards != len(image_shards):
        raise TokenDatasetMismatch(
            f"the token dataset has {tokens.num_shards} shards but the image source has "
            f"{len(image_shards)}: match=aligned needs the images stage 2 tokenized, sharded the "
            "same way (check images= and shard_size=), or use match=auto to match by key"
        )
    receipts = tokens.receipts
    missing = sorted(set(tokens.missing_shards) | (set(range(tokens.num_shards)) - set(receipts)))
    if missing:
        names = ", ".join(f"{i} (shard-{i:06d})" for i in missing[:20])
        raise PretrainDataError(
            f"token dataset {tokens.path} is missing the token shards of image shards {names}"
            f"{' ...' if len(missing) > 20 else ''}: rerun stage 2 (pipeline run stage=tokenize) "
            "with the same out_dir; it redoes only the missing shards"
        )
    if verify:
        preflight(tokens)
    plan = plan_shards(tokens, image_shards, match)
    if verify and plan.index is None:
        KeyIndex.from_dataset(tokens)  # aligned needs no index, but a key twice is damage too
    return plan


def _read_to_the_end(shard: ImageShard) -> Iterator[ImageRecord]:
    """The records of an image shard; one that breaks off is refused (its images are not the
    ones stage 2 read whole)."""
    try:
        yield from iter_shard(shard)
    except BadShard as err:
        raise PretrainDataError(
            f"{shard.url} cannot be read to the end ({err}): restore the image shard stage 2 "
            "tokenized, or repack the images and tokenize them again"
        ) from None


class MIMDataset(IterableDataset):
    """Masked-image-modelling samples from image shards + their token dataset.

    Yields dicts: ``key`` (the image key), ``view`` float32 [3, H, W] (normalised), ``mask`` bool
    [N], ``tokens`` int64 [N] (the stored tokens of that view; zeros with ``source="fresh"``,
    whose targets come from the tokenizer in the loop), ``skipped`` int (images skipped since
    the previous sample of this worker) and, with ``online=True``, ``view_uint8`` uint8
    [3, H, W] (the same view before normalisation, for a tokenizer in the loop).

    seeds: stored seeds to use (() = all); source: "stored" views or "fresh" ones (online only);
    match: "auto" | "aligned" | "key" (``pretrain.matching``); verify: the checks of
    ``shards.verify`` (off only to measure what they cost).
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
        seeds: Sequence[int] = (),
        source: Literal["stored", "fresh"] = "stored",
        match: str = "auto",
        verify: bool = True,
    ) -> None:
        super().__init__()
        if source not in ("stored", "fresh"):
            raise PretrainDataError(f"views.source={source!r}: choose stored or fresh")
        if source == "fresh" and not online:
            raise PretrainDataError(
                "views.source=fresh samples a new view every epoch, which has no stored tokens: "
                "it needs targets=online (and tokenizer=<the tokenizer checkpoint>)"
            )
        self.image_shards = list_shards(images, shard_size=shard_size)
        self.tokens = tokens
        self.seeds = tokens.select_seeds(seeds)  # refuses seeds the dataset does not store
        self.plan: ShardPlan = check_token_dataset(
            tokens,
            self.image_shards,
            vocab_size=vocab_size,
            grid=grid,
            image_size=image_size,
            match=match,
            verify=verify,
        )
        self.shards = self.plan.shards
        self.image_shards = self.plan.image_shards  # by key: the copy's duplicates marked
        self.source = source
        self.aug = aug_from_manifest(tokens) if source == "fresh" else None
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_masked = num_masked
        self.min_patches = min_patches
        self.run_seed = run_seed
        self.shuffle_buffer = shuffle_buffer
        self.rank = rank
        self.world_size = world_size
        self.online = online
        self.verify = verify
        self.epoch = 0
        self._cache: OrderedDict[int, dict[str, TokenRow]] = OrderedDict()

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
        buffer: list[tuple[str, bytes, TokenRow]] = []
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
    def _pop(buffer: list, rng: np.random.Generator) -> tuple[str, bytes, TokenRow]:
        pick = int(rng.integers(len(buffer)))
        buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
        return buffer.pop()

    def _token_rows(self, i: int) -> dict[str, TokenRow]:
        """Token shard ``i`` (the selected seeds), from a small per-worker cache."""
        rows = self._cache.pop(i, None)
        if rows is None:
            rows = self.tokens.read_shard(i, seeds=self.seeds, verify=self.verify)
        self._cache[i] = rows
        while len(self._cache) > TOKEN_CACHE:
            self._cache.popitem(last=False)
        return rows

    def _records(
        self, shard_indices: Sequence[int]
    ) -> Iterator[tuple[str, bytes, TokenRow] | None]:
        """(key, image bytes, token row) per image with tokens; None for an image skipped."""
        aligned = self.plan.mode == "aligned"
        for i in shard_indices:
            info, shard = self.shards[i], self.image_shards[i]
            where: dict[str, int] = {}  # key -> token shard
            rows: dict[str, TokenRow] = {}
            for t in info.token_shards:
                found = self._token_rows(t)
                rows.update(found)
                where.update(dict.fromkeys(found, t))
            seen = 0
            for record in _read_to_the_end(shard):
                row = rows.get(record.key)
                if row is None or record.error is not None:
                    unknown = record.error is None and record.key not in info.skipped
                    if row is None and aligned and unknown:
                        raise PretrainDataError(
                            f"image {record.key!r} of {shard.name} has no tokens in token "
                            f"shard {i} and was not skipped by stage 2: these images are not "
                            "the ones that were tokenized (check images= against the token "
                            "dataset's manifest)"
                        )
                    yield None
                    continue
                if self.verify:
                    check_image_digest(
                        record.key,
                        record.sha256,
                        row.image_sha256,
                        f"{shard.name} ({shard.url})",
                        where[record.key],
                        self.tokens.path,
                    )
                seen += 1
                yield record.key, record.data, row
            if aligned and seen != len(rows):
                raise PretrainDataError(
                    f"token shard {i} has {len(rows)} rows but {shard.name} holds only {seen} of "
                    "their images: the image shard changed since stage 2"
                )

    def _sample(
        self, key: str, data: bytes, row: TokenRow, epoch: int, skipped: int
    ) -> dict[str, torch.Tensor | int | str]:
        image = decode_image(data)
        if self.aug is not None:  # views.source=fresh: a new view each epoch, no stored tokens
            params = sample_view(
                self.aug, key, fresh_seed(self.run_seed, epoch), image.width, image.height
            )
            tokens = torch.zeros(self.grid[0] * self.grid[1], dtype=torch.int64)
        else:
            k = seed_index(len(self.seeds), self.run_seed, epoch, key)
            params = row.views[k]
            tokens = torch.from_numpy(np.asarray(row.tokens[k], dtype=np.int64))  # [N]
        view_uint8 = render_view(image, params)  # uint8 [3, H, W]
        view = normalize(to_unit(view_uint8), IMAGENET_MEAN, IMAGENET_STD)  # float32 [3, H, W]
        mask = block_mask(
            self.grid, self.num_masked, sample_rng(self.run_seed, epoch, key), self.min_patches
        )  # bool [N]
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
