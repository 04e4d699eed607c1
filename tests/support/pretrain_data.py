"""Tiny stage-3 inputs: a folder of JPEGs, a random tiny tokenizer, a token dataset written as stage 2 does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shards.dataset import TokenDatasetDir
from shards.decode import BadImage, decode_image
from shards.images import iter_shard, list_shards
from shards.views import AugConfig, render_view, sample_view, to_unit
from shards.writer import TokenRow
from tokenize_corpus.tokenizer import load_tokenizer, save_tokenizer
from tokenize_corpus.vqkd import VQKD, VQKDModelConfig

SEEDS = (0, 1, 2)
SHARD_SIZE = 4
GRID = (4, 4)


def make_images(folder: Path, count: int = 14, bad: tuple[int, ...] = (5,)) -> Path:
    """A flat folder of small random JPEGs; the images numbered in ``bad`` are not decodable."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        path = folder / f"img_{i:03d}.jpg"
        if i in bad:
            path.write_bytes(b"this is not a jpeg")
            continue
        size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
    return folder


def make_tokenizer_config(codebook_size: int = 16, kmeans_iters: int = 0) -> VQKDModelConfig:
    """A tiny VQ-KD: image 32, patch 8 -> a 4x4 grid."""
    return VQKDModelConfig(
        image_size=32,
        patch_size=8,
        width=32,
        depth=1,
        heads=2,
        code_dim=8,
        codebook_size=codebook_size,
        decoder_depth=1,
        teacher_dim=16,
        kmeans_iters=kmeans_iters,
    )


def make_tokenizer(path: Path, codebook_size: int = 16) -> str:
    """A randomly initialised tiny tokenizer (enough for the data path: tokens are stored)."""
    torch.manual_seed(0)
    return save_tokenizer(VQKD(make_tokenizer_config(codebook_size)), path)


def make_tokens(
    images: Path, tokenizer_path: str, out: Path, drop_shard: int | None = None
) -> Path:
    """A token dataset written the way stage 2 does (decode, sample views, render, tokenize)."""
    tok = load_tokenizer(tokenizer_path)
    aug = AugConfig(size=32)
    shards = list_shards(str(images), shard_size=SHARD_SIZE)
    receipts = []
    for shard in shards:
        if shard.index == drop_shard:
            continue
        rows, skipped = [], []
        for record in iter_shard(shard):
            try:
                image = decode_image(record.data)
            except BadImage as err:
                skipped.append((record.key, str(err)))
                continue
            views = [sample_view(aug, record.key, s, image.width, image.height) for s in SEEDS]
            pixels = torch.stack([render_view(image, v) for v in views])  # [K, 3, 32, 32]
            tokens = tok.encode(to_unit(pixels)).numpy().astype(np.uint16)  # [K, N]
            rows.append(TokenRow(record.key, record.label, views, tokens, record.sha256))
        receipts.append(
            TokenDatasetDir(str(out)).write_shard(
                shard.index,
                len(shards),
                shard.url,
                SEEDS,
                rows,
                skipped,
                tokenizer=tok.describe(),
            )
        )
    info = {
        "tokenizer": tok.describe(),
        "aug": dataclasses.asdict(aug),  # as stage 2 records it (views.source=fresh reads it)
        "seeds": list(SEEDS),
        "num_shards": len(shards),
        "images": {"source": str(images), "shard_size": SHARD_SIZE},
    }
    TokenDatasetDir(str(out)).write_manifest(receipts, info)
    return out
