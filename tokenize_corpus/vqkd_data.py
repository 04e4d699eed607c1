"""Stage-1 data: seeded training views of an image source, and the evaluation set.

Data order is a pure function of (seed, epoch): image shards are permuted per epoch, split over
(rank, DataLoader worker) slots, shuffled in a buffer by a seeded generator, and every view's
crop/flip comes from :func:`shards.views.sample_view` keyed by (image key, epoch). So a resumed
run reproduces the uninterrupted one step for step. A slot that runs out of images before its
share of steps cycles through its shards again (new view seeds), which keeps every rank at the
same step count even when shards differ in size or hold bad images.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from shards.decode import BadImage, decode_image
from shards.images import iter_shard, list_shards
from shards.records import BadShard, ImageShard
from shards.views import AugConfig, render_view, sample_view, to_unit
from tokenize_corpus.teachers import Teacher

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 512
# Eval views and teacher features are kept in memory between passes up to this many images.
EVAL_CACHE_IMAGES = 4096


class TrainViews(IterableDataset):
    """Training views in batches: ``{"views": uint8 [B, 3, S, S], "bad": int}`` per step.

    Set :attr:`epoch` before iterating. Worker ``w`` of ``num_workers`` produces the batches of
    steps ``w, w + num_workers, ...`` so the DataLoader's in-order round robin yields steps in
    order; what each batch holds depends only on (seed, epoch, rank, world, num_workers).
    """

    def __init__(
        self,
        shards: list[ImageShard],
        aug: AugConfig,
        seed: int,
        steps: int,
        batch_size: int,
        rank: int,
        world: int,
    ) -> None:
        super().__init__()
        self.shards, self.aug, self.seed = shards, aug, seed
        self.steps, self.batch_size, self.rank, self.world = steps, batch_size, rank, world
        self.epoch = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, slots = self.rank * workers + worker, self.world * workers
        my_steps = len(range(worker, self.steps, workers))
        views: list[torch.Tensor] = []
        bad = 0
        stream = self._views(slot, slots)
        for _ in range(my_steps):
            while len(views) < self.batch_size:
                item = next(stream)
                if item is None:
                    bad += 1
                else:
                    views.append(item)
            yield {"views": torch.stack(views), "bad": bad}
            views, bad = [], 0

    def _views(self, slot: int, slots: int) -> Iterator[torch.Tensor | None]:
        """This slot's views for the epoch, cycling with fresh view seeds; None = a bad image."""
        for cycle in range(1_000_000):
            seed = self.seed * 1_000_003 + self.epoch * 1_009 + cycle
            rng = np.random.default_rng([self.seed, self.epoch, cycle, slot])
            good = 0
            for record in shuffled(self._records(slot, slots, cycle), rng):
                if record.error:
                    log.warning("skipping %s: %s", record.key, record.error)
                    yield None
                    continue
                try:
                    image = decode_image(record.data)
                except BadImage as err:
                    log.warning("skipping %s: %s", record.key, err)
                    yield None
                    continue
                params = sample_view(self.aug, record.key, seed, image.width, image.height)
                good += 1
                yield render_view(image, params)  # uint8 [3, S, S]
            if good == 0:
                raise ValueError(
                    f"slot {slot}: no decodable images among the shards it reads; check images="
                )
        raise RuntimeError("unreachable")

    def _records(self, slot: int, slots: int, cycle: int) -> Iterator[Any]:
        order = np.random.default_rng([self.seed, self.epoch, cycle]).permutation(len(self.shards))
        ordered = [self.shards[i] for i in order]
        if len(ordered) >= slots:  # whole shards per slot: each slot reads only its own
            yield from read_shards(ordered[slot::slots])
            return
        # fewer shards than slots: every slot reads them all and keeps every slots-th record
        for i, record in enumerate(read_shards(ordered)):
            if i % slots == slot:
                yield record


def read_shards(shards: list[ImageShard]) -> Iterator[Any]:
    for shard in shards:
        try:
            yield from iter_shard(shard)
        except BadShard as err:
            log.warning(
                "image shard %s is damaged (%s); using the records read before", shard.url, err
            )


def shuffled(items: Iterator[Any], rng: np.random.Generator) -> Iterator[Any]:
    """A seeded shuffle buffer: memory bounded by SHUFFLE_BUFFER, order fixed by ``rng``."""
    buffer: list[Any] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= SHUFFLE_BUFFER:
            yield buffer.pop(int(rng.integers(len(buffer))))
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))


class EvalSet:
    """Centre-crop evaluation views of the first ``max_images`` decodable images of a source.

    Views and teacher features are cached after the first pass when they are few enough.
    """

    def __init__(self, images: str, max_images: int, size: int) -> None:
        self.images, self.max_images, self.size = images, max_images, size
        self.aug = AugConfig(size=size, eval_seed0=True)
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def views(self, rank: int, world: int, batch_size: int) -> Iterator[torch.Tensor]:
        """uint8 ``[B, 3, S, S]`` batches of this rank's share (image i goes to rank i % world)."""
        batch: list[torch.Tensor] = []
        index = 0
        for record in read_shards(list_shards(self.images)):
            if self.max_images and index >= self.max_images:
                break
            if record.error:
                continue
            try:
                image = decode_image(record.data)
            except BadImage:
                continue
            if index % world == rank:
                params = sample_view(self.aug, record.key, 0, image.width, image.height)
                batch.append(render_view(image, params))
            index += 1
            if len(batch) == batch_size:
                yield torch.stack(batch)
                batch = []
        if batch:
            yield torch.stack(batch)

    def batches(
        self, teacher: Teacher, device: torch.device, rank: int, world: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(views in [0, 1], teacher features)`` on ``device``."""
        if self._cache is not None:
            for views, features in self._cache:
                yield to_unit(views).to(device), features.to(device)
            return
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        for views in self.views(rank, world, batch_size=64):
            unit = to_unit(views).to(device)
            features = teacher(unit)  # [B, N, Dt]
            if self.max_images and self.max_images <= EVAL_CACHE_IMAGES:
                cache.append((views, features.cpu()))
            yield unit, features
        if self.max_images and self.max_images <= EVAL_CACHE_IMAGES:
            self._cache = cache


def count_images(shards: list[ImageShard]) -> int:
    """Records that are images (folder shards know their keys; tars/parquet are read once)."""
    total = 0
    for shard in shards:
        if shard.kind == "folder":
            total += len(shard.keys)
        else:
            total += sum(1 for record in read_shards([shard]) if not record.error)
    return total
