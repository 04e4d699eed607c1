"""Growing a token dataset: appending seeds computes only the new ones, leaves the stored
files byte-identical, equals a from-scratch run, and records a version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import stage2 as helpers

from shards.manifest import SEAL, seal_problem
from shards.views import AugConfig
from tokenize_corpus.config import ClusterConfig, TokenizeConfig
from tokenize_corpus.errors import ResumeRefused
from tokenize_corpus.job import tokenize

# Files that record the dataset's history: an appended dataset has one more version.
HISTORY = ("manifest.json", "versions.json", "README.md")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    import logging

    from distributed import LocalCluster

    root = tmp_path_factory.mktemp("append")
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
        silence_logs=logging.WARNING,
    ) as cluster:  # fmt: skip
        yield {
            "tokenizer": helpers.make_tokenizer(root / "tok.pth"),
            "images": helpers.make_corpus(root / "images", shards=3, per_shard=4),
            "address": cluster.scheduler_address,
        }


def config(setup: dict, out: Path, seeds: tuple[int, ...], formats: tuple[str, ...]):
    return TokenizeConfig(
        images=setup["images"],
        tokenizer=setup["tokenizer"],
        out_dir=str(out),
        seeds=seeds,
        aug=AugConfig(size=32),
        formats=formats,
        batch_size=3,
        precision="fp32",
        cluster=ClusterConfig(address=setup["address"], dashboard=False),
    )


@pytest.mark.parametrize("formats", [("parquet", "webdataset"), ("webdataset",)])
def test_appending_seeds_computes_only_them_and_equals_a_fresh_run(setup, tmp_path, formats):
    grown = tmp_path / "grown"
    assert tokenize(config(setup, grown, (0, 1), formats))["exit_code"] == 0
    before = helpers.dataset_files(grown)

    summary = tokenize(config(setup, grown, (0, 1, 2, 3), formats))
    assert summary["exit_code"] == 0, summary
    assert summary["shards_extended"] == 3 and summary["views_this_run"] == 12 * 2
    after = helpers.dataset_files(grown)
    stored = [p for p in before if p.startswith("parquet/")]
    assert all(after[p] == before[p] for p in stored)  # seeds 0 and 1 byte-identical

    fresh = tmp_path / "fresh"
    assert tokenize(config(setup, fresh, (0, 1, 2, 3), formats))["exit_code"] == 0
    scratch = helpers.dataset_files(fresh)
    assert {p: b for p, b in after.items() if p not in HISTORY} == {
        p: b for p, b in scratch.items() if p not in HISTORY
    }
    manifest = json.loads(after["manifest.json"])
    versions = manifest.pop("versions")
    expected = json.loads(scratch["manifest.json"])
    assert [v["seeds"] for v in expected.pop("versions")] == [[0, 1, 2, 3]]
    # the seals differ with the version logs; each seals its own manifest
    assert seal_problem(json.loads(after["manifest.json"])) is None
    assert manifest.pop(SEAL) != expected.pop(SEAL)
    assert manifest == expected
    assert [v["seeds"] for v in versions] == [[0, 1], [0, 1, 2, 3]]
    assert versions[1]["added"] == {"seeds": [2, 3], "shards": 0} and versions[1]["at"]
    assert versions[1]["identity"]["seeds"] == [0, 1, 2, 3]
    assert json.loads(after["versions.json"]) == versions


def test_seeds_that_do_not_extend_the_stored_ones_are_refused(setup, tmp_path):
    out = tmp_path / "tokens"
    assert tokenize(config(setup, out, (0, 1), ("parquet",)))["exit_code"] == 0
    with pytest.raises(ResumeRefused, match="seeds"):
        tokenize(config(setup, out, (1, 0, 2), ("parquet",)))


def test_appending_image_shards_tokenizes_only_them_and_equals_a_fresh_run(setup, tmp_path):
    images = Path(setup["images"]).parent
    grown_images = tmp_path / "images"
    grown_images.mkdir()
    for tar in sorted(images.glob("*.tar")):
        (grown_images / tar.name).symlink_to(tar)
    pattern = str(grown_images / "*.tar")
    formats = ("parquet", "webdataset")
    grown = tmp_path / "grown"
    three = {**setup, "images": pattern}
    assert tokenize(config(three, grown, (0, 1), formats))["exit_code"] == 0
    before = helpers.dataset_files(grown)

    extra = helpers.tar_bytes(helpers.good_members("s3", 4, 3))
    (grown_images / "img-000003.tar").write_bytes(extra)
    summary = tokenize(config(three, grown, (0, 1), formats))
    assert summary["exit_code"] == 0 and summary["shards"] == 4
    assert summary["shards_tokenized"] == 1 and summary["shards_already_done"] == 3
    after = helpers.dataset_files(grown)
    renamed = {p.replace("-of-00003", "-of-00004"): b for p, b in before.items() if "-of-" in p}
    assert all(after[p] == b for p, b in renamed.items())  # same bytes under the new count

    fresh = tmp_path / "fresh"
    assert tokenize(config(three, fresh, (0, 1), formats))["exit_code"] == 0
    scratch = helpers.dataset_files(fresh)
    assert {p: b for p, b in after.items() if p not in HISTORY} == {
        p: b for p, b in scratch.items() if p not in HISTORY
    }
    versions = json.loads(after["versions.json"])
    assert [v["shards"] for v in versions] == [3, 4]
    assert versions[1]["added"] == {"seeds": [], "shards": 1}
