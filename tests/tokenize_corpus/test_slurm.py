"""Stage 2 on a real SLURM: worker jobs submitted through dask-jobqueue, preemption, a killed
driver, ``srun`` with SLURMRunner, the example batch scripts, and the mistakes refused before
anything is submitted. Every run's rows are compared with those of a local run of the same job.

Needs a running SLURM (``bash tests/slurm/up.sh`` as root); skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support import cli_runs as cli
from support import stage2 as helpers
from support.slurm import sbatch_wait, skip_without_slurm, srun, without_launcher_variables

from shards.validate import validate
from shards.views import AugConfig
from tokenize_corpus.batch import JOB_NAME
from tokenize_corpus.config import ClusterConfig, TokenizeConfig
from tokenize_corpus.job import tokenize

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "slurm"
PIPELINE = [sys.executable, "-m", "pipeline.cli"]

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures(skip_without_slurm.__name__)]

SHARDS = 12
# Settings of every run: tiny views, two seeds, fp32 (the same tokens on every worker).
JOB = ["aug.size=32", "seeds=[0,1]", "batch_size=8", "precision=fp32"]
# Worker jobs on the test cluster: one core each, short-lived, quick to notice a lost driver.
BATCH = ["cluster.kind=slurm", "cluster.queue=debug", "cluster.job_cores=1",
         "cluster.job_memory=2GiB", "cluster.walltime=00:20:00", "cluster.death_timeout=15s",
         "cluster.dashboard=false"]  # fmt: skip


def make_corpus(root: Path, shards: int, per_shard: int) -> dict[str, str]:
    images = helpers.make_corpus(root / "images", shards=shards, per_shard=per_shard)
    return {"images": images, "tokenizer": helpers.make_tokenizer(root / "tok.pth")}


def local_tokenize(corpus: dict[str, str], out: Path) -> Path:
    """The reference: the same job on a LocalCluster of 2 workers."""
    cfg = TokenizeConfig(
        images=corpus["images"],
        tokenizer=corpus["tokenizer"],
        out_dir=str(out),
        seeds=(0, 1),
        batch_size=8,
        precision="fp32",
        aug=AugConfig(size=32),
        cluster=ClusterConfig(n_workers=2, dashboard=False),
    )
    assert tokenize(cfg)["exit_code"] == 0
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_corpus(tmp_path_factory.mktemp("slurm_corpus"), shards=4, per_shard=30)


@pytest.fixture(scope="module")
def local_run(corpus: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return local_tokenize(corpus, tmp_path_factory.mktemp("local") / "tokens")


@pytest.fixture(scope="module")
def slow_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """12 tar shards of 600 small images: about a second a shard on one core, so a run lasts
    long enough to lose workers while shards are in flight."""
    return make_corpus(tmp_path_factory.mktemp("slow_corpus"), shards=SHARDS, per_shard=600)


@pytest.fixture(scope="module")
def slow_local_run(slow_corpus: dict[str, str], tmp_path_factory) -> Path:
    return local_tokenize(slow_corpus, tmp_path_factory.mktemp("slow_local") / "tokens")


def with_keys(args: list[str], *changes: str) -> list[str]:
    """``args`` with the ``key=value`` items of ``changes`` replacing those of the same key."""
    keys = {change.split("=", 1)[0] for change in changes}
    return [a for a in args if a.split("=", 1)[0] not in keys] + list(changes)


def data_args(corpus: dict[str, str], out: Path) -> list[str]:
    return [f"images={corpus['images']}", f"tokenizer={corpus['tokenizer']}", f"out_dir={out}"]


def environment() -> dict[str, str]:
    return without_launcher_variables(cli.environment())


def run_cli(args: list[str], timeout: float = 240, env: dict | None = None):
    return subprocess.run(
        [*PIPELINE, "run", "stage=tokenize", *args],
        cwd=ROOT, env=env or environment(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def start_cli(args: list[str], log: Path) -> subprocess.Popen:
    """``pipeline run stage=tokenize args`` in the background, its output going to ``log`` (a
    pipe nobody reads while the test waits could fill and stall the run)."""
    with log.open("w") as out:
        return subprocess.Popen(
            [*PIPELINE, "run", "stage=tokenize", *args], cwd=ROOT, env=environment(),
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def our_jobs() -> dict[str, str]:
    """Job id -> state of the worker jobs (by their name) that SLURM has now."""
    out = subprocess.run(
        ["squeue", "-h", "-n", JOB_NAME, "-o", "%i %T"], capture_output=True, text=True, timeout=30
    ).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def wait_until(condition, timeout: float, what: str, poll: float = 0.25) -> float:
    """Seconds until ``condition()`` held; fails the test after ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what} not within {timeout} s")
        time.sleep(poll)
    return time.monotonic() - start


def receipts(out: Path) -> int:
    return len(list((out / "receipts").glob("shard-*.json"))) if (out / "receipts").exists() else 0


