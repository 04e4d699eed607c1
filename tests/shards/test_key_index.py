"""KeyIndex: key -> (token shard, row), duplicates counted, unknown keys -1; verify's messages."""

import numpy as np
from support import token_datasets as helpers

from shards.errors import CorruptTokenShard, unwrap_worker_message
from shards.key_index import KeyIndex, shard_keys
from shards.reader import open_token_dataset


def test_lookup_finds_every_key_and_only_those():
    index = KeyIndex([["a", "b", "c"], [], ["d", "b"]])
    assert index.rows == 4 and index.duplicates == 1  # "b" twice: shard 0 keeps it
    shard, row = index.lookup(["d", "b", "zz", "a", "c"])
    assert shard.tolist() == [2, 0, -1, 0, 0] and row.tolist() == [0, 1, -1, 0, 2]
    assert KeyIndex([]).lookup(["x"])[0].tolist() == [-1]
    assert index.nbytes == 4 * 16


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
