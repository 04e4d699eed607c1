"""Stage 2 on the default local cluster while its workers are killed (docs/design.md §4, "Where
it runs"): the run finishes with the files of an undisturbed run, or it ends within
``cluster.no_worker_timeout`` with exit 1 and a message that a rerun resumes; it never hangs.

Each run is a ``pipeline run stage=tokenize`` subprocess in its own process group; its workers
are the driver's child processes that multiprocessing spawned, killed with SIGKILL by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from support import cli_runs
from support import stage2 as helpers

from shards.views import AugConfig
from tokenize_corpus.cluster import IDLE_LOOK_SECONDS
from tokenize_corpus.config import ClusterConfig, TokenizeConfig
from tokenize_corpus.job import tokenize

SHARDS = 12
TIMEOUT_S = 5  # cluster.no_worker_timeout of these runs
HANG_S = 90  # a run still going after this long hangs: the test kills it and fails
OVERRIDES = [
    "seeds=[0,1]", "aug.size=32", "batch_size=4", "precision=fp32", "cluster.dashboard=false",
    "cluster.n_workers=2",
]  # fmt: skip


def undisturbed(setup: dict, out: Path) -> dict:
    """The runs' job in this process, on the module's cluster (its settings shape no output)."""
    cfg = TokenizeConfig(
        images=setup["images"],
        tokenizer=setup["tokenizer"],
        out_dir=str(out),
        seeds=(0, 1),
        aug=AugConfig(size=32),
        batch_size=4,
        precision="fp32",
        cluster=ClusterConfig(address=setup["cluster"], dashboard=False),
    )
    return tokenize(cfg)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_path, cluster2) -> dict:
    """A 12-shard corpus and the files of an undisturbed run of it."""
    root = tmp_path_factory.mktemp("faults")
    images = helpers.make_corpus(root / "images", shards=SHARDS, per_shard=4)
    setup = {"images": images, "tokenizer": tokenizer_path, "cluster": cluster2}
    assert undisturbed(setup, root / "reference")["exit_code"] == 0
    return {**setup, "files": helpers.dataset_files(root / "reference")}


@dataclass
class Run:
    returncode: int
    summary: dict
    log: str
    kills: list[float]  # when each worker was killed (time.monotonic())
    ended: float  # when the run ended (time.monotonic())


def workers_of(driver: psutil.Process) -> list[psutil.Process]:
    """The local Dask workers of a run: its children that multiprocessing spawned."""
    found = []
    for child in driver.children():
        with contextlib.suppress(psutil.Error):
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
    return found


def run(
    setup: dict, out: Path, every: float | None, begin=lambda out: True, env=None, timeout=TIMEOUT_S
) -> Run:
    """Run stage 2 into ``out`` with ``cluster.no_worker_timeout={timeout}s``; from when
    ``begin(out)`` holds, SIGKILL every worker of the run every ``every`` seconds (``None``:
    never) until it ends."""
    command = [
        *cli_runs.pipeline_command(), "run", "stage=tokenize", f"images={setup['images']}",
        f"tokenizer={setup['tokenizer']}", f"out_dir={out}", *OVERRIDES,
        f"cluster.no_worker_timeout={timeout}s",
    ]  # fmt: skip
    log, stdout = out.with_suffix(".log"), out.with_suffix(".out")
    kills: list[float] = []
    with log.open("w") as err, stdout.open("w") as summary:
        proc = subprocess.Popen(
            command,
            cwd=cli_runs.ROOT,
            env={**cli_runs.environment(), **(env or {})},
            stdout=summary,
            stderr=err,
            start_new_session=True,  # its own process group: a hung run is killed whole
        )
        driver = psutil.Process(proc.pid)
        deadline = time.monotonic() + HANG_S
        try:
            while proc.poll() is None and time.monotonic() < deadline and every is not None:
                if begin(out):
                    for worker in workers_of(driver):
                        with contextlib.suppress(psutil.Error):
                            worker.kill()
                            kills.append(time.monotonic())
                    time.sleep(every)
                else:
                    time.sleep(0.02)
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run hung for {HANG_S} s:\n{log.read_text()[-3000:]}")
        finally:
            ended = time.monotonic()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    text = stdout.read_text()
    parsed = json.JSONDecoder().raw_decode(text[text.index("{") :])[0] if "{" in text else {}
    return Run(proc.returncode, parsed, log.read_text(), kills, ended)


def started(out: Path) -> bool:
    """Whether a shard is done (the run is past its start and tokenizing)."""
    folder = out / "receipts"
    return folder.is_dir() and any(folder.glob("*.json"))


def workers_up(out: Path) -> bool:
    """Whether the run's local cluster has started (its log says so)."""
    return "workers up in" in out.with_suffix(".log").read_text()


def assert_clean_failure(done: Run) -> None:
    """Exit 1 with a one-line message that a rerun resumes, and no traceback of the run itself
    (Dask logs the tracebacks of its own dying connections; those are no crash)."""
    assert done.returncode == 1, done.log[-3000:]
    assert "pipeline/cli.py" not in done.log, done.log[-3000:]
    assert "rerun the same command" in done.summary["message"], done.summary
    assert "\n" not in done.summary["message"]


def test_workers_killed_every_1_5_s_finish_identically_or_end_clearly(setup, tmp_path):
    out = tmp_path / "tokens"
    done = run(setup, out, every=1.5, begin=workers_up)
    assert done.kills, "no worker was killed"
    if done.returncode == 0:
        assert helpers.dataset_files(out) == setup["files"]
        return
    assert_clean_failure(done)
    # What was finished is kept: the same job without kills resumes to the same files.
    receipts = len(list((out / "receipts").glob("*.json"))) if (out / "receipts").is_dir() else 0
    again = undisturbed(setup, out)
    assert again["exit_code"] == 0, again
    assert again["shards_already_done"] == receipts
    assert helpers.dataset_files(out) == setup["files"]


def test_workers_that_never_come_back_end_the_run_within_the_timeout(setup, tmp_path):
    """Every worker killed as soon as it appears: none is ever working again."""
    out = tmp_path / "tokens"
    done = run(setup, out, every=0.05, begin=started)
    assert done.kills
    assert_clean_failure(done)
    assert f"no working worker for {TIMEOUT_S} s" in done.summary["message"]
    # the watch last saw working workers at most one look before the first kill
    took = done.ended - done.kills[0]
    assert TIMEOUT_S - IDLE_LOOK_SECONDS <= took <= TIMEOUT_S + 25, took


def test_a_nanny_that_gives_up_is_replaced_and_the_run_finishes(setup, tmp_path):
    """The LocalCluster closes a nanny whose worker has been gone for
    distributed.deploy.lost-worker-timeout (15 s; 0.1 s here, so that one kill does it): the
    run starts that worker again and ends with the files of an undisturbed run."""
    out = tmp_path / "tokens"
    fired: list[bool] = []

    def first_receipt_once(out: Path) -> bool:
        if fired or not started(out):
            return False
        fired.append(True)
        return True

    env = {"DASK_DISTRIBUTED__DEPLOY__LOST_WORKER_TIMEOUT": "0.1s"}
    # a restart on 2 busy cores can take longer than the other tests' 5 s
    done = run(setup, out, every=0.0, begin=first_receipt_once, env=env, timeout=60)
    assert done.kills, "the run ended before a worker was killed"
    assert done.returncode == 0, done.log[-3000:]
    assert "was not restarted by its nanny; starting worker" in done.log
    assert helpers.dataset_files(out) == setup["files"]
