"""``pipeline plan`` against real stage-2 runs, and the byte constants the plan uses.

    .venv/bin/python benchmarks/bench_plan.py bytes     # refit tokenize_corpus/cost.py's constants
    .venv/bin/python benchmarks/bench_plan.py check     # plan vs real runs on the ImageNet sample
    .venv/bin/python benchmarks/bench_plan.py bytes check --out both.json   # one file, a key each

``bytes`` writes synthetic shards through the real writer (``shards.writer.parquet_bytes`` and
``wds_bytes``) over codebooks of 512 and 8192, grids of 36 and 196 tokens, 64 and 256 images
(``--fit-images``), K of 1 and 4, for uniform and Zipf-skewed token ids, and fits bytes = file +
row/image/view terms + tokens x (tok + tok_bit x log2(codebook)) by least squares; the constants
go into ``tokenize_corpus/cost.py`` by hand.

``check`` links the first ``--images`` ImageNet-sample files into a folder (shards of
``--shard-size``), and for each tokenizer case runs, interleaved: plan, real run, plan, real run,
plan; each real run is compared with the mean of the plans on either side of it (the machine is
shared, so only same-run comparisons mean anything). Tokenizers have random weights (speed does
not depend on them; bytes do a little: random weights use their codes unevenly).
Writes ``benchmarks/results/plan.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import smoke
import torch
from synthetic import TINY_VQKD, fake_rows

from engine.config import build_stage_config, parse_overrides
from engine.layout import imagenet_sample_dir
from shards.writer import parquet_bytes, wds_bytes
from tokenize_corpus.plan import PlanConfig, format_plan, make_plan
from tokenize_corpus.tokenizer import save_tokenizer
from tokenize_corpus.vqkd import VQKD, VQKDModelConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUTPUTS = {"bytes": "plan_bytes_fit.json", "check": "plan.json"}  # each part's results file
SMOKE = [
    "bytes", "check", "--fit-images", "8", "16", "--cases=tiny", "--reps=1", "--workers=1",
    "--sample={imagenet}", "--out={tmp}/plan.json",
]  # fmt: skip

CASES = {
    # name: VQKDModelConfig overrides, images, seeds, images per shard
    "demo": ({"image_size": 96, "patch_size": 16, "width": 192, "depth": 4, "heads": 3,
              "codebook_size": 512, "decoder_depth": 1, "teacher_dim": 320}, 256, (0, 1), 32),
    "base": ({"image_size": 224, "patch_size": 16, "width": 768, "depth": 12, "heads": 12,
              "codebook_size": 8192, "decoder_depth": 1, "teacher_dim": 512}, 64, (0, 1), 16),
    "tiny": (TINY_VQKD, 16, (0, 1), 8),
}  # fmt: skip


def fit_bytes(image_counts: list[int]) -> dict:
    """Least-squares constants of tokenize_corpus.cost's byte model, from the real writer."""
    out: dict = {}
    for dist in ("uniform", "zipf"):
        pq_rows, pq_y, wds_rows, wds_y = [], [], [], []
        for codebook in (512, 8192):
            bits = float(np.log2(codebook))
            probs = None
            if dist == "zipf":
                weights = 1.0 / (np.arange(codebook) + 20.0)
                probs = weights / weights.sum()
            for n_tok in (36, 196):
                for images in image_counts:
                    for seeds in ((0,), (0, 1, 2, 3)):
                        rows = fake_rows(0, images, seeds, n_tok, codebook, probs)
                        k = len(seeds)
                        if k == 1:
                            pq_rows.append([1, images, images * n_tok, images * n_tok * bits])
                            pq_y.append(len(parquet_bytes(rows, 0, n_tok, {})))
                        views = images * k
                        wds_rows.append([1, images, views, views * n_tok, views * n_tok * bits])
                        wds_y.append(len(wds_bytes(rows)))
        out[dist] = {}
        for name, a, y, names in (
            ("parquet", pq_rows, pq_y, ("file", "row", "tok", "tok_bit")),
            ("webdataset", wds_rows, wds_y, ("file", "image", "view", "tok", "tok_bit")),
        ):
            a, y = np.array(a, float), np.array(y, float)
            coef, *_ = np.linalg.lstsq(a, y, rcond=None)
            err = float(np.abs(a @ coef / y - 1).max())
            out[dist][name] = {
                **dict(zip(names, map(float, coef), strict=True)),
                "max_rel_error": err,
            }
    return out


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _dataset_bytes(out_dir: Path) -> dict[str, int]:
    sizes = {"parquet": 0, "webdataset": 0, "receipts": 0}
    for path in out_dir.rglob("*"):
        if not path.is_file():
            continue
        top = path.relative_to(out_dir).parts[0]
        kind = {"parquet": "parquet", "wds": "webdataset"}.get(top)
        if kind is None and top not in ("config.yaml", "manifest.json", "README.md"):
            kind = "receipts"
        if kind:
            sizes[kind] += path.stat().st_size
    sizes["total"] = sum(sizes.values())
    return sizes


def _plan(keys: list[str]) -> dict:
    start = time.perf_counter()
    plan = make_plan(build_stage_config(PlanConfig, parse_overrides(keys)))
    plan["plan_seconds"] = time.perf_counter() - start
    print(format_plan(plan), flush=True)
    return plan


