"""Two tokenizers over one set of views: what a token set costs, and which tokenizer wins.

On a class-spread subset of the ImageNet sample, tokenizer A makes the dataset (seeds 0..K-1) and
tokenizer B is added as the token set ``b`` (same views); B is also run alone into its own
directory, so the cost of the set over a plain stage-2 run (the row-by-row view comparison) is
measured in the same run. Then the same tiny student is pretrained on each set, 3 run seeds:

* stage 2: wall time of A's dataset; of B's token set and of B alone (alternated, medians of
  ``--repeats``); ``compare_views`` alone; ``pipeline validate`` of B alone and of the dataset
  with its set (medians of ``--timing-repeats``); bytes per token of each set;
* tokens: codebook usage and token entropy of each set (``shards.inspect``);
* stage 3: MIM top-1 on held-out views (seed 100, each tokenizer's own targets) and the linear
  probe (coarse ImageNet groups) with their run-seed spread, and pretraining wall time.

Held-out MIM accuracy is a property of each tokenizer's targets (fewer codes in use are easier to
predict), so it does not rank tokenizers; the probe does. Results: a table on stdout and
``benchmarks/results/token_sets.json``.

    .venv/bin/python benchmarks/bench_token_sets.py --tokenizer-a <a.pth> --tokenizer-b <b.pth> \
        [--images 250] [--epochs 8] [--seeds 0 1 2] [--work-dir /tmp/bench_token_sets]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smoke  # noqa: E402
from bench_learning_signal import add_set_argument, run_stage  # noqa: E402
from bench_seeds import (  # noqa: E402
    HELD_OUT_SEED,
    METRICS,
    own_command,
    print_table,
    score_student,
    study_start,
)

from engine.layout import imagenet_sample_dir  # noqa: E402
from shards.inspect import summary, token_counts
from shards.reader import open_token_dataset
from shards.token_sets import compare_views, resolve
from shards.validate import validate
from tokenize_corpus.tokenizer import tokenizer_info

ROOT = Path(__file__).resolve().parents[1]
SMOKE = [
    "--tokenizer-a={tokenizer}", "--tokenizer-b={tokenizer_b}", "--sample={imagenet}",
    "--images=16", "--k=2", "--epochs=1", "--seeds=0", "--probe-steps=5", "--repeats=1",
    "--timing-repeats=1", "--work-dir={tmp}/work", "--out={tmp}/token_sets.json",
    *smoke.TINY_STAGES,
]  # fmt: skip
log = logging.getLogger("bench_token_sets")


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def stage2(work: Path, shards: str, args: argparse.Namespace) -> dict:
    """A's dataset, B's token set, B alone, the held-out views; their timings and sizes."""
    a, b = str(args.tokenizer_a.resolve()), str(args.tokenizer_b.resolve())
    size = int(tokenizer_info(a)["image_size"])
    common = {
        "preset": "demo",
        "images": shards,
        "aug": {"size": size},
        "seeds": list(range(args.k)),
    }
    for name in ("tokens", "b_alone", "heldout"):
        shutil.rmtree(work / name, ignore_errors=True)  # every run measured from scratch
    dataset = str(work / "tokens")
    seconds = {
        "dataset_a": timed(run_stage, "tokenize", {**common, "tokenizer": a, "out_dir": dataset}),
    }
    named_dir = work / "tokens" / "token_sets" / "b"
    runs: dict[str, list[float]] = {"token_set_b": [], "b_alone": []}
    for _ in range(args.repeats):  # alternated, each from scratch
        shutil.rmtree(named_dir, ignore_errors=True)
        shutil.rmtree(work / "b_alone", ignore_errors=True)
        runs["token_set_b"].append(timed(
            run_stage, "tokenize", {**common, "tokenizer": b, "out_dir": dataset, "token_set": "b"}
        ))  # fmt: skip
        runs["b_alone"].append(timed(
            run_stage, "tokenize", {**common, "tokenizer": b, "out_dir": str(work / "b_alone")}
        ))  # fmt: skip
    default, named = resolve(dataset).open(), resolve(dataset, "b").open()
    timings = range(args.timing_repeats)
    runs["compare_views"] = [timed(compare_views, default, named) for _ in timings]
    runs["validate_default_alone"] = [timed(validate, str(work / "b_alone")) for _ in timings]
    runs["validate_with_set"] = [timed(validate, dataset) for _ in timings]
    seconds.update({k: statistics.median(v) for k, v in runs.items()})
    held = {**common, "seeds": [HELD_OUT_SEED], "out_dir": str(work / "heldout")}
    run_stage("tokenize", {**held, "tokenizer": a})
    run_stage("tokenize", {**held, "tokenizer": b, "token_set": "b"})
    tokens = {}
    for name, ds in (("a", default), ("b", named)):
        facts = summary(ds, token_counts(ds))
        tokens[name] = {
            "fingerprint": ds.fingerprint,
            "codebook_usage_fraction": facts["codebook_usage_fraction"],
            "token_entropy_bits": facts["token_entropy_bits"],
            "bytes_per_token": facts["bytes_per_token"],
        }
    assert (
        open_token_dataset(str(work / "heldout" / "token_sets" / "b")).fingerprint
        == named.fingerprint
    )
    raw = {k: [round(x, 3) for x in v] for k, v in runs.items()}
    return {"seconds": {k: round(v, 3) for k, v in seconds.items()}, "raw": raw, "tokens": tokens}


def stage3(work: Path, shards: str, args: argparse.Namespace) -> dict:
    results = {name: {m: [] for m in METRICS} for name in "ab"}
    heldout = {"a": str(work / "heldout"), "b": str(work / "heldout" / "token_sets" / "b")}
    for seed in args.seeds:
        for name in "ab":  # interleaved: both tokenizers once per run seed
            pretrain = {"tokens": str(work / "tokens"), "token_set": "" if name == "a" else "b"}
            scores = score_student(work, name, seed, shards, heldout[name], pretrain, args)
            for metric, value in scores.items():
                results[name][metric].append(value)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer-a", type=Path, required=True)
    parser.add_argument("--tokenizer-b", type=Path, required=True)
    parser.add_argument("--sample", type=Path, default=imagenet_sample_dir())
    parser.add_argument("--images", type=int, default=250)
    parser.add_argument("--k", type=int, default=4, help="stored seeds per image")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--probe-steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3, help="stage-2 runs timed per variant")
    parser.add_argument(
        "--timing-repeats", type=int, default=5, help="compare_views and validate calls timed"
    )
    parser.add_argument("--skip-pretrain", action="store_true", help="stage-2 figures only")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bench_token_sets"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/token_sets.json")
    add_set_argument(parser)
    args = smoke.parse_args(parser, SMOKE, argv)
    work, shards = study_start(args)
    report = {
        "command": own_command(argv, __file__),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    report["stage2"] = stage2(work, shards, args)
    s = report["stage2"]["seconds"]
    print(f"\nstage 2, {args.images} images x {args.k} seeds (s): {json.dumps(s)}")
    print(f"token set b / b alone (medians of {args.repeats}): {s['token_set_b'] / s['b_alone']:.2f}x; "
          f"validate dataset+set / one dataset: {s['validate_with_set'] / s['validate_default_alone']:.2f}x")  # fmt: skip
    for name, facts in report["stage2"]["tokens"].items():
        print(f"tokenizer {name}: {json.dumps(facts)}")
    if not args.skip_pretrain:
        results = report["stage3"] = stage3(work, shards, args)
        print(f"\n{len(args.seeds)} run seeds, {args.epochs} epochs, K={args.k}")
        print_table("targets", results)
    report["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
