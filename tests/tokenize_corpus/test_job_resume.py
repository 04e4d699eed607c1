"""Kill tests (docs/design.md §4): SIGKILL the whole job, or one Dask worker, mid-run; the result after a
rerun (or Dask's own rescheduling) is byte-identical to an uninterrupted run."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support import stage2 as helpers

from pipeline.cli import main as cli_main
from shards.validate import main as validate_main
from shards.views import AugConfig
from tokenize_corpus.config import ClusterConfig, TokenizeConfig
from tokenize_corpus.job import tokenize

SHARDS = 16
OVERRIDES = [
    "seeds=[0,1]", "aug.size=32", "batch_size=4", "precision=fp32", "cluster.dashboard=false"
]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Tokenizer, a 16-shard corpus, and the uninterrupted reference dataset."""
    root = tmp_path_factory.mktemp("resume")
    tokenizer = helpers.make_tokenizer(root / "tok.pth")
    images = helpers.make_corpus(root / "images", shards=SHARDS, per_shard=6)
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
        silence_logs=logging.WARNING,
    ) as cluster:  # fmt: skip
        reference = root / "reference"
        summary = tokenize(config(images, tokenizer, reference, address=cluster.scheduler_address))
        assert summary["exit_code"] == 0
        yield {"images": images, "tokenizer": tokenizer, "reference": helpers.dataset_files(reference),
               "cluster": cluster, "root": root}  # fmt: skip


def config(images: str, tokenizer: str, out: Path, **cluster) -> TokenizeConfig:
    return TokenizeConfig(
        images=images,
        tokenizer=tokenizer,
        out_dir=str(out),
        seeds=(0, 1),
        aug=AugConfig(size=32),
        batch_size=4,
        precision="fp32",
        cluster=ClusterConfig(**{"n_workers": 1, "dashboard": False, **cluster}),
    )


def _receipts(out: Path) -> int:
    folder = out / "receipts"
    return len(list(folder.glob("*.json"))) if folder.is_dir() else 0


def _command(setup: dict, tokenizer: str | Path, out: Path) -> list[str]:
    return [
        str(Path(sys.executable).parent / "pipeline"), "run", "stage=tokenize",
        f"images={setup['images']}", f"tokenizer={tokenizer}", f"out_dir={out}",
        *OVERRIDES, "cluster.n_workers=1",
    ]  # fmt: skip


def _kill_after_first_receipt(command: list[str], out: Path) -> int:
    """Run ``command`` and SIGKILL its whole process group once a receipt exists; return how
    many receipts the kill left."""
    # A new session = a new process group: the kill takes the driver, nannies and workers at once.
    proc = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 180
    while _receipts(out) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = _receipts(out)
    assert 0 < done_at_kill < SHARDS, f"kill landed outside the run ({done_at_kill} receipts)"
    assert not (out / "manifest.json").exists()
    return done_at_kill


def test_sigkill_whole_job_then_rerun_is_byte_identical(setup, tmp_path, capsys):
    out = tmp_path / "tokens"
    command = _command(setup, setup["tokenizer"], out)
    done_at_kill = _kill_after_first_receipt(command, out)

    # The same command again, in-process and on the already running cluster to save a start-up
    # (cluster settings do not shape the outputs).
    argv = [*command[1:-1], f"cluster.address={setup['cluster'].scheduler_address}"]
    assert cli_main(argv) == 0
    assert f'"shards_already_done": {done_at_kill}' in capsys.readouterr().out
    assert helpers.dataset_files(out) == setup["reference"]
    assert validate_main([str(out)]) == 0


def test_sigkill_then_a_swapped_tokenizer_is_refused_never_mixed(setup, tmp_path, capsys):
    """Integrity issue, reproduction 1: kill -9, copy another tokenizer over the same path, rerun."""
    tokenizer = tmp_path / "tok.pth"
    shutil.copy(setup["tokenizer"], tokenizer)
    out = tmp_path / "tokens"
    command = _command(setup, tokenizer, out)
    _kill_after_first_receipt(command, out)
    helpers.make_tokenizer(tokenizer, seed=1)  # other weights under the same path
    before = helpers.dataset_files(out)

    argv = [*command[1:-1], f"cluster.address={setup['cluster'].scheduler_address}"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "tokenizer_fingerprint" in err and "Traceback" not in err
    assert helpers.dataset_files(out) == before


def test_sigkill_one_worker_mid_run_still_completes_identically(setup, tmp_path):
    cluster = setup["cluster"]
    out = tmp_path / "tokens"
    killed: list[int] = []

    def kill_a_worker() -> None:
        deadline = time.monotonic() + 120
        while _receipts(out) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        from distributed import Client

        with Client(cluster.scheduler_address) as client:
            pids = list(client.run(os.getpid).values())
        if _receipts(out) < SHARDS:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(_receipts(out))

    watcher = threading.Thread(target=kill_a_worker)
    watcher.start()
    summary = tokenize(
        config(
            setup["images"], setup["tokenizer"], out, address=cluster.scheduler_address, retries=2
        )
    )
    watcher.join()
    assert killed and killed[0] < SHARDS, "the worker was killed after the run had finished"
    assert summary["exit_code"] == 0, summary
    assert helpers.dataset_files(out) == setup["reference"]
