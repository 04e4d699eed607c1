"""One run per out_dir, for every stage (``engine.lock``): a second run into a folder another run
holds exits 2 naming the folder and the holder, writes nothing there, and the first run's
outputs are its own; a run killed with ``kill -9`` blocks no rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from support import cli_runs as cli
from support import pretrain_data

from pipeline.cli import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A folder of small JPEGs, its token dataset (stage 3) and a tiny ViT teacher (stage 1)."""
    root = tmp_path_factory.mktemp("lock_corpus")
    images = pretrain_data.make_images(root / "images")
    tokenizer = pretrain_data.make_tokenizer(root / "tokenizer.pth")
    torch.manual_seed(0)
    teacher = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8)
    torch.save(teacher.state_dict(), root / "teacher.pt")
    return {
        "images": str(images),
        "tokens": str(pretrain_data.make_tokens(images, tokenizer, root / "tokens")),
        "teacher": str(root / "teacher.pt"),
    }


def pretrain(corpus: dict[str, str], out: Path, *extra: str) -> list[str]:
    return [
        *cli.pipeline_command(), "run", "stage=pretrain", f"images={corpus['images']}",
        f"tokens={corpus['tokens']}", f"out_dir={out}", "model.size=tiny", "model.width=32",
        "model.depth=1", "model.heads=2", "mask.min_patches=4", "train.batch_size=4",
        "train.blr=0.5", "train.warmup_epochs=1", "train.shuffle_buffer=4", "train.log_every=1",
        "train.device=cpu", "log.tensorboard=false", *extra,
    ]  # fmt: skip


def records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as sink:
        return subprocess.Popen(
            cmd, cwd=cli.ROOT, env=cli.environment(), stdout=sink, stderr=subprocess.STDOUT
        )


def wait_for(proc: subprocess.Popen, ready: object, log: Path) -> None:
    deadline = time.monotonic() + 120
    while not ready():  # type: ignore[operator]
        assert proc.poll() is None, f"the run ended first:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "the run did not get going within 120 s"
        time.sleep(0.01)


def test_a_second_pretrain_run_into_a_busy_out_dir_exits_2_and_the_first_is_intact(
    corpus: dict[str, str], tmp_path: Path
) -> None:
    out, epochs = tmp_path / "run", 12
    first = start(pretrain(corpus, out, f"train.epochs={epochs}", "train.num_workers=0"),
                  tmp_path / "first.log")  # fmt: skip
    try:
        wait_for(first, lambda: cli.started_epoch(out, 0), tmp_path / "first.log")
        os.kill(first.pid, signal.SIGSTOP)  # paused mid-run, however long the second takes
        second = subprocess.run(
            pretrain(corpus, out, f"train.epochs={epochs}", "train.seed=5"),
            cwd=cli.ROOT,
            env=cli.environment(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.kill(first.pid, signal.SIGCONT)
        assert second.returncode == 2, second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        assert f"error: out_dir={out} is held by another run (pid {first.pid} on " in second.stderr
        assert first.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    # the first run's outputs, alone: its config, each epoch once, steps in order, its checkpoint
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["seed"] == 0
    lines = records(out)
    assert [r["epoch"] for r in lines if r["kind"] == "epoch"] == list(range(epochs))
    steps = [r["step"] for r in lines if r["kind"] == "step"]
    assert steps == sorted(set(steps))
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == epochs
    assert not (out / ".lock").exists()


def test_a_pretrain_run_killed_with_kill_9_blocks_no_rerun(
    corpus: dict[str, str], tmp_path: Path
) -> None:
    """Only the main process is killed: its loader worker may outlive it a few seconds."""
    out, log = tmp_path / "run", tmp_path / "killed.log"
    cmd = pretrain(corpus, out, "train.epochs=6", "train.num_workers=1", "train.save_every=1")
    run = start(cmd, log)
    try:
        wait_for(run, lambda: (out / "checkpoint.pth").exists(), log)
        os.kill(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert (out / ".lock").exists()  # left behind, and no longer held
    cli.run_to_end([*cmd, "train.resume=true"], tmp_path / "rerun.log")
    assert "resuming from" in (tmp_path / "rerun.log").read_text()
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 6


HOLDER = textwrap.dedent(
    """
    import sys, time
    from engine.lock import hold
    with hold(sys.argv[1]):
        print("held", flush=True)
        time.sleep(120)
    """
)


@pytest.fixture
def holder(tmp_path: Path):
    """Another process holding ``tmp_path / "run"``; the test kills it with ``kill -9``."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], env=cli.environment(), stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    yield proc, out
    proc.kill()
    proc.wait()


def vqkd(corpus: dict[str, str], out: Path) -> list[str]:
    return [
        "run", "stage=vqkd", f"images={corpus['images']}", f"out_dir={out}", "model.size=tiny",
        "model.image_size=32", "model.patch_size=8", "model.width=32", "model.depth=1",
        "model.heads=2", "model.decoder_depth=1", "model.code_dim=8", "model.codebook_size=16",
        "model.kmeans_iters=2", "teacher.name=timm:vit_tiny_patch16_224",
        f"teacher.weights={corpus['teacher']}", "train.batch_size=8", "train.epochs=1",
        "train.warmup_epochs=0", "train.num_workers=0", "train.device=cpu", "eval.max_images=8",
        "log.tensorboard=false",
    ]  # fmt: skip


def test_vqkd_into_a_held_out_dir_exits_2_writing_nothing_then_runs_once_the_holder_is_killed(
    corpus: dict[str, str], holder: tuple, capsys: pytest.CaptureFixture
) -> None:
    proc, out = holder
    assert main(vqkd(corpus, out)) == 2
    err = capsys.readouterr().err
    assert f"error: out_dir={out} is held by another run (pid {proc.pid} on " in err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert main(vqkd(corpus, out)) == 0
    assert (out / "tokenizer.pth").is_file() and not (out / ".lock").exists()


def test_pack_into_a_held_out_dir_exits_2_writing_nothing(
    corpus: dict[str, str], holder: tuple, capsys: pytest.CaptureFixture
) -> None:
    proc, out = holder
    assert main(["run", "stage=pack", f"images={corpus['images']}", f"out_dir={out}"]) == 2
    assert f"error: out_dir={out} is held by another run (pid {proc.pid} on " in (
        capsys.readouterr().err
    )
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
