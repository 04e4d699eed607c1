"""Other teams read the token dataset without this project: datasets, pyarrow, dask, webdataset."""

import numpy as np
import pytest
from support import token_datasets as helpers

from benchmarks.synthetic import fake_rows


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokens")
    helpers.make_dataset(out)
    expected = {}
    for i in range(3):
        for row in fake_rows(i, 5):
            for position, seed in enumerate(helpers.SEEDS):
                expected[(row.key, seed)] = (row.label, row.tokens[position])
    return out, expected


def _check_rows(keys, seeds, labels, tokens, expected):
    assert len(keys) == len(expected)
    for key, seed, label, toks in zip(keys, seeds, labels, tokens, strict=True):
        want_label, want_tokens = expected[(key, int(seed))]
        assert int(label) == want_label
        assert np.array_equal(np.asarray(toks, dtype=np.int64), want_tokens.astype(np.int64))


def test_datasets_load_dataset(dataset, tmp_path):
    datasets = pytest.importorskip("datasets")
    out, expected = dataset
    cache = str(tmp_path / "hf-cache")
    ds = datasets.load_dataset(str(out), split="train", cache_dir=cache)
    assert ds.features["tokens"].length == 16 and ds.features["tokens"].feature.dtype == "uint16"
    _check_rows(ds["key"], ds["seed"], ds["label"], ds["tokens"], expected)
    files = sorted(str(p) for p in out.glob("parquet/seed=*/*.parquet"))
    by_files = datasets.load_dataset(
        "parquet", data_files={"train": files}, split="train", cache_dir=cache
    )
    _check_rows(by_files["key"], by_files["seed"], by_files["label"], by_files["tokens"], expected)


def test_pyarrow_dataset_hive(dataset):
    import pyarrow as pa
    import pyarrow.dataset as pads

    out, expected = dataset
    table = pads.dataset(str(out / "parquet"), partitioning="hive").to_table()
    assert "seed" in table.column_names and table.schema.field("tokens").type == pa.list_(
        pa.uint16(), 16
    )
    one = pads.dataset(str(out / "parquet"), partitioning="hive").to_table(
        filter=pads.field("seed") == 1
    )
    assert set(one.column("seed").to_pylist()) == {1} and one.num_rows == 15
    d = table.to_pydict()
    _check_rows(d["key"], d["seed"], d["label"], d["tokens"], expected)


def test_dask_read_parquet(dataset):
    dd = pytest.importorskip("dask.dataframe")
    out, expected = dataset
    df = dd.read_parquet(str(out / "parquet")).compute()
    _check_rows(list(df["key"]), list(df["seed"]), list(df["label"]), list(df["tokens"]), expected)


def test_webdataset_reads_tars(dataset):
    wds = pytest.importorskip("webdataset")
    out, expected = dataset
    urls = [str(p) for p in sorted(out.glob("wds/*.tar.gz"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
    assert len(samples) == 15
    first = [s["__key__"] for s in samples[:5]]
    assert first == [r.key for r in fake_rows(0, 5)]  # same keys, same order as image shard 0
    for sample in samples:
        tokens = sample["tokens.npy"]  # [K, N]
        assert tokens.dtype == np.uint16 and tokens.shape == (2, 16)
        views = sample["views.json"]
        assert views["seed"] == list(helpers.SEEDS)
        for position, seed in enumerate(views["seed"]):
            label, want = expected[(sample["__key__"], seed)]
            assert sample["cls"] == label and np.array_equal(tokens[position], want)
