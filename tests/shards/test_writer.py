"""write_shard / shard_done / write_manifest: receipts, determinism, atomicity, refusals."""

import hashlib
import json

import numpy as np
import pytest
from support import token_datasets as helpers

from shards import schema
from shards.writer import shard_done, write_shard


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


def test_shard_done_detects_damage(tmp_path):
    helpers.make_dataset(tmp_path)
    assert all(shard_done(str(tmp_path), i, checksum=True) for i in range(3))
    wds = tmp_path / schema.wds_path(0)
    wds.write_bytes(wds.read_bytes()[:-10])  # truncated
    assert not shard_done(str(tmp_path), 0)
    (tmp_path / schema.parquet_path(1, 1, 3)).unlink()
    assert not shard_done(str(tmp_path), 1)
    path = tmp_path / schema.parquet_path(0, 2, 3)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))
    assert shard_done(str(tmp_path), 2) and not shard_done(str(tmp_path), 2, checksum=True)
    (tmp_path / schema.receipt_path(2)).unlink()
    assert not shard_done(str(tmp_path), 2)
    assert not shard_done(str(tmp_path), 7)


def test_empty_shard_and_refusals(tmp_path):
    receipt = write_shard(
        str(tmp_path), 0, 1, "x.tar", (0, 1), [], [("a", "zero bytes")], tokenizer=helpers.TOKENIZER
    )
    assert receipt["rows"] == 0 and shard_done(str(tmp_path), 0)
    rows = helpers.fake_rows(0, 2)
    with pytest.raises(ValueError, match="outside"):
        bad = helpers.fake_rows(0, 1)
        bad[0].tokens = bad[0].tokens + np.uint16(helpers.CODEBOOK)
        write_shard(str(tmp_path), 0, 1, "x.tar", (0, 1), bad, [], tokenizer=helpers.TOKENIZER)
    with pytest.raises(ValueError, match="seeds"):
        write_shard(str(tmp_path), 0, 1, "x.tar", (0, 5), rows, [], tokenizer=helpers.TOKENIZER)
    with pytest.raises(ValueError, match="duplicate"):
        write_shard(str(tmp_path), 0, 1, "x.tar", (0, 1), [rows[0], rows[0]], [])
    with pytest.raises(ValueError, match="unknown token formats"):
        write_shard(str(tmp_path), 0, 1, "x.tar", (0, 1), rows, [], ("csv",))
