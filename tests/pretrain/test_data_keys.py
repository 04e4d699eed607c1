"""Stage 3 and validate on keys: a token dataset holding a key twice is refused by both (never
one row picked), and the report of images missing from a copy counts what it lists."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from support import stage2
from support.pretrain_data import GRID, make_tokenizer, make_tokens

import shards.key_index
from pretrain.data import MIMDataset
from shards.errors import DuplicateKeys
from shards.reader import open_token_dataset
from shards.validate import main as validate_main


def dataset(images: str, tokens: Path, **kwargs) -> MIMDataset:
    args = dict(vocab_size=16, grid=GRID, image_size=32, num_masked=6, min_patches=4)
    return MIMDataset(images, open_token_dataset(str(tokens)), **{**args, **kwargs})


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.pth")


def test_a_token_dataset_holding_a_key_twice_is_refused(tmp_path, tokenizer, capsys):
    """Written the way stage 2 did before the duplicate rule: k/a from both tars."""
    tars = []
    for x, seed in (("a", 1), ("b", 2)):
        members = [
            ("k/a.jpg", stage2.image_bytes(40, 30, seed)),
            (f"k/{x}.jpg", stage2.image_bytes(30, 30, seed + 5)),
        ]
        (tmp_path / f"{x}.tar").write_bytes(stage2.tar_bytes(members))
        tars.append(str(tmp_path / f"{x}.tar"))
    tokens = make_tokens(",".join(tars), tokenizer, tmp_path / "tokens")

    assert validate_main([str(tokens)]) == 1  # damaged data: exit 1, with the key
    out = capsys.readouterr().out
    assert (
        "PROBLEM" in out
        and "holds key 'k/a' twice (token shard 0 row 0 and token shard 1 row 0)" in out
    )
    for images in (",".join(tars), tars[0], tars[1]):  # aligned, then matched by key
        with pytest.raises(DuplicateKeys, match="'k/a' twice.*fresh out_dir"):
            dataset(images, tokens)


def test_images_missing_from_a_copy_are_counted_as_listed(tmp_path, tokenizer, caplog, monkeypatch):
    """The count and the examples come from the same rows. The trial's symptom ("1 images ...
    (e.g. two keys)") came from rows the index does not hold; a forced hash collision makes
    one again, since a key twice is now refused."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        (folder / f"img_{i}.jpg").write_bytes(stage2.image_bytes(30, 30, i))
    tokens = make_tokens(folder, tokenizer, tmp_path / "tokens")
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    for i in (1, 4):
        (copy / f"img_{i}.jpg").unlink()
    with caplog.at_level(logging.WARNING, logger="pretrain.matching"):
        ds = dataset(str(copy), tokens, match="key")
    report = ds.plan.report
    assert report["missing_from_images"] == 2 and report["missing_examples"] == ["img_1", "img_4"]
    assert (
        "2 images of the token dataset are not in this copy of the images (e.g. img_1, img_4)"
        in caplog.text
    )
    assert sorted(s["key"] for s in ds) == ["img_0", "img_2", "img_3", "img_5"]

    real = shards.key_index.key_hash
    monkeypatch.setattr(
        shards.key_index, "key_hash", lambda k: real("img_1" if k == "img_4" else k)
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pretrain.matching"):
        report = dataset(str(copy), tokens, match="key").plan.report
    assert report["missing_from_images"] == len(report["missing_examples"]) == 1
    assert (
        "1 images of the token dataset are not in this copy of the images (e.g. img_1);"
        in caplog.text
    )
