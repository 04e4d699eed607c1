"""What the two evaluations share (``pretrain.linprobe``, ``pretrain.finetune``; docs/method.md §5).

The evaluation view of an image, the hold-out split by key hash, top-1/top-5 scores and the
``results.json`` both write. One definition each, so a probe and a fine-tuning run of the same
images are scored on the same views, the same split and by the same rule.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from engine.atomic import write_bytes_atomic
from engine.errors import UserError
from pretrain.backbones import check_backbone
from pretrain.eval_config import FinetuneConfig, LinprobeConfig
from shards.images import list_shards
from shards.views import AugConfig, render_view, sample_view

RESULTS = "results.json"


def check_inputs(cfg: LinprobeConfig | FinetuneConfig) -> None:
    """The backbone and image sources of a probe or fine-tuning run, checked before it starts
    (nothing written, no feature extracted: a mistyped images_val= is found at once)."""
    if not cfg.images:
        raise UserError("no labelled images given; pass images=<folder, shards or parquet>")
    check_backbone(cfg.backbone)
    for images in (cfg.images, cfg.images_val):
        if images:
            list_shards(images, shard_size=cfg.shard_size)


def eval_views(image: Image.Image, key: str, size: int) -> torch.Tensor:
    """The evaluation view of one decoded image: uint8 [3, size, size] (resize to size / 0.875,
    centre crop; ``shards.views`` with ``eval_seed0``)."""
    aug = AugConfig(size=size, eval_seed0=True, jitter=(), flip=False)
    params = sample_view(aug, key, 0, image.width, image.height)
    return render_view(image, params)


def key_in_val(key: str, fraction: float) -> bool:
    """Deterministic hold-out by key hash (independent of order and backbone)."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def topk_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(rows whose label is the top class, rows whose label is among the top 5) of [n, C]
    ``logits`` against [n] ``labels`` (top-k capped at C)."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices.to(labels.device)  # [n, k]
    return int((top[:, 0] == labels).sum()), int((top == labels[:, None]).any(dim=1).sum())


def topk_scores(hits1: int, hits5: int, count: int, num_classes: int) -> dict[str, float]:
    """Top-1 (%), and top-5 (%) only with more than 5 classes (with 5 or fewer it is 100% by
    construction and says nothing)."""
    scores = {"top1": 100 * hits1 / max(count, 1)}
    if num_classes > 5:
        scores["top5"] = 100 * hits5 / max(count, 1)
    return scores


def write_results(out: Path, results: dict[str, Any]) -> Path:
    """``out/results.json``, written atomically."""
    path = out / RESULTS
    write_bytes_atomic(path, json.dumps(results, indent=2).encode())
    return path
