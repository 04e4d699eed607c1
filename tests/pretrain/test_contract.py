"""THE contract test (docs/design.md §2): offline targets are the same targets.

A token dataset is written by the real stage-2 job (Dask LocalCluster, one worker). Stage 3's data
path then rebuilds every stored view (all K seeds of every image: epochs 0..K-1 cycle through
them) from the stored ViewParams, and the tokenizer run online on those pixels (CPU, fp32) must
give back exactly the stored tokens, all of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from support import pretrain_data as helpers

from pretrain.data import MIMDataset, seed_index
from shards.reader import open_token_dataset
from shards.views import AugConfig, to_unit
from tokenize_corpus.config import ClusterConfig, TokenizeConfig
from tokenize_corpus.job import tokenize
from tokenize_corpus.tokenizer import load_tokenizer, save_tokenizer
from tokenize_corpus.vqkd import VQKD

SEEDS = (0, 1, 2)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trained_tokenizer(path: Path) -> str:
    """A tiny VQ-KD whose codebook was k-means initialised, so tokens vary across patches."""
    torch.manual_seed(0)
    model = VQKD(helpers.make_tokenizer_config(codebook_size=32, kmeans_iters=3)).train()
    for _ in range(2):
        model(torch.rand(8, 3, 32, 32), torch.randn(8, 16, model.config.teacher_dim))
    return save_tokenizer(model.eval(), path)


@pytest.fixture(scope="module")
def stage2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("contract")
    images = helpers.make_images(root / "images", count=14, bad=(5,))
    tokenizer = trained_tokenizer(root / "tokenizer.pth")
    cfg = TokenizeConfig(
        images=str(images),
        tokenizer=tokenizer,
        out_dir=str(root / "tokens"),
        seeds=SEEDS,
        aug=AugConfig(size=32),  # default jitter, flip and crop ranges: the full view recipe
        batch_size=8,
        shard_size=4,
        precision="fp32",
        cluster=ClusterConfig(n_workers=1, threads_per_worker=1, dashboard=False, device="cpu"),
    )
    summary = tokenize(cfg)
    assert summary["exit_code"] == 0, summary
    return {"images": str(images), "tokenizer": tokenizer, "tokens": cfg.out_dir}


def test_rebuilt_views_tokenize_to_the_stored_tokens(stage2: dict) -> None:
    tokens = open_token_dataset(stage2["tokens"])
    tokenizer = load_tokenizer(stage2["tokenizer"], device="cpu")
    dataset = MIMDataset(
        stage2["images"],
        tokens,
        vocab_size=tokenizer.codebook_size,
        grid=tokenizer.grid,
        image_size=tokenizer.image_size,
        num_masked=6,
        min_patches=4,
        run_seed=0,
        shard_size=4,
        shuffle_buffer=4,
        online=True,
    )
    stored: dict[tuple[str, int], list[int]] = {}
    online: dict[tuple[str, int], list[int]] = {}
    for epoch in range(len(SEEDS)):  # epoch e uses seed index (offset(key) + e) % K: all of them
        dataset.set_epoch(epoch)
        samples = list(dataset)
        views = torch.stack([s["view_uint8"] for s in samples])  # [B, 3, 32, 32] uint8
        got = tokenizer.encode(to_unit(views))  # [B, N] int64, CPU fp32
        for sample, row in zip(samples, got, strict=True):
            k = seed_index(len(SEEDS), 0, epoch, sample["key"])
            stored[(sample["key"], k)] = sample["tokens"].tolist()
            online[(sample["key"], k)] = row.tolist()

    rows = {key: row for i in range(tokens.num_shards) for key, row in tokens.read_shard(i).items()}
    assert len(rows) == 13  # one undecodable image was skipped by stage 2
    # every stored view of every image was rebuilt and checked
    assert set(stored) == {(key, k) for key in rows for k in range(len(SEEDS))}
    for (key, k), values in stored.items():
        assert values == rows[key].tokens[k].astype(np.int64).tolist()
    mismatched = [key for key in stored if stored[key] != online[key]]
    assert not mismatched, f"{len(mismatched)} of {len(stored)} views tokenize differently"
    # the test is not vacuous: the views use many tokens
    assert len({t for values in stored.values() for t in values}) > 4
