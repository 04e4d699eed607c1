"""Fixtures the stage-2 test modules share (each module gets its own instance)."""

import logging

import pytest
from distributed import LocalCluster
from support import stage2


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    """A randomly initialised tiny tokenizer (image 32, patch 8: a 4x4 grid, codebook 16)."""
    return stage2.make_tokenizer(tmp_path_factory.mktemp("tok") / "tok.pth")


@pytest.fixture(scope="module")
def cluster2() -> str:
    """One 2-worker LocalCluster per module, for tests that do not test cluster start-up."""
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
        silence_logs=logging.WARNING,
    ) as cluster:  # fmt: skip
        yield cluster.scheduler_address
