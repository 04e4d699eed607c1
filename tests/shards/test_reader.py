"""open_token_dataset / TokenDataset: round trips in both formats, checks, missing shards."""

import numpy as np
import pytest
from support import token_datasets as helpers

from benchmarks.synthetic import fake_rows
from shards import schema
from shards.dataset import TokenDatasetDir
from shards.errors import CorruptTokenShard, MissingShards, TokenDatasetMismatch
from shards.reader import open_token_dataset


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_round_trip(tmp_path, fmt):
    helpers.make_dataset(tmp_path)
    ds = open_token_dataset(str(tmp_path))
    assert ds.num_shards == 3 and ds.seeds == helpers.SEEDS and ds.num_tokens == 16
    assert ds.codebook_size == helpers.CODEBOOK
    for i in range(3):
        expected = fake_rows(i, 5)
        got = ds.read_shard(i, fmt)
        assert list(got) == [r.key for r in expected]  # image-shard order kept
        for row in expected:
            back = got[row.key]
            assert back.label == row.label and back.views == row.views
            assert back.image_sha256 == row.image_sha256  # the image digest travels with the row
            assert back.tokens.dtype == np.uint16 and np.array_equal(back.tokens, row.tokens)


def test_check_names_both_values(tmp_path):
    helpers.make_dataset(tmp_path)
    ds = open_token_dataset(str(tmp_path))
    ds.check(codebook_size=16, grid=(4, 4), image_size=32, fingerprint="f" * 64)
    with pytest.raises(TokenDatasetMismatch, match=r"codebook_size=16.*codebook_size=8192"):
        ds.check(codebook_size=8192, grid=(4, 4), image_size=32)
    with pytest.raises(TokenDatasetMismatch, match=r"grid=\[4, 4\].*grid=\[14, 14\]"):
        ds.check(codebook_size=16, grid=(14, 14), image_size=32)
    with pytest.raises(TokenDatasetMismatch, match=r"image_size=32.*image_size=224"):
        ds.check(codebook_size=16, grid=(4, 4), image_size=224)
    with pytest.raises(TokenDatasetMismatch, match=r"f{64}.*0{64}"):
        ds.check(codebook_size=16, grid=(4, 4), image_size=32, fingerprint="0" * 64)


def test_missing_shard_is_named(tmp_path):
    manifest = helpers.make_dataset(tmp_path)
    TokenDatasetDir(str(tmp_path)).write_manifest(
        [r for r in manifest["shards"] if r["shard_index"] != 1], manifest
    )
    ds = open_token_dataset(str(tmp_path))
    assert ds.missing_shards == [1]
    ds.read_shard(0)
    with pytest.raises(MissingShards, match=r"missing shards \[1\]"):
        ds.read_shard(1)
    (tmp_path / schema.wds_path(2)).unlink()
    with pytest.raises(MissingShards, match="shard 2"):
        ds.read_shard(2)


def test_refuses_other_schema_version(tmp_path):
    import json

    helpers.make_dataset(tmp_path)
    manifest_file = tmp_path / schema.MANIFEST_NAME
    manifest = json.loads(manifest_file.read_text())
    manifest["schema_version"] = 99
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(TokenDatasetMismatch, match="schema version 99"):
        open_token_dataset(str(tmp_path))
    manifest["schema_version"] = 1  # a dataset written before rows carried image digests
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(TokenDatasetMismatch, match=r"version 1, .*rerun stage 2"):
        open_token_dataset(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nothing: no such folder"):
        open_token_dataset(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingShards, match="empty is not a token dataset .no manifest.json"):
        open_token_dataset(str(tmp_path / "empty"))
    manifest_file.unlink()  # a run that did not finish: receipts, no manifest
    with pytest.raises(MissingShards, match="no manifest.json in token dataset .*rerun"):
        open_token_dataset(str(tmp_path))
    manifest_file.write_text("{not json")
    with pytest.raises(CorruptTokenShard, match="manifest.json is not valid JSON"):
        open_token_dataset(str(tmp_path))