def _run(keys: list[str], out_dir: Path) -> dict:
    """The real stage 2 through the CLI (a fresh process, as a user runs it)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "stage=tokenize", *keys, f"out_dir={out_dir}"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"stage 2 failed:\n{done.stderr[-3000:]}")
    text = done.stdout
    summary = json.loads(text[text.index("{") : text.rindex("}") + 1])
    return {"wall_seconds": wall, "summary": summary, "bytes": _dataset_bytes(out_dir)}


def _error(planned: float, actual: float) -> float:
    return planned / actual - 1.0


def check(args: argparse.Namespace) -> dict:
    """Interleaved plan / real run per case; errors of time, bytes and memory."""
    sample = Path(args.sample or imagenet_sample_dir())
    files = sorted(sample.glob("*.JPEG"))
    work = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    report: dict = {"machine": os.uname().nodename, "cases": {}}
    try:
        for name in args.cases.split(","):
            shape, count, seeds, shard_size = CASES[name]
            shard_size = args.shard_size or shard_size
            count = args.images or count
            folder = work / f"{name}-images"
            folder.mkdir()
            for f in files[:count]:
                os.symlink(f, folder / f.name)
            torch.manual_seed(0)
            ckpt = work / f"{name}.pth"
            save_tokenizer(VQKD(VQKDModelConfig(**{**shape, "kmeans_iters": 0})), ckpt)
            keys = [
                f"images={folder}", f"tokenizer={ckpt}", f"seeds={list(seeds)}".replace(" ", ""),
                f"aug.size={shape['image_size']}", f"shard_size={shard_size}",
                f"cluster.n_workers={args.workers}", f"precision={args.precision}",
                "cluster.dashboard=false",
            ]  # fmt: skip
            case: dict = {"keys": keys, "uptime_before": _uptime(), "plans": [], "runs": []}
            case["plans"].append(_plan(keys))
            for rep in range(args.reps):
                case["runs"].append(_run(keys, work / f"{name}-tokens-{rep}"))
                print(json.dumps(case["runs"][-1]["summary"]), flush=True)
                case["plans"].append(_plan(keys))
            case["uptime_after"] = _uptime()
            case["errors"] = _errors(case)
            print(name, json.dumps(case["errors"], indent=1), flush=True)
            report["cases"][name] = case
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _errors(case: dict) -> dict:
    """Each run against the mean of the plans before and after it; medians over runs."""
    rows = []
    for i, run in enumerate(case["runs"]):
        around = case["plans"][i : i + 2]
        planned = statistics.mean(p["wall_seconds"]["total"] for p in around)
        tasks = statistics.mean(p["wall_seconds"]["tasks"] for p in around)
        memory = statistics.mean(p["worker_memory_bytes"] for p in around)
        s = run["summary"]
        rows.append({
            "wall_planned": planned, "wall_actual": run["wall_seconds"],
            "wall_error": _error(planned, run["wall_seconds"]),
            "fixed_actual": run["wall_seconds"] - s["run_seconds"],
            "tasks_planned": tasks, "tasks_actual": s["run_seconds"],
            "tasks_error": _error(tasks, s["run_seconds"]),
            "bytes_planned_upper": around[0]["bytes"]["total"],
            "bytes_planned_skewed": around[0]["bytes_skewed"]["total"],
            "bytes_actual": run["bytes"]["total"],
            "bytes_error_upper": _error(around[0]["bytes"]["total"], run["bytes"]["total"]),
            "bytes_error_skewed": _error(around[0]["bytes_skewed"]["total"], run["bytes"]["total"]),
            "memory_planned_mb": memory / 2**20,
            "memory_actual_mb": s.get("worker_peak_rss_mb"),
            "memory_error": _error(memory / 2**20, s["worker_peak_rss_mb"])
            if s.get("worker_peak_rss_mb") else None,
        })  # fmt: skip
    keys = [k for k in rows[0] if rows[0][k] is not None]
    return {"runs": rows, "median": {k: statistics.median(r[k] for r in rows) for k in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="*", help="bytes, check or both")
    parser.add_argument(
        "--fit-images", type=int, nargs="+", default=[64, 256], help="bytes: images per shard"
    )
    parser.add_argument("--cases", default="demo,base")
    parser.add_argument("--images", type=int, default=0, help="images per case (0 = its default)")
    parser.add_argument("--shard-size", type=int, default=0, help="0 = the case's default")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--sample", default="", help="ImageNet sample folder ($IMAGENET_SAMPLE)")
    parser.add_argument("--out", default="", help="default: each part's file in results/")
    args = smoke.parse_args(parser, SMOKE)
    if not args.what or set(args.what) - set(OUTPUTS):
        parser.error(f"what: one or both of {', '.join(OUTPUTS)}, not {args.what}")
    results = {w: fit_bytes(args.fit_images) if w == "bytes" else check(args) for w in args.what}
    if args.out:  # one file: the part's results, or a key per part when both ran
        outputs = {Path(args.out): results if len(results) > 1 else results[args.what[0]]}
    else:
        outputs = {RESULTS / OUTPUTS[w]: result for w, result in results.items()}
    for out, result in outputs.items():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(results.get("bytes", {}), indent=1), f"\nwrote {', '.join(map(str, outputs))}")


if __name__ == "__main__":
    main()
