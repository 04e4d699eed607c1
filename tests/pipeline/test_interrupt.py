"""Ctrl-C (SIGINT to the whole process group, as a terminal sends it) during ``pipeline run``:
exit 130, no traceback, one line saying what was kept and how to go on, and going on as that
line says gives what an uninterrupted run gives. Stage 2 also leaves no process of its cluster
behind; stage 3's loader workers get the signal too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from support import cli_runs as cli
from support import pretrain_data, stage2

from pipeline.cli import main

# An epoch of the tiny run takes a fraction of a second: if the signal still lands after the last
# checkpoint (a stalled poller on a loaded machine), the scenario is retried with a longer run.
EPOCHS_TRIED = (6, 24)
TIMING = {"seconds", "samples_per_s"}  # metrics fields that measure wall time


def pretrain_command(corpus: dict, out: Path, epochs: int, *extra: str) -> list[str]:
    return [
        *cli.pipeline_command(), "run", "stage=pretrain", f"images={corpus['images']}",
        f"tokens={corpus['tokens']}", f"out_dir={out}", "model.size=tiny", "model.width=32",
        "model.depth=2", "model.heads=2", "mask.min_patches=4", "train.batch_size=4",
        f"train.epochs={epochs}", "train.blr=0.5", "train.warmup_epochs=1",
        "train.num_workers=1",  # a loader worker, which Ctrl-C reaches as well
        "train.shuffle_buffer=4", "train.log_every=1", "train.save_every=1", "train.device=cpu",
        "log.tensorboard=false", *extra,
    ]  # fmt: skip


def test_ctrl_c_of_stage_3_says_how_to_resume_and_resuming_equals_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    images = pretrain_data.make_images(tmp_path / "images")
    tokenizer = pretrain_data.make_tokenizer(tmp_path / "tokenizer.pth")
    corpus = {
        "images": str(images),
        "tokens": str(pretrain_data.make_tokens(images, tokenizer, tmp_path / "tokens")),
    }
    for epochs in EPOCHS_TRIED:
        split, log = tmp_path / f"split{epochs}", tmp_path / f"interrupted{epochs}.log"
        cli.run_and_kill_after_checkpoint(
            pretrain_command(corpus, split, epochs), split, log, signal.SIGINT
        )
        stopped_at = torch.load(split / "checkpoint.pth", weights_only=True)["epoch"]
        if stopped_at < epochs and not (split / "backbone_timm.pth").exists():
            break
    assert 1 <= stopped_at < epochs, f"every run finished before Ctrl-C ({stopped_at}/{epochs})"
    said = log.read_text()
    assert "Traceback" not in said, said[-3000:]
    line = next(ln for ln in said.splitlines() if "interrupted (SIGINT)" in ln)
    assert line.endswith(
        f"interrupted (SIGINT) during stage=pretrain: the last saved epoch is in {split}/"
        "checkpoint.pth (every train.save_every epochs); rerun the same command with "
        "train.resume=true to go on from it"
    ), line
    assert not (split / ".lock").exists()  # let go on the way out

    cli.run_to_end(pretrain_command(corpus, split, epochs, "train.resume=true"), tmp_path / "r.log")
    full = tmp_path / "full"
    cli.run_to_end(pretrain_command(corpus, full, epochs), tmp_path / "full.log")
    a = torch.load(full / "checkpoint.pth", weights_only=True)
    b = torch.load(split / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == epochs and a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert cli.records(full, TIMING) == cli.records(split, TIMING)


def _receipts(out: Path) -> int:
    return len(list((out / "receipts").glob("*.json"))) if (out / "receipts").is_dir() else 0


def test_ctrl_c_of_stage_2_tears_the_cluster_down_and_a_rerun_finishes_the_same_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    shards = 8
    images = stage2.make_corpus(tmp_path / "images", shards=shards, per_shard=6)
    tokenizer = stage2.make_tokenizer(tmp_path / "tok.pth")
    out = tmp_path / "tokens"

    def command(out: Path) -> list[str]:
        return ["run", "stage=tokenize", f"images={images}", f"tokenizer={tokenizer}",
                f"out_dir={out}", "seeds=[0,1]", "aug.size=32", "batch_size=4",
                "precision=fp32", "cluster.dashboard=false", "cluster.n_workers=1"]  # fmt: skip

    log = tmp_path / "interrupted.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [*cli.pipeline_command(), *command(out)],
            cwd=cli.ROOT,
            env=cli.environment(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: the driver, the nanny and the worker
        )
        try:
            deadline = time.monotonic() + 120
            while _receipts(out) == 0:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no shard finished within 120 s"
                time.sleep(0.01)
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(timeout=60) == 130, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    said = log.read_text()
    assert "Traceback" not in said, said[-3000:]
    assert (
        f"interrupted (SIGINT) during stage=tokenize: the finished shards are kept in {out}; "
        "rerun the same command to resume (it tokenizes only the rest)\n"
    ) in said
    # nothing of the run lives on (a zombie waiting for init to reap it is dead already)
    ps = ["ps", "-s", str(proc.pid), "-o", "pid=,stat=,args="]
    alive = [p for p in subprocess.run(ps, capture_output=True, text=True).stdout.splitlines()
             if p.split()[1][0] != "Z"]  # fmt: skip
    assert alive == [], f"processes of the run are still alive: {alive}"
    done = _receipts(out)
    assert 0 < done < shards and not (out / "manifest.json").exists()
    assert not (out / ".lock").exists()

    assert main(command(out)) == 0  # the same command again
    assert f'"shards_already_done": {done}' in capsys.readouterr().out
    reference = tmp_path / "reference"
    assert main(command(reference)) == 0
    assert stage2.dataset_files(out) == stage2.dataset_files(reference)


SWALLOWED = textwrap.dedent(
    """
    import os, signal, sys, time
    from pipeline import cli

    class Swallows:
        def __del__(self):  # Python can only print what is raised here
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)

    def dispatch(argv):
        Swallows()
        for _ in range(500):  # the run going on: 5 s
            time.sleep(0.01)
        return 0

    cli.dispatch = dispatch
    sys.exit(cli.main(["run", "stage=pack"]))
    """
)


def test_an_interrupt_python_could_only_print_still_ends_the_command() -> None:
    """Ctrl-C landing in an after-fork hook or a ``__del__`` (a DataLoader starting its workers)
    is raised again where it ends the command, instead of a traceback and a run that goes on."""
    done = subprocess.run(
        [sys.executable, "-c", SWALLOWED],
        cwd=cli.ROOT,
        env=cli.environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    assert "interrupted (SIGINT) during pipeline run: rerun the same command" in done.stderr
