"""Stage 3 data path: refusals, skips, deterministic view/mask choice, sharding, online == offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from support.pretrain_data import (
    GRID,
    SHARD_SIZE,
    make_images,
    make_tokenizer,
    make_tokens,
)

from pretrain.data import (
    MIMDataset,
    seed_index,
    shard_order,
    shards_for,
)
from pretrain.errors import PretrainDataError
from shards.decode import decode_image
from shards.errors import TokenDatasetMismatch
from shards.images import iter_shard, list_shards
from shards.reader import open_token_dataset
from shards.views import render_view


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("corpus")
    images = make_images(root / "images")
    tokenizer = make_tokenizer(root / "tokenizer.pth")
    tokens = make_tokens(images, tokenizer, root / "tokens")
    return {"images": str(images), "tokenizer": tokenizer, "tokens": str(tokens), "root": root}


def dataset(corpus: dict, **kwargs) -> MIMDataset:
    args = dict(
        vocab_size=16,
        grid=GRID,
        image_size=32,
        num_masked=6,
        min_patches=4,
        run_seed=0,
        shard_size=SHARD_SIZE,
    )
    args.update(kwargs)
    return MIMDataset(corpus["images"], open_token_dataset(corpus["tokens"]), **args)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"vocab_size": 32}, ("codebook_size=16", "codebook_size=32")),
        ({"grid": (2, 2)}, ("[4, 4]", "[2, 2]")),
        ({"image_size": 64}, ("image_size=32", "image_size=64")),
    ],
)
def test_refuses_mismatch_naming_both_values(corpus: dict, override: dict, named: tuple) -> None:
    with pytest.raises(TokenDatasetMismatch) as err:
        dataset(corpus, **override)
    for text in named:
        assert text in str(err.value)


def test_aligned_refuses_other_shard_count(corpus: dict) -> None:
    with pytest.raises(TokenDatasetMismatch, match="4 shards but the image source has 2"):
        dataset(corpus, shard_size=8, match="aligned")
    assert dataset(corpus, shard_size=8).plan.mode == "key"  # auto: matched by key instead


def test_missing_token_shard_is_listed(corpus: dict, tmp_path: Path) -> None:
    tokens = make_tokens(Path(corpus["images"]), corpus["tokenizer"], tmp_path / "t", drop_shard=2)
    with pytest.raises(PretrainDataError, match=r"image shards 2 \(shard-000002\)"):
        MIMDataset(
            corpus["images"],
            open_token_dataset(str(tokens)),
            vocab_size=16,
            grid=GRID,
            image_size=32,
            num_masked=6,
            shard_size=SHARD_SIZE,
        )


def test_samples_skip_and_count_bad_images(corpus: dict) -> None:
    ds = dataset(corpus)
    samples = list(ds)
    assert len(samples) == ds.num_rows == 13
    assert sum(s["skipped"] for s in samples) == 1
    sample = samples[0]
    assert sample["view"].shape == (3, 32, 32) and sample["view"].dtype == torch.float32
    assert sample["mask"].dtype == torch.bool and int(sample["mask"].sum()) == 6
    assert sample["tokens"].dtype == torch.int64 and sample["tokens"].shape == (16,)


def test_images_not_in_token_dataset_are_refused(corpus: dict, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(corpus["images"], other)
    # a renamed image: its key is neither tokenized nor skipped in the token dataset
    (other / "img_002.jpg").rename(other / "img_002x.jpg")
    ds = MIMDataset(
        str(other),
        open_token_dataset(corpus["tokens"]),
        vocab_size=16,
        grid=GRID,
        image_size=32,
        num_masked=6,
        shard_size=SHARD_SIZE,
    )
    with pytest.raises(PretrainDataError, match="img_002x"):
        list(ds)


def test_seed_choice_is_deterministic_and_cycles_through_all_seeds() -> None:
    for key in ("a", "img_001", "n01440764/n01440764_10026"):
        picks = [seed_index(3, 7, epoch, key) for epoch in range(6)]
        assert picks == [seed_index(3, 7, epoch, key) for epoch in range(6)]
        assert sorted(picks[:3]) == [0, 1, 2] and picks[3:] == picks[:3]
    offsets = {seed_index(3, 7, 0, f"k{i}") for i in range(30)}
    assert offsets == {0, 1, 2}  # images start at different views


def test_samples_are_deterministic_and_follow_epoch(corpus: dict) -> None:
    def epoch_samples(epoch: int, buffer: int) -> dict[str, dict]:
        samples = _epoch(dataset(corpus, shuffle_buffer=buffer), epoch)
        return {s["key"]: s for s in samples}

    a, b = epoch_samples(0, 0), epoch_samples(0, 0)
    assert len(a) == 13
    for key in a:
        assert torch.equal(a[key]["view"], b[key]["view"])
        assert torch.equal(a[key]["mask"], b[key]["mask"])
    c = epoch_samples(1, 0)  # another epoch: other views and masks for the same images
    assert all(not torch.equal(a[k]["tokens"], c[k]["tokens"]) for k in a)  # another seed's view
    assert any(not torch.equal(a[k]["mask"], c[k]["mask"]) for k in a)
    d = epoch_samples(0, 5)  # the shuffle buffer reorders samples but does not change them
    for key in a:
        assert torch.equal(a[key]["view"], d[key]["view"])
        assert torch.equal(a[key]["mask"], d[key]["mask"])
    order = [s["key"] for s in _epoch(dataset(corpus, shuffle_buffer=5), 0)]
    assert order == [s["key"] for s in _epoch(dataset(corpus, shuffle_buffer=5), 0)]
    assert order != [s["key"] for s in _epoch(dataset(corpus, shuffle_buffer=0), 0)]


def test_views_match_stored_params(corpus: dict) -> None:
    """Each sample re-renders the stored view of its chosen seed and carries that view's tokens."""
    tokens = open_token_dataset(corpus["tokens"])
    images = {
        r.key: r.data for s in list_shards(corpus["images"], SHARD_SIZE) for r in iter_shard(s)
    }
    rows = {k: r for i in range(tokens.num_shards) for k, r in tokens.read_shard(i).items()}
    ds = dataset(corpus, online=True)
    for epoch in (0, 4):
        for sample in _epoch(ds, epoch):
            row = rows[sample["key"]]
            k = seed_index(3, 0, epoch, sample["key"])
            assert sample["tokens"].tolist() == row.tokens[k].astype(np.int64).tolist()
            expected = render_view(decode_image(images[sample["key"]]), row.views[k])
            assert torch.equal(sample["view_uint8"], expected)


