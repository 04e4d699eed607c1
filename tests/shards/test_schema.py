"""The token dataset schema: pinned columns/dtypes, a view as a row, layout names."""

import numpy as np
import pyarrow as pa
import pytest

from benchmarks.synthetic import fake_view
from shards import schema


def test_schema_is_pinned():
    s = schema.arrow_schema(196)
    assert tuple(s.names) == schema.COLUMNS
    assert s.field(schema.TOKENS).type == pa.list_(pa.uint16(), 196)
    assert s.field(schema.LABEL).type == pa.int32() and s.field(schema.SEED).type == pa.int32()
    assert s.field(schema.BRIGHTNESS).type == pa.float64()  # exact factors, see arrow_schema
    assert s.field(schema.FLIP).type == pa.bool_()
    assert s.field(schema.IMAGE_SHA256).type == pa.binary(32)  # raw digest bytes
    assert schema.SCHEMA_VERSION == 2


@pytest.mark.parametrize("seed", [0, 3])
def test_view_row_holds_every_view_column(seed):
    # The round trip (write, read back, equal views) is tests/shards/test_reader.py's.
    view = fake_view(np.random.default_rng(seed), seed)
    row = schema.view_to_row(view)
    assert set(row) == {schema.SEED, *schema.VIEW_COLUMNS} and row[schema.SEED] == seed


def test_jitter_order_strings():
    assert schema.jitter_order_to_str((0, 2, 1)) == "0,2,1"
    assert schema.jitter_order_from_str("0,2,1") == (0, 2, 1)
    assert schema.jitter_order_from_str("") == () and schema.jitter_order_to_str(()) == ""


def test_layout_names():
    assert schema.parquet_path(2, 3, 10) == "parquet/seed=2/train-00003-of-00010.parquet"
    assert schema.wds_path(3) == "wds/tokens-000003.tar.gz"
    assert schema.receipt_path(3) == "receipts/shard-000003.json"
    meta = schema.schema_metadata(16, 8192, (4, 4), "ab")
    assert meta[schema.META_SCHEMA_VERSION] == b"2" and meta[schema.META_GRID] == b"[4, 4]"


def test_digest_spelling():
    assert schema.is_digest("ab" * 32)
    assert (
        not schema.is_digest("AB" * 32)
        and not schema.is_digest("ab" * 31)
        and not schema.is_digest("")
    )