def assert_same_rows(reference: Path, out: Path) -> None:
    """Byte-identical token files, manifest and card (the run's config and logs aside), and the
    same (key, seed, tokens) rows read back."""
    assert helpers.dataset_files(out) == helpers.dataset_files(reference)
    assert helpers.rows(out) == helpers.rows(reference)
    assert validate(str(out)) == []


class JobSpy:
    """Collects the ids of the worker jobs SLURM shows while a run goes on."""

    def __init__(self) -> None:
        self.seen: dict[str, set[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> JobSpy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.3):
            for job, state in our_jobs().items():
                self.seen.setdefault(job, set()).add(state)


def test_worker_jobs_give_the_local_rows_and_are_gone_after_the_run(corpus, local_run, tmp_path):
    assert not our_jobs(), "worker jobs of an earlier run are still queued"
    out = tmp_path / "tokens"
    with JobSpy() as spy:
        done = run_cli([*data_args(corpus, out), *JOB, *BATCH, "cluster.jobs=2"])
    assert done.returncode == 0, done.stderr[-3000:]
    running = [job for job, states in spy.seen.items() if "RUNNING" in states]
    assert len(running) >= 2, spy.seen  # two worker jobs really ran on SLURM
    wait_until(lambda: not set(our_jobs()) & set(spy.seen), 15, "the worker jobs to leave squeue")
    assert_same_rows(local_run, out)
    script = (out / "logs" / "job-script.sh").read_text()
    assert "#SBATCH -p debug" in script and "--nthreads 1" in script
    logs = list((out / "logs").glob(f"{JOB_NAME}-*.err"))
    assert {p.stem.rsplit("-", 1)[-1] for p in logs} >= set(running)  # their logs are kept


def test_preempted_worker_jobs_are_replaced_and_the_rows_do_not_change(
    slow_corpus, slow_local_run, tmp_path
):
    """scancel both worker jobs in turn while shards are in flight: their shards run again on
    the replacements, the run ends 0 and the dataset equals the undisturbed one."""
    out = tmp_path / "tokens"
    log = tmp_path / "run.log"
    proc = start_cli([*data_args(slow_corpus, out), *JOB, *BATCH, "cluster.jobs=2"], log)
    try:
        with JobSpy() as spy:
            wait_until(lambda: receipts(out) >= 1, 120, "the first finished shard")
            first = sorted(our_jobs(), key=int)
            subprocess.run(["scancel", first[0]], check=True, timeout=30)  # a preemption
            wait_until(lambda: receipts(out) >= SHARDS // 2, 120, "half of the shards")
            subprocess.run(["scancel", *first[1:]], check=True, timeout=30)  # and the other
            proc.wait(timeout=240)
    finally:
        proc.kill()
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    assert len(spy.seen) >= 3, spy.seen  # at least one replacement job was submitted
    assert "Traceback" not in output
    assert_same_rows(slow_local_run, out)


def test_a_killed_driver_leaves_no_job_running_and_a_rerun_finishes_it(
    slow_corpus, slow_local_run, tmp_path
):
    out = tmp_path / "tokens"
    args = [*data_args(slow_corpus, out), *JOB, *BATCH, "cluster.jobs=2"]
    proc = start_cli(args, tmp_path / "killed.log")
    try:
        wait_until(lambda: receipts(out) >= 2, 120, "two finished shards")
        jobs = set(our_jobs())
        assert jobs
        os.kill(proc.pid, signal.SIGKILL)  # the driver and its scheduler die at once
        proc.wait(timeout=30)
    finally:
        proc.kill()
    # the workers lose their scheduler and their jobs end (death_timeout bounds it)
    seconds = wait_until(lambda: not set(our_jobs()) & jobs, 60, "the orphaned worker jobs to end")
    assert seconds < 45
    assert receipts(out) < SHARDS
    done = run_cli(args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"shards_already_done": 0' not in done.stdout  # the rerun kept the finished shards
    assert_same_rows(slow_local_run, out)


def test_srun_with_slurm_runner_gives_the_local_rows(corpus, local_run, tmp_path):
    out = tmp_path / "tokens"
    code = srun(
        [*PIPELINE, "run", "stage=tokenize", *data_args(corpus, out), *JOB,
         "cluster.kind=slurm-runner", "cluster.dashboard=false"],
        ntasks=3, log=tmp_path / "srun.log", env=environment(), cwd=ROOT, timeout=180,
    )  # fmt: skip
    log = (tmp_path / "srun.log").read_text()
    assert code == 0, log[-3000:]
    assert "Traceback" not in log
    assert_same_rows(local_run, out)


@pytest.mark.parametrize(
    ("script", "options", "extra"),
    [
        ("tokenize.sbatch", ["--cpus-per-task=1", "--partition=debug"],
         {"JOBS": "2", "PARTITION": "debug", "GPUS": "0", "CORES": "1", "MEMORY": "2GiB",
          "WALLTIME": "00:20:00"}),
        ("tokenize-runner.sbatch", ["--nodes=1", "--ntasks=3", "--ntasks-per-node=3",
                                    "--gpus-per-task=0", "--cpus-per-task=1", "--mem-per-cpu=1G",
                                    "--partition=debug"], {}),
    ],
)  # fmt: skip
def test_the_example_batch_scripts_give_the_local_rows(
    corpus, local_run, tmp_path, script, options, extra
):
    out = tmp_path / "tokens"
    env = {
        **environment(),
        "IMAGES": corpus["images"],
        "TOKENIZER": corpus["tokenizer"],
        "OUT_DIR": str(out),
        "PRESET": "demo",
        "EXTRA_ARGS": " ".join([*JOB, "cluster.dashboard=false"]),
        "PIPELINE": " ".join(PIPELINE),
        **extra,
    }
    job, code = sbatch_wait(
        EXAMPLES / script,
        [*options, "--time=10", f"--output={tmp_path / 'job.out'}", f"--chdir={ROOT}"],
        env=env, cwd=ROOT, timeout=240,
    )  # fmt: skip
    log = (tmp_path / "job.out").read_text()
    assert code == 0, log[-3000:]
    assert_same_rows(local_run, out)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["cluster.queue=nosuch"], r"cluster.queue=nosuch: SLURM has no such partition; it has debug, long"),
        (["cluster.job_memory=lots"], r"cluster.job_memory='lots' is not a size"),
        (["cluster.jobs=0"], r"cluster.jobs=0 is out of range: it must be >= 1"),
        (["cluster.walltime=forever"], r"cluster.walltime='forever' is not a time limit"),
        (["cluster.gpus_per_job=1"], r"SLURM refuses the worker job script \(.*gres"),
        (["cluster.job_cores=64"], r"SLURM refuses the worker job script \(.*processors"),
        (["cluster.kind=slurm-runner"], r"cluster.kind=slurm-runner runs inside `srun -n N"),
        ("no sbatch", r"cluster.kind=slurm submits worker jobs with sbatch, which is not on PATH"),
    ],
)  # fmt: skip
def test_batch_mistakes_exit_2_before_anything_is_submitted(corpus, tmp_path, extra, message):
    out = tmp_path / "tokens"
    env = environment()
    if extra == "no sbatch":  # only the interpreter's folder: no SLURM command is found
        env["PATH"] = str(Path(sys.executable).parent)
        extra = []
    before = set(our_jobs())
    done = run_cli([*data_args(corpus, out), *JOB, *with_keys(BATCH, *extra)], env=env, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert re.search(message, done.stderr), done.stderr
    assert set(our_jobs()) <= before  # nothing was submitted
    assert not (out / "receipts").exists() and not list(out.glob("logs/*.out"))


def test_jobs_that_cannot_start_end_the_run_with_exit_1_and_a_rerun_resumes(
    corpus, local_run, tmp_path
):
    """A prologue that fails in every job (a wrong module, a missing venv): the run does not wait
    forever; it stops after a few failed starts, says a rerun resumes, and one does."""
    out = tmp_path / "tokens"
    start = time.monotonic()
    done = run_cli(
        [*data_args(corpus, out), *JOB, *BATCH, "cluster.jobs=1", "cluster.prologue=[exit 3]"]
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert time.monotonic() - start < 120
    assert "ended before their worker connected" in done.stderr
    assert "rerun the same command" in done.stderr and "Traceback" not in done.stderr
    assert not our_jobs()
    done = run_cli([*data_args(corpus, out), *JOB, *BATCH, "cluster.jobs=2"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_rows(local_run, out)


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"]
)
def test_an_interrupted_run_cancels_its_jobs_and_says_a_rerun_resumes(
    slow_corpus, tmp_path, signum, code
):
    """Ctrl-C, or the SIGTERM of a scancel'd driver job: every worker job is cancelled by the
    driver itself (at once, not after the workers' death timeout), nothing is left queued."""
    out = tmp_path / "tokens"
    log = tmp_path / "run.log"
    proc = start_cli([*data_args(slow_corpus, out), *JOB, *BATCH, "cluster.jobs=2"], log)
    try:
        wait_until(lambda: receipts(out) >= 1, 120, "the first finished shard")
        jobs = set(our_jobs())
        proc.send_signal(signum)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    output = log.read_text()
    assert proc.returncode == code, output[-3000:]
    assert "rerun the same command to resume" in output and "Traceback" not in output
    assert wait_until(lambda: not set(our_jobs()) & jobs, 15, "the jobs to be cancelled") < 10
    assert not (out / ".lock").exists()  # the lock is released


def test_an_error_after_the_jobs_started_cancels_them(corpus, tmp_path):
    """fp16 on CPU workers is found by the workers (they resolve the precision): exit 2, and the
    jobs submitted for the run are cancelled with it."""
    out = tmp_path / "tokens"
    with JobSpy() as spy:
        done = run_cli([*data_args(corpus, out), *with_keys(JOB, "precision=fp16"), *BATCH])
    assert done.returncode == 2, done.stderr[-3000:]
    assert "fp16" in done.stderr and "Traceback" not in done.stderr
    assert spy.seen  # jobs had been submitted
    wait_until(lambda: not set(our_jobs()) & set(spy.seen), 15, "the jobs to be cancelled")
