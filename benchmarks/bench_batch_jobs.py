"""Stage 2 as SLURM worker jobs: what losing a worker costs, and how fast the jobs react.

On a real SLURM (``tests/slurm/up.sh`` gives a one-node one), the same job runs
``cluster.kind=slurm cluster.jobs=2`` three ways, each --repeats times:

  undisturbed   the reference: wall time of the whole command
  preempted     one worker job is cancelled (``scancel``) when the first shard is done: wall
                time (the other worker goes on; a replacement comes if shards remain)
  all_preempted every worker job is cancelled when the first shard is done: seconds from the
                cancel until SLURM shows a replacement queued and then running, and wall time
  killed        the driver is ``kill -9``'d when the first shard is done: seconds until its
                worker jobs have left the queue (their workers notice the lost scheduler)
Each preempted run's dataset is compared byte for byte with the undisturbed one.

The images are a folder of small synthetic JPEGs packed into WebDataset shards with
``stage=pack``; the tokenizer is the tiny random one of ``synthetic.tokenizer`` (the worker's
time is decode and render, so a lost shard costs what it would cost).

    .venv/bin/python benchmarks/bench_batch_jobs.py --shards 12 --per-shard 600 --repeats 3

Writes benchmarks/results/batch_jobs.json. Without SLURM (``sinfo`` not on PATH) it says so
and measures nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import smoke
import synthetic

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = [sys.executable, "-m", "pipeline.cli"]
JOB_NAME = "beitv2-tokenize"  # tokenize_corpus.batch.JOB_NAME
KINDS = {"undisturbed": "", "preempted": "preempt", "all_preempted": "preempt-all",
         "killed": "kill"}  # fmt: skip
SMOKE = ["--shards", "2", "--per-shard", "20", "--repeats", "1", "--kinds", "undisturbed",
         "--work={tmp}/work", "--out={tmp}/batch_jobs.json"]  # fmt: skip


def our_jobs() -> dict[str, str]:
    """Job id -> state of this benchmark's worker jobs in SLURM now."""
    out = subprocess.run(
        ["squeue", "-h", "-n", JOB_NAME, "-o", "%i %T"], capture_output=True, text=True, timeout=30
    ).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def build(work: Path, shards: int, per_shard: int) -> tuple[str, str]:
    """(image shards, tokenizer) for the runs, made once."""
    tars = work / "tars"
    if not (tars / "index.json").exists():
        shutil.rmtree(work, ignore_errors=True)
        synthetic.imagenet_sample(work / "jpegs", count=shards * per_shard)
        done = subprocess.run(
            [*PIPELINE, "run", "stage=pack", f"images={work / 'jpegs'}", f"out_dir={tars}",
             f"shard_size={per_shard}"],
            cwd=ROOT, capture_output=True, text=True, timeout=3600,
        )  # fmt: skip
        if done.returncode:
            raise RuntimeError(done.stderr[-2000:])
    tokenizer = work / "tokenizer.pth"
    if not tokenizer.exists():
        synthetic.tokenizer(tokenizer)
    return str(tars), str(tokenizer)


def command(images: str, tokenizer: str, out: Path) -> list[str]:
    return [*PIPELINE, "run", "stage=tokenize", f"images={images}", f"tokenizer={tokenizer}",
            f"out_dir={out}", "aug.size=32", "seeds=[0,1]", "batch_size=8", "precision=fp32",
            "cluster.kind=slurm", "cluster.jobs=2", "cluster.job_cores=1",
            "cluster.job_memory=2GiB", "cluster.walltime=00:30:00", "cluster.death_timeout=15s",
            "cluster.dashboard=false"]  # fmt: skip


def receipts(out: Path) -> int:
    folder = out / "receipts"
    return len(list(folder.glob("shard-*.json"))) if folder.exists() else 0


def digest(out: Path) -> str:
    """sha256 over every data file of a token dataset (not its config and logs)."""
    h = hashlib.sha256()
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out)
        if path.is_file() and relative.parts[0] != "logs" and path.name not in ("config.yaml",):
            h.update(str(relative).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def wait(condition, timeout: float, poll: float = 0.2) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"not within {timeout} s")
        time.sleep(poll)
    return time.monotonic() - start


def run(images: str, tokenizer: str, out: Path, disturb: str) -> dict:
    """One run; ``disturb`` is "", "preempt", "preempt-all" or "kill" (see the module docstring)."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.monotonic()
    proc = subprocess.Popen(command(images, tokenizer, out), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    result: dict = {}
    try:
        if disturb:
            wait(lambda: receipts(out) >= 1, 300)
            before = our_jobs()
            if disturb.startswith("preempt"):
                victims = sorted(before, key=int)[: 1 if disturb == "preempt" else None]
                subprocess.run(["scancel", *victims], check=True, timeout=30)
            if disturb == "preempt-all":
                new = lambda: set(our_jobs()) - set(before)  # noqa: E731
                result["replacement_queued_s"] = round(wait(lambda: bool(new()), 120), 2)
                result["replacement_running_s"] = (
                    round(wait(lambda: "RUNNING" in {our_jobs().get(j) for j in new()}, 120), 2)
                    + result["replacement_queued_s"]
                )
            elif disturb == "kill":
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                result["jobs_gone_s"] = round(
                    wait(lambda: not set(our_jobs()) & set(before), 120), 2
                )
                result["shards_done_when_killed"] = receipts(out)
                return result
        _, stderr = proc.communicate(timeout=1800)
    finally:
        proc.kill()
    if proc.returncode:
        raise RuntimeError(
            f"the {disturb or 'undisturbed'} run exited {proc.returncode}: {stderr[-2000:]}"
        )
    result["seconds"] = round(time.monotonic() - start, 2)
    result["digest"] = digest(out)
    return result


def summarise(runs: list[dict]) -> dict:
    keys = [k for k in runs[0] if isinstance(runs[0][k], int | float)]
    out: dict = {k: [r[k] for r in runs] for k in keys}
    out.update({f"median_{k}": statistics.median(out[k]) for k in keys})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=12)
    parser.add_argument("--per-shard", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_batch_jobs"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/batch_jobs.json")
    args = smoke.parse_args(parser, SMOKE)
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        results = smoke.skipped("every run", "no SLURM here (as root: bash tests/slurm/up.sh)")
    else:
        images, tokenizer = build(args.work, args.shards, args.per_shard)
        runs: dict[str, list[dict]] = {kind: [] for kind in args.kinds}
        for _ in range(args.repeats):  # interleaved, so drift hits each kind alike
            for kind in args.kinds:
                runs[kind].append(run(images, tokenizer, args.work / f"out-{kind}", KINDS[kind]))
                wait(lambda: not our_jobs(), 120)  # the next run starts from an empty queue
        digests = {r["digest"] for k in KINDS if k != "killed" for r in runs.get(k, [])}
        results = {
            "images": args.shards * args.per_shard,
            "shards": args.shards,
            "identical_to_undisturbed": len(digests) == 1,
            **{kind: summarise(r) for kind, r in runs.items()},
        }
        if "undisturbed" in runs and "preempted" in runs:
            ratio = (
                results["preempted"]["median_seconds"] / results["undisturbed"]["median_seconds"]
            )
            results["preempted_over_undisturbed"] = round(ratio, 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
