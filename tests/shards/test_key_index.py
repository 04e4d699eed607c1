"""KeyIndex: key -> (token shard, row), a key twice refused, unknown keys -1; verify's messages."""

import numpy as np
import pytest
from support import token_datasets as helpers

from shards.errors import CorruptTokenShard, DuplicateKeys, unwrap_worker_message
from shards.key_index import KeyIndex, shard_keys
from shards.reader import open_token_dataset


def test_lookup_finds_every_key_and_only_those():
    index = KeyIndex([["a", "b", "c"], [], ["d", "e"]])
    assert index.rows == 5
    shard, row = index.lookup(["d", "b", "zz", "a", "c"])
    assert shard.tolist() == [2, 0, -1, 0, 0] and row.tolist() == [0, 1, -1, 0, 2]
    assert KeyIndex([]).lookup(["x"])[0].tolist() == [-1]
    assert index.nbytes == 5 * 16


def test_a_key_with_two_rows_is_refused_not_picked():
    """Neither the first nor the last row: two rows for one image is damaged data."""
    with pytest.raises(
        DuplicateKeys, match=r"'b' twice \(token shard 0 row 1 and token shard 2 row 1\)"
    ):
        KeyIndex([["a", "b", "c"], [], ["d", "b"]], "ds")
    with pytest.raises(
        DuplicateKeys, match=r"'a' twice \(token shard 0 row 0 and token shard 0 row 2\)"
    ):
        KeyIndex([["a", "b", "a"]])


def test_keys_that_only_share_a_hash_are_not_duplicates(monkeypatch):
    import shards.key_index

    monkeypatch.setattr(shards.key_index, "key_hash", lambda key: 7)  # every key collides
    index = KeyIndex([["a"], ["b"]])
    assert index.rows == 1  # the caller finds a row by its full key (module docstring)


def test_index_of_a_token_dataset(tmp_path):
    helpers.make_dataset(tmp_path, num_shards=3, per_shard=5)
    ds = open_token_dataset(str(tmp_path))
    index = KeyIndex.from_dataset(ds)
    assert index.rows == 15
    for i in range(3):
        keys = shard_keys(ds, i)
        assert keys == list(ds.read_shard(i))
        shard, row = index.lookup(keys)
        assert shard.tolist() == [i] * 5 and row.tolist() == list(range(5))
    assert np.all(index.lookup(["c9/none"])[0] == -1)


def test_worker_wrapping_is_removed():
    wrapped = (
        "Caught CorruptTokenShard in DataLoader worker process 0.\nOriginal Traceback (most "
        'recent call last):\n  File "x.py", line 1, in f\nshards.verify.CorruptTokenShard: '
        "token file wds/x is damaged: rerun stage 2\n"
    )
    assert str(CorruptTokenShard(wrapped)) == "token file wds/x is damaged: rerun stage 2"
    assert unwrap_worker_message("plain") == "plain"