@pytest.mark.parametrize(("world", "workers"), [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_shards_partition_over_ranks_and_workers(world: int, workers: int) -> None:
    for epoch in range(3):
        parts = [
            shards_for(9, 5, epoch, rank * workers + w, world * workers)
            for rank in range(world)
            for w in range(workers)
        ]
        flat = [i for p in parts for i in p]
        assert sorted(flat) == list(range(9))  # every shard once, no overlap
    assert shard_order(9, 5, 0) != shard_order(9, 5, 1)  # reshuffled per epoch


def test_ddp_ranks_read_disjoint_samples_and_same_step_count(corpus: dict) -> None:
    seen = []
    counts = []
    for rank in range(2):
        ds = dataset(corpus, rank=rank, world_size=2)
        ds.set_epoch(1)
        seen.append([s["tokens"].tolist() + s["mask"].tolist() for s in ds])
        counts.append(ds.batches_per_epoch(batch_size=2, num_workers=1))
    total = dataset(corpus)
    assert len(seen[0]) + len(seen[1]) == total.num_rows
    assert counts[0] == counts[1] >= 1
    both = sorted(seen[0] + seen[1])
    assert both == sorted(s["tokens"].tolist() + s["mask"].tolist() for s in _epoch(total, 1))


def _epoch(ds: MIMDataset, epoch: int) -> list[dict]:
    ds.set_epoch(epoch)
    return list(ds)


def test_loader_workers_cover_the_epoch_once(corpus: dict) -> None:
    ds = dataset(corpus)
    ds.set_epoch(2)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    got = sorted(s["tokens"].tolist() + s["mask"].tolist() for s in loader)
    assert got == sorted(s["tokens"].tolist() + s["mask"].tolist() for s in _epoch(ds, 2))


def test_online_and_offline_yield_the_same_views_and_masks(corpus: dict) -> None:
    offline = _epoch(dataset(corpus, shuffle_buffer=4), 3)
    online = _epoch(dataset(corpus, shuffle_buffer=4, online=True), 3)
    assert len(offline) == len(online)
    for a, b in zip(offline, online, strict=True):
        assert torch.equal(a["view"], b["view"])
        assert torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["tokens"], b["tokens"])
        assert b["view_uint8"].dtype == torch.uint8
    assert "view_uint8" not in offline[0]


def test_manifest_receipts_record_the_skip(corpus: dict) -> None:
    manifest = json.loads((Path(corpus["tokens"]) / "manifest.json").read_text())
    assert manifest["totals"]["skipped"] == 1


# ---------------------------------------------------------------- read-time choices


def _views_by_key(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {s["key"]: s["view_uint8"] if "view_uint8" in s else s["view"] for s in samples}


def test_seed_subset_reads_only_those_seeds(corpus: dict, monkeypatch) -> None:
    from shards.reader import TokenDataset

    read: list[str] = []
    original = TokenDataset._read_file

    def spy(self, i, entry, verify):
        read.append(entry["path"])
        return original(self, i, entry, verify)

    monkeypatch.setattr(TokenDataset, "_read_file", spy)
    ds = dataset(corpus, seeds=[2, 0])
    samples = _epoch(ds, 0) + _epoch(ds, 1)
    assert read and all(p.startswith(("parquet/seed=2/", "parquet/seed=0/")) for p in read)
    tokens = open_token_dataset(corpus["tokens"])
    stored = {}
    for i in range(tokens.num_shards):
        stored.update(tokens.read_shard(i))
    for s in samples:  # every sample is the stored view + tokens of seed 2 or seed 0
        row = stored[s["key"]]
        picks = [
            k
            for k in (0, 2)
            if torch.equal(s["tokens"], torch.from_numpy(row.tokens[k].astype("int64")))
        ]
        assert picks, s["key"]
    with pytest.raises(TokenDatasetMismatch, match=r"stores seeds \[0, 1, 2\]"):
        dataset(corpus, seeds=[0, 7])


def test_fresh_views_differ_per_epoch_and_repeat_per_run_seed(corpus: dict) -> None:
    with pytest.raises(PretrainDataError, match="targets=online"):
        dataset(corpus, source="fresh")
    fresh = dataset(corpus, source="fresh", online=True)
    epoch0, epoch1 = _views_by_key(_epoch(fresh, 0)), _views_by_key(_epoch(fresh, 1))
    again = _views_by_key(_epoch(dataset(corpus, source="fresh", online=True), 0))
    other_seed = _views_by_key(_epoch(dataset(corpus, source="fresh", online=True, run_seed=1), 0))
    stored = _views_by_key(_epoch(dataset(corpus, online=True), 0))
    assert sorted(epoch0) == sorted(epoch1) == sorted(stored)
    assert all(torch.equal(epoch0[k], again[k]) for k in epoch0)  # deterministic per run seed
    differ = sum(not torch.equal(epoch0[k], epoch1[k]) for k in epoch0)
    assert differ == len(epoch0)  # a new view every epoch
    assert sum(not torch.equal(epoch0[k], other_seed[k]) for k in epoch0) == len(epoch0)
    assert sum(not torch.equal(epoch0[k], stored[k]) for k in epoch0) == len(epoch0)
    sample = _epoch(fresh, 0)[0]
    assert sample["view_uint8"].shape == (3, 32, 32) and not sample["tokens"].any()


def test_views_section_parses_from_the_command_line() -> None:
    from engine.config import build_config, parse_overrides
    from pretrain.config import PretrainConfig

    cfg = build_config(PretrainConfig, parse_overrides(["views.seeds=[0,1]", "views.source=fresh"]))
    assert (cfg.views.seeds, cfg.views.source) == ((0, 1), "fresh")
    assert (PretrainConfig().views.seeds, PretrainConfig().views.source) == ((), "stored")
