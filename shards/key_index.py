"""Find a token row by image key: the index that lets any copy of the images use a token dataset.

A team with its own copy of the images (other shard sizes, an ImageFolder, Hugging Face Parquet,
other tar names) reads a token dataset without repacking: each of its images is looked up by key
(``shards.images`` gives every source the same key rule) and the row found is then verified by
the image digest (docs/design.md §5). The 1:1 aligned shards need no index.

The index holds, per row, a 64-bit hash of the key (blake2b), the token shard and the row's
position, as three numpy arrays sorted by hash: 16 bytes per key (20 MB at ImageNet's 1.28 M),
built with one sort, queried with ``np.searchsorted``. A hash collision cannot pick a wrong row
silently: the caller reads the token shard and finds the row by its full key (and its digest).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shards import schema
from shards.errors import DuplicateKeys, MissingShards


def key_hash(key: str) -> int:
    """The 64-bit hash of one key (stable across processes and machines)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def key_hashes(keys: Iterable[str]) -> np.ndarray:
    """uint64 [n] hashes of ``keys``."""
    return np.fromiter((key_hash(k) for k in keys), dtype=np.uint64)


class KeyIndex:
    """key -> (token shard, row) for every row of a token dataset, each key once.

    A key with two rows (in one token shard or in two) is refused: :class:`DuplicateKeys` names
    it, since no rule could say which row is its image's (stage 2 never writes one key twice).
    """

    def __init__(self, keys_by_shard: Sequence[Sequence[str]], dataset: str = "") -> None:
        counts = [len(k) for k in keys_by_shard]
        hashes = key_hashes(k for keys in keys_by_shard for k in keys)  # [R]
        shard = np.repeat(np.arange(len(counts), dtype=np.int32), counts)  # [R]
        row = np.concatenate(
            [np.arange(c, dtype=np.int32) for c in counts] or [np.zeros(0, np.int32)]
        )
        order = np.lexsort((row, shard, hashes))  # by hash, then shard and row order
        hashes, shard, row = hashes[order], shard[order], row[order]
        first = np.ones(len(hashes), dtype=bool)
        first[1:] = hashes[1:] != hashes[:-1]
        if not first.all():
            _refuse_duplicates(keys_by_shard, shard, row, first, dataset)
        self.hashes, self.shard, self.row = hashes[first], shard[first], row[first]
        self.rows = int(len(self.hashes))

    @property
    def nbytes(self) -> int:
        """Memory held by the index arrays."""
        return int(self.hashes.nbytes + self.shard.nbytes + self.row.nbytes)

    def lookup(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(token shard, row) int32 [n] of each key; -1 where the key has no row."""
        if not len(keys) or not self.rows:
            missing = np.full(len(keys), -1, dtype=np.int32)
            return missing, missing.copy()
        h = key_hashes(keys)
        pos = np.minimum(np.searchsorted(self.hashes, h), self.rows - 1)
        hit = self.hashes[pos] == h
        return np.where(hit, self.shard[pos], -1), np.where(hit, self.row[pos], -1)

    @classmethod
    def from_dataset(cls, ds, shards: Iterable[int] | None = None) -> KeyIndex:
        """The index of a ``shards.reader.TokenDataset`` (every finished shard by default).

        Reads only the key column of one Parquet file per shard (or the member names of the
        WebDataset tar when there is no Parquet).
        """
        indices = sorted(ds.receipts) if shards is None else list(shards)
        keys_by_shard: list[list[str]] = [[] for _ in range(ds.num_shards)]
        for i in indices:
            keys_by_shard[i] = shard_keys(ds, i)
        return cls(keys_by_shard, ds.path)


def _refuse_duplicates(
    keys_by_shard: Sequence[Sequence[str]],
    shard: np.ndarray,
    row: np.ndarray,
    first: np.ndarray,
    dataset: str,
) -> None:
    """Raise DuplicateKeys for the first key that has two rows. ``shard``/``row`` are sorted by
    key hash, ``first`` marks each hash's first row; two keys that only share a hash (a 64-bit
    collision) are not duplicates: the caller finds a row by its full key."""
    start = np.maximum.accumulate(np.where(first, np.arange(len(first)), 0))  # [R]
    for j in np.flatnonzero(~first):
        i = start[j]
        key = keys_by_shard[shard[i]][row[i]]
        if keys_by_shard[shard[j]][row[j]] == key:
            where = f"token dataset {dataset}" if dataset else "the token keys"
            raise DuplicateKeys(
                f"{where} holds key {key!r} twice (token shard {shard[i]} row {row[i]} and "
                f"token shard {shard[j]} row {row[j]}): two rows for one image is damaged data. "
                "Tokenize the images again into a fresh out_dir (stage 2 keeps a key's first "
                "image and skips the others)"
            )


def shard_keys(ds, i: int) -> list[str]:
    """The keys of token shard ``i`` in row order, reading as little as possible."""
    parquet = ds.files(i, schema.FORMAT_PARQUET)
    try:
        if parquet:
            with ds.dir.fs.open(ds.dir.path(parquet[0]["path"]), "rb") as f:
                column = pq.read_table(f, columns=[schema.KEY]).column(0)
            return [str(k) for k in column.to_pylist()]
    except FileNotFoundError:
        raise MissingShards(f"token file {parquet[0]['path']} of {ds.path} is missing") from None
    except (OSError, pa.ArrowException):
        pass  # a damaged file: the full read below names it with the remedy
    return list(ds.read_shard(i))
