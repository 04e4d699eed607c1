"""`pipeline validate`: passes on a good dataset, names each kind of damage, checks image alignment."""

import json

import pytest
from support import token_datasets as helpers

from benchmarks.synthetic import fake_rows
from engine.errors import UserError
from shards import schema
from shards.validate import image_alignment, main


@pytest.fixture
def dataset(tmp_path):
    helpers.make_dataset(tmp_path)
    return tmp_path


def test_good_dataset_passes(dataset, capsys):
    assert main([str(dataset)]) == 0
    assert "OK" in capsys.readouterr().out


def test_corrupted_file(dataset, capsys):
    path = dataset / schema.parquet_path(1, 0, 3)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert main([str(dataset)]) == 1
    assert (
        "parquet/seed=1/train-00000-of-00003.parquet is damaged (its sha256 differs"
        in capsys.readouterr().out
    )


def test_many_shards_are_checked_by_several_processes_with_the_same_findings(dataset, monkeypatch):
    """Above PARALLEL_SHARDS shards, check processes take chunks; the problems and their order
    are those of checking in this process."""
    import shards.validate as validate_module

    for relative in (schema.parquet_path(1, 0, 3), schema.wds_path(2)):
        path = dataset / relative
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    alone = validate_module.validate(str(dataset))
    monkeypatch.setattr(validate_module, "PARALLEL_SHARDS", 1)
    monkeypatch.setattr(validate_module, "CHUNK_SHARDS", 1)
    assert validate_module.validate(str(dataset)) == alone
    assert len(alone) == 2 and "shard 0" in alone[0] and "shard 2" in alone[1]


def test_out_of_range_token(dataset, capsys):
    # Rewrite shard 2 with a token == codebook size, then restore the manifest's codebook claim.
    from shards.dataset import TokenDatasetDir

    rows = fake_rows(2, 5)
    rows[3].tokens[1, 7] = helpers.CODEBOOK
    big = {**helpers.TOKENIZER, "codebook_size": 65536}
    receipt = TokenDatasetDir(str(dataset)).write_shard(
        2, 3, "images/shard-000002.tar", helpers.SEEDS, rows, [], tokenizer=big
    )
    manifest = json.loads((dataset / schema.MANIFEST_NAME).read_text())
    receipts = [r for r in manifest["shards"] if r["shard_index"] != 2] + [receipt]
    TokenDatasetDir(str(dataset)).write_manifest(receipts, manifest)
    assert main([str(dataset)]) == 1
    out = capsys.readouterr().out
    assert (
        "c2/img_0003" in out
        and f"token {helpers.CODEBOOK} >= codebook size {helpers.CODEBOOK}" in out
    )


def test_missing_receipt_and_file(dataset, capsys):
    (dataset / schema.receipt_path(1)).unlink()
    (dataset / schema.wds_path(2)).unlink()
    assert main([str(dataset)]) == 1
    out = capsys.readouterr().out
    assert "receipt file receipts/shard-000001.json is missing" in out
    assert "wds/tokens-000002.tar.gz is missing" in out


def _replace_parquet(dataset, rows):
    """Rewrite shard 0's Parquet files from ``rows`` while keeping its old WebDataset tar."""
    from shards.dataset import TokenDatasetDir
    from shards.storage import dumps

    manifest = json.loads((dataset / schema.MANIFEST_NAME).read_text())
    old = manifest["shards"][0]
    receipt = TokenDatasetDir(str(dataset)).write_shard(
        0,
        3,
        old["image_shard"]["url"],
        helpers.SEEDS,
        rows,
        [],
        ("parquet",),
        tokenizer=helpers.TOKENIZER,
    )
    receipt["files"] += [e for e in old["files"] if e["format"] == "webdataset"]
    (dataset / schema.receipt_path(0)).write_bytes(dumps(receipt))
    TokenDatasetDir(str(dataset)).write_manifest([receipt, *manifest["shards"][1:]], manifest)


def test_parquet_and_webdataset_disagree(dataset, capsys):
    rows = fake_rows(0, 5)
    rows[2].tokens[0] = (rows[2].tokens[0] + 1) % helpers.CODEBOOK
    _replace_parquet(dataset, rows)
    assert main([str(dataset)]) == 1
    assert (
        "shard 0: Parquet and WebDataset differ at key 'c0/img_0002': tokens"
        in capsys.readouterr().out
    )


def test_row_count_differs(dataset, capsys):
    _replace_parquet(dataset, fake_rows(0, 5)[:4])
    assert main([str(dataset)]) == 1
    out = capsys.readouterr().out
    assert "shard 0: webdataset has 5 rows, its receipt says 4" in out
    assert "Parquet and WebDataset differ: keys (or their order)" in out


def test_image_alignment_rules():
    assert image_alignment(["a", "c"], ["a", "b", "c"], {"b"}) == []
    assert "'b' has no tokens" in image_alignment(["a", "c"], ["a", "b", "c"], set())[0]
    assert "does not follow" in image_alignment(["c", "a"], ["a", "c"], set())[-1]
    # a duplicate key: the second copy is the skipped one
    assert image_alignment(["a", "b"], ["a", "a", "b"], {"a"}) == []


def test_unknown_option_is_refused(dataset):
    with pytest.raises(UserError, match="unknown option"):
        main([str(dataset), "imagez=x"])
    with pytest.raises(UserError, match="shard_size='ten'"):
        main([str(dataset), "shard_size=ten"])
    with pytest.raises(UserError, match="checksum='maybe'"):
        main([str(dataset), "checksum=maybe"])


@pytest.mark.parametrize(
    "relative", [schema.parquet_path(1, 0, 3), schema.wds_path(1)], ids=["parquet", "webdataset"]
)
@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "delete"])
def test_damaged_data_is_exit_1_whatever_the_format(dataset, capsys, relative, damage):
    """One code for "the data is damaged" (1), for every format and kind of damage, with or
    without the checksums; 2 stays for usage mistakes."""
    path = dataset / relative
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "garbage":
        path.write_bytes(b"garbage" * (len(data) // 7))
    else:
        path.unlink()
    for checksum in ("true", "false"):
        assert main([str(dataset), f"checksum={checksum}"]) == 1
        out = capsys.readouterr().out
        assert "PROBLEM shard" in out and relative in out


@pytest.mark.parametrize(
    "garbage", [b"{not json", b"", b"\xff\xfe\x00binary", b"[1, 2]", b'{"shard_index": "x"}']
)
def test_garbage_receipt_is_a_problem_not_a_traceback(dataset, capsys, garbage):
    (dataset / schema.receipt_path(1)).write_bytes(garbage)
    assert main([str(dataset)]) == 1
    assert (
        "receipt file receipts/shard-000001.json is missing or unreadable"
        in capsys.readouterr().out
    )
