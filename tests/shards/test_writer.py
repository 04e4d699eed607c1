"""TokenDatasetDir: write_shard / write_manifest, receipts, the intact-check, determinism, refusals."""

import hashlib
import json

import numpy as np
import pytest
from support import token_datasets as helpers

from benchmarks.synthetic import fake_rows
from shards import schema
from shards.dataset import TokenDatasetDir


def test_receipt_lists_every_file_with_checksums(tmp_path):
    manifest = helpers.make_dataset(tmp_path)
    receipt = json.loads((tmp_path / schema.receipt_path(1)).read_text())
    assert receipt["rows"] == 5 and receipt["skipped"] == [["c1/broken", "truncated JPEG"]]
    assert receipt["image_shard"] == {"url": "images/shard-000001.tar", "index": 1}
    paths = {e["path"] for e in receipt["files"]}
    assert paths == {schema.parquet_path(s, 1, 3) for s in helpers.SEEDS} | {schema.wds_path(1)}
    for entry in receipt["files"]:
        data = (tmp_path / entry["path"]).read_bytes()
        assert len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert manifest["totals"]["images"] == 15 and manifest["totals"]["skipped"] == 1
    assert manifest["missing_shards"] == [] and manifest["codebook_size"] == helpers.CODEBOOK
    assert "pyarrow" in manifest["software"] and (tmp_path / "README.md").exists()
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary files left behind


def test_rewrite_is_byte_identical(tmp_path):
    helpers.make_dataset(tmp_path / "a")
    helpers.make_dataset(tmp_path / "b")
    files_a = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    files_b = sorted(
        p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file()
    )
    assert files_a == files_b
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_damaged_files_names_every_damage_and_unreadable_receipts_mean_not_done(tmp_path):
    helpers.make_dataset(tmp_path)
    dataset = TokenDatasetDir(str(tmp_path))
    receipts = dataset.receipts()
    assert sorted(receipts) == [0, 1, 2]
    assert all(dataset.damaged_files(receipts[i]) == {} for i in range(3))
    wds = tmp_path / schema.wds_path(0)
    wds.write_bytes(wds.read_bytes()[:-10])  # truncated
    size = wds.stat().st_size
    assert dataset.damaged_files(receipts[0], checksum=False) == {
        schema.wds_path(0): f"{size} bytes, its receipt says {size + 10}"
    }
    (tmp_path / schema.parquet_path(1, 1, 3)).unlink()
    assert dataset.damaged_files(receipts[1]) == {schema.parquet_path(1, 1, 3): "missing"}
    path = tmp_path / schema.parquet_path(0, 2, 3)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # same size, different bytes: only the checksum finds it
    path.write_bytes(bytes(data))
    assert dataset.damaged_files(receipts[2], checksum=False) == {}
    assert dataset.damaged_files(receipts[2]) == {
        schema.parquet_path(0, 2, 3): "damaged (its sha256 differs from its receipt)"
    }
    # a receipt that is missing, unparsable, or names another shard: the shard is not done
    (tmp_path / schema.receipt_path(2)).unlink()
    (tmp_path / schema.receipt_path(1)).write_text("{not json")
    (tmp_path / schema.receipt_path(7)).write_text(json.dumps({**receipts[0], "shard_index": 0}))
    assert dataset.receipt(2) is None and dataset.receipt(1) is None
    assert dataset.receipt(7) is None and dataset.receipt(9) is None
    assert sorted(dataset.receipts()) == [0]


def test_empty_shard_and_refusals(tmp_path):
    dataset = TokenDatasetDir(str(tmp_path))
    receipt = dataset.write_shard(
        0, 1, "x.tar", (0, 1), [], [("a", "zero bytes")], tokenizer=helpers.TOKENIZER
    )
    assert receipt["rows"] == 0 and dataset.receipt(0) == receipt
    assert dataset.damaged_files(receipt) == {}
    rows = fake_rows(0, 2)
    with pytest.raises(ValueError, match="outside"):
        bad = fake_rows(0, 1)
        bad[0].tokens = bad[0].tokens + np.uint16(helpers.CODEBOOK)
        TokenDatasetDir(str(tmp_path)).write_shard(
            0, 1, "x.tar", (0, 1), bad, [], tokenizer=helpers.TOKENIZER
        )
    with pytest.raises(ValueError, match="seeds"):
        TokenDatasetDir(str(tmp_path)).write_shard(
            0, 1, "x.tar", (0, 5), rows, [], tokenizer=helpers.TOKENIZER
        )
    with pytest.raises(ValueError, match="duplicate"):
        TokenDatasetDir(str(tmp_path)).write_shard(0, 1, "x.tar", (0, 1), [rows[0], rows[0]], [])
    with pytest.raises(ValueError, match="unknown token formats"):
        TokenDatasetDir(str(tmp_path)).write_shard(0, 1, "x.tar", (0, 1), rows, [], ("csv",))
