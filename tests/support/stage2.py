"""Tiny tokenizers and image tar shards for the stage-2 job tests (``from support import stage2``)."""

from __future__ import annotations

import io
import socket
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shards.reader import open_token_dataset
from tokenize_corpus.tokenizer import save_tokenizer
from tokenize_corpus.vqkd import VQKD, VQKDModelConfig

# image 32, patch 8 -> a 4x4 token grid; codebook 16 (heads = width // 64 as official files imply)
TINY = VQKDModelConfig(
    image_size=32,
    patch_size=8,
    width=64,
    depth=1,
    heads=1,
    code_dim=8,
    codebook_size=16,
    decoder_depth=1,
    teacher_dim=12,
    kmeans_iters=3,
)


def make_tokenizer(path: Path, seed: int = 0) -> str:
    """Save a tiny VQ-KD whose codebook was initialised (k-means on a few random batches)."""
    torch.manual_seed(seed)
    model = VQKD(TINY).train()
    for _ in range(2):
        model(torch.rand(8, 3, 32, 32), torch.randn(8, TINY.num_patches, TINY.teacher_dim))
    return save_tokenizer(model.eval(), path)


def image_bytes(width: int, height: int, seed: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A smooth random picture (so views differ and tokens vary) encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    if mode == "P":
        image = image.quantize(colors=16)
    elif mode != "RGB":
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def good_members(prefix: str, count: int, seed: int) -> list[tuple[str, bytes]]:
    """``count`` labelled images ``<prefix>_<j>.jpg`` + ``.cls`` of varied sizes."""
    members = []
    for j in range(count):
        w, h = 24 + 7 * ((seed + j) % 9), 20 + 5 * ((seed * 3 + j) % 11)
        members.append((f"{prefix}_{j:03d}.jpg", image_bytes(w, h, seed * 100 + j)))
        members.append((f"{prefix}_{j:03d}.cls", str((seed + j) % 5).encode()))
    return members


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A deterministic tar of (name, data) members, in the given order."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def make_corpus(root: Path, shards: int = 3, per_shard: int = 6) -> str:
    """Write ``shards`` tar shards of good images under ``root``; return the brace pattern."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        (root / f"img-{i:06d}.tar").write_bytes(tar_bytes(good_members(f"s{i}", per_shard, i)))
    return str(root / f"img-{{{0:06d}..{shards - 1:06d}}}.tar")


def free_port() -> int:
    """A TCP port nobody listens on right now (for a scheduler or a moto server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dataset_files(root: Path) -> dict[str, bytes]:
    """Every data file of a token dataset (relative path -> bytes), manifest and card included
    (not the run's config.yaml and worker logs, nor the lock file a killed run leaves behind)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and p.name not in ("config.yaml", ".lock")
        and p.relative_to(root).parts[0] != "logs"
    }


def rows(root: Path) -> dict[tuple[str, int], list[int]]:
    """Every row of a finished token dataset: (key, seed) -> tokens, read back by the reader."""
    dataset = open_token_dataset(str(root))
    found = {}
    for i in range(dataset.num_shards):
        for key, row in dataset.read_shard(i).items():
            for view, tokens in zip(row.views, row.tokens, strict=True):
                found[key, int(view.seed)] = tokens.tolist()
    return found
