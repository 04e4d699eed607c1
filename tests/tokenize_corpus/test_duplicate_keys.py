"""One key, one image, across stage 2, validate and stage 3; safe member names; hidden files.

The trial: two image tars each holding ``k/a`` with other pixels were both tokenized, validate
kept the first token shard's row and stage 3 the last, so each passed where the other failed.
Now the first tar in the source's order keeps the key, the second skips it with a reason, and
validate and stage 3 agree on every copy of the images, whichever tar comes first.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
from support import stage2 as helpers

from pretrain.data import MIMDataset
from shards import schema
from shards.errors import ImageDigestMismatch
from shards.reader import open_token_dataset
from shards.validate import validate
from shards.views import AugConfig
from tokenize_corpus.config import ClusterConfig, TokenizeConfig
from tokenize_corpus.job import tokenize

PIXELS = {"a": helpers.image_bytes(40, 30, 1), "b": helpers.image_bytes(36, 44, 2)}


def config(images: str, tokenizer: str, out: Path, address: str) -> TokenizeConfig:
    return TokenizeConfig(
        images=images,
        tokenizer=tokenizer,
        out_dir=str(out),
        seeds=(0, 1),
        aug=AugConfig(size=32),
        batch_size=4,
        precision="fp32",
        cluster=ClusterConfig(address=address, dashboard=False),
    )


def two_tars(root: Path, with_shared: tuple[str, ...] = ("a", "b")) -> dict[str, str]:
    """a.tar and b.tar: each ``k/only_<x>`` and, when listed in ``with_shared``, ``k/a`` with
    its own pixels."""
    root.mkdir(parents=True, exist_ok=True)
    tars = {}
    for x, seed in (("a", 3), ("b", 4)):
        members = [(f"k/only_{x}.jpg", helpers.image_bytes(30, 30, seed))]
        if x in with_shared:
            members.insert(0, ("k/a.jpg", PIXELS[x]))
        (root / f"{x}.tar").write_bytes(helpers.tar_bytes(members))
        tars[x] = str(root / f"{x}.tar")
    return tars


def sample_keys(images: str, tokens: Path) -> list[str]:
    """The keys of one epoch of stage 3 over ``images``; every image's bytes are checked
    against its row's digest on the way (a mismatch raises)."""
    ds = MIMDataset(
        images, open_token_dataset(str(tokens)), vocab_size=16, grid=(4, 4), image_size=32,
        num_masked=6, min_patches=4,
    )  # fmt: skip
    return sorted(sample["key"] for sample in ds)


@pytest.mark.parametrize("order", ["ab", "ba"])
def test_a_key_in_two_tars_has_one_row_and_one_verdict(tmp_path, tokenizer_path, cluster2, order):
    tars = two_tars(tmp_path / "images")
    first, second = (tars[x] for x in order)
    out = tmp_path / "tokens"
    summary = tokenize(config(f"{first},{second}", tokenizer_path, out, cluster2))
    assert summary["exit_code"] == 0 and summary["images"] == 3
    assert summary["images_skipped"] == 1 and summary["keys_renamed"] == 0
    receipt = json.loads((out / schema.receipt_path(1)).read_text())
    assert receipt["skipped"] == [
        ["k/a", f"duplicate key (first in shard-000000, {Path(first).name})"]
    ]
    kept = hashlib.sha256(PIXELS[order[0]]).hexdigest()
    rows = {k: r for i in range(2) for k, r in open_token_dataset(str(out)).read_shard(i).items()}
    assert sorted(rows) == ["k/a", "k/only_a", "k/only_b"] and rows["k/a"].image_sha256 == kept

    # validate and stage 3 agree: the images stage 2 read, the first tar alone, the second alone
    assert validate(str(out), images=f"{first},{second}") == []
    assert sample_keys(f"{first},{second}", out) == ["k/a", "k/only_a", "k/only_b"]
    assert validate(str(out), images=first) == []
    assert sample_keys(first, out) == ["k/a", f"k/only_{order[0]}"]
    problems = validate(str(out), images=second)
    assert len(problems) == 1 and "'k/a'" in problems[0] and "differ" in problems[0]
    with pytest.raises(ImageDigestMismatch, match="'k/a'"):
        sample_keys(second, out)

    before = helpers.dataset_files(out)
    again = tokenize(config(f"{first},{second}", tokenizer_path, out, cluster2))
    assert again["shards_already_done"] == 2 and again["shards_tokenized"] == 0
    assert helpers.dataset_files(out) == before


