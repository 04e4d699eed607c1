"""Synthetic inputs for the benchmarks: token rows, an ImageNet-like sample, a tiny tokenizer,
random tokens for real images.

The figures in BENCHMARKS.md were measured on real inputs where they matter (the ImageNet sample,
a trained tokenizer); these stand-ins are what the byte-count benchmarks measure with (random
rows, as the token-dataset tests write them) and what ``--smoke`` runs on where the real ones are
absent (see ``smoke.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from shards import schema
from shards.dataset import TokenDatasetDir
from shards.decode import BadImage, decode_image
from shards.images import iter_shard, list_shards
from shards.views import AugConfig, ViewParams, sample_view
from shards.writer import TokenRow

# VQKDModelConfig fields of the smallest tokenizer the stages accept: 32 px, patch 8 (a 4x4
# grid), 16 codes of 8 dims, random unit-norm codebook (no k-means).
TINY_VQKD = {
    "image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 1, "code_dim": 8,
    "codebook_size": 16, "decoder_depth": 1, "teacher_dim": 12, "kmeans_iters": 0,
}  # fmt: skip


def fake_view(rng: np.random.Generator, seed: int) -> ViewParams:
    """A plausible ViewParams (values need not come from sample_view)."""
    width, height = int(rng.integers(40, 90)), int(rng.integers(40, 90))
    crop_h, crop_w = int(rng.integers(8, height)), int(rng.integers(8, width))
    jitter = bool(rng.integers(2))
    return ViewParams(
        seed=seed,
        width=width,
        height=height,
        top=int(rng.integers(0, height - crop_h + 1)),
        left=int(rng.integers(0, width - crop_w + 1)),
        crop_height=crop_h,
        crop_width=crop_w,
        flip=bool(rng.integers(2)),
        brightness=float(rng.uniform(0.6, 1.4)) if jitter else 1.0,
        contrast=float(rng.uniform(0.6, 1.4)) if jitter else 1.0,
        saturation=float(rng.uniform(0.6, 1.4)) if jitter else 1.0,
        jitter_order=tuple(int(i) for i in rng.permutation(3)) if jitter else (),
        size=32,
        interpolation="bicubic",
    )


def fake_rows(
    shard: int,
    count: int,
    seeds: tuple[int, ...] = (0, 1),
    num_tokens: int = 16,
    codebook: int = 16,
    probs: np.ndarray | None = None,
) -> list[TokenRow]:
    """``count`` rows with keys ``c<shard>/img_<j>``, random labels, views and tokens (drawn
    from ``probs`` over the codebook; uniform when None), seeded by ``shard``."""
    rng = np.random.default_rng(1000 + shard)
    rows = []
    for j in range(count):
        tokens = rng.choice(codebook, size=(len(seeds), num_tokens), p=probs).astype(np.uint16)
        views = [fake_view(rng, s) for s in seeds]
        rows.append(
            TokenRow(
                key=f"c{shard}/img_{j:04d}",
                label=int(rng.integers(-1, 5)),
                views=views,
                tokens=tokens,
                # a stand-in digest: these rows have no image bytes
                image_sha256=hashlib.sha256(f"image {shard}/{j}".encode()).hexdigest(),
            )
        )
    return rows


def imagenet_sample(folder: str | Path, count: int = 32) -> Path:
    """``count`` small JPEGs named as the ImageNet sample's (``n<wnid>_<name>.JPEG``, one per
    class, wnids in sorted order), 48-96 px of any aspect, smooth colour fields with a few
    blocks; deterministic. Returns ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng(i)
        height, width = (int(s) for s in rng.integers(48, 97, size=2))
        y, x = np.mgrid[0:height, 0:width] / max(height, width)
        a, b, c = rng.uniform(-1, 1, size=(3, 3, 1, 1))
        pixels = (a * x + b * y + c) * 255 * rng.uniform(0.3, 1.0) + 128  # [3, H, W]
        for _ in range(3):
            top, left = int(rng.integers(0, height - 8)), int(rng.integers(0, width - 8))
            pixels[:, top : top + 12, left : left + 12] = rng.uniform(0, 255, size=(3, 1, 1))
        pixels = pixels + rng.normal(0, 8, size=pixels.shape)
        image = np.clip(pixels, 0, 255).astype(np.uint8).transpose(1, 2, 0)  # [H, W, 3]
        Image.fromarray(image).save(folder / f"n{1440764 + 997 * i:08d}_synthetic.JPEG")
    return folder


def tokenizer(path: str | Path, seed: int = 0) -> str:
    """A tiny tokenizer checkpoint (``TINY_VQKD``) with random weights; returns the path."""
    import torch  # here: the byte-count and control-plane benchmarks use this module without it

    from tokenize_corpus.tokenizer import save_tokenizer
    from tokenize_corpus.vqkd import VQKD, VQKDModelConfig

    torch.manual_seed(seed)
    return save_tokenizer(VQKD(VQKDModelConfig(**TINY_VQKD)).eval(), path)


def random_token_dataset(
    images: str,
    out: Path,
    shard_size: int,
    seeds: tuple[int, ...],
    aug: AugConfig,
    tokenizer: dict,
    formats: Sequence[str] = schema.FORMATS,
) -> None:
    """A token dataset over the real ``images``, laid out as stage 2 writes it: every image
    decoded, its views sampled at ``seeds``, its tokens random over ``tokenizer``'s codebook
    and grid (what loaders and checks cost does not depend on the token values)."""
    shards = list_shards(images, shard_size=shard_size)
    num_tokens = tokenizer["grid"][0] * tokenizer["grid"][1]
    rng = np.random.default_rng(0)
    dataset = TokenDatasetDir(str(out))
    receipts = []
    for shard in shards:
        rows, skipped = [], []
        for record in iter_shard(shard):
            try:
                image = decode_image(record.data)
            except BadImage as err:
                skipped.append((record.key, str(err)))
                continue
            views = [sample_view(aug, record.key, s, image.width, image.height) for s in seeds]
            shape = (len(seeds), num_tokens)
            tokens = rng.integers(0, tokenizer["codebook_size"], shape, dtype=np.uint16)
            rows.append(TokenRow(record.key, record.label, views, tokens, record.sha256))
        receipts.append(
            dataset.write_shard(
                shard.index,
                len(shards),
                shard.url,
                seeds,
                rows,
                skipped,
                formats,
                tokenizer=tokenizer,
            )  # fmt: skip
        )
    info = {
        "tokenizer": tokenizer,
        "seeds": list(seeds),
        "aug": dataclasses.asdict(aug),
        "num_shards": len(shards),
        "images": {"source": images, "shard_size": shard_size},
    }
    dataset.write_manifest(receipts, info)