def test_a_rerun_redoes_the_shard_whose_duplicates_changed(tmp_path, tokenizer_path, cluster2):
    """b.tar's bytes stay the same, but once a.tar no longer has k/a, b.tar's k/a is a row: the
    rerun must redo b's shard too, and end byte-identical to a fresh run."""
    tars = two_tars(tmp_path / "images")
    images = f"{tars['a']},{tars['b']}"
    out = tmp_path / "tokens"
    assert tokenize(config(images, tokenizer_path, out, cluster2))["exit_code"] == 0
    two_tars(tmp_path / "images", with_shared=("b",))
    summary = tokenize(config(images, tokenizer_path, out, cluster2))
    assert summary["exit_code"] == 0 and summary["shards_tokenized"] == 2
    assert sorted(summary["shards_redone"]) == ["shard-000000", "shard-000001"]
    assert "duplicates_sha256" in summary["shards_redone"]["shard-000001"]
    assert summary["images_skipped"] == 0
    fresh = tmp_path / "fresh"
    assert tokenize(config(images, tokenizer_path, fresh, cluster2))["exit_code"] == 0
    changed = {"manifest.json", "versions.json", "README.md"}  # they record the run's history
    got, want = helpers.dataset_files(out), helpers.dataset_files(fresh)
    assert {p: b for p, b in got.items() if p not in changed} == {
        p: b for p, b in want.items() if p not in changed
    }


def test_hostile_member_names_give_token_tars_that_extract_safely(
    tmp_path, tokenizer_path, cluster2
):
    names = {"/abs/y": "abs/y", "../../etc/x": "etc/x", "./dot/z": "dot/z", "a//b": "a/b"}
    members = []
    for i, name in enumerate(names):
        members += [(f"{name}.jpg", helpers.image_bytes(30, 30, 10 + i)), (f"{name}.cls", b"1")]
    (tmp_path / "hostile.tar").write_bytes(helpers.tar_bytes(members))
    out = tmp_path / "tokens"
    summary = tokenize(config(str(tmp_path / "hostile.tar"), tokenizer_path, out, cluster2))
    assert summary["exit_code"] == 0 and summary["keys_renamed"] == 4
    assert list(open_token_dataset(str(out)).read_shard(0)) == list(names.values())

    dest = tmp_path / "extracted"
    with tarfile.open(out / schema.wds_path(0)) as tar:
        members = tar.getnames()
        tar.extractall(dest, filter="data")  # refuses a member that would leave dest
    suffixes = (schema.WDS_TOKENS, schema.WDS_VIEWS, schema.WDS_IMAGE_SHA256, schema.WDS_LABEL)
    assert sorted(members) == sorted(f"{k}.{s}" for k in names.values() for s in suffixes)
    for member in members:
        assert (dest / member).resolve().is_relative_to(dest.resolve())
        assert not member.startswith("/") and ".." not in member.split("/")


def test_hidden_files_of_a_folder_are_skipped_with_a_reason(tmp_path, tokenizer_path, cluster2):
    root = tmp_path / "images"
    for i, rel in enumerate(["c/a.jpg", "c/.b.jpg", ".cache/c/d.jpg", "e/f.jpg"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(helpers.image_bytes(30, 30, 20 + i))
    out = tmp_path / "tokens"
    summary = tokenize(config(str(root), tokenizer_path, out, cluster2))
    assert summary["exit_code"] == 0 and summary["images"] == 2
    receipt = json.loads((out / schema.receipt_path(0)).read_text())
    assert receipt["skipped"] == [["_cache/c/d", "hidden file"], ["c/_b", "hidden file"]]
    assert validate(str(out), images=str(root)) == []
