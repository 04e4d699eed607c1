"""Does half precision move what pretraining learns?

The demo-sized pipeline of ``bench_seeds.py`` (same images, tokenizer, student and epochs) run
twice per run seed, interleaved: everything in fp32 (tokens tokenized at ``precision=fp32``, the
student at ``train.precision=fp32``) and everything at bf16 (tokens and student at bf16, what
``auto`` picks on this CPU). Held-out MIM top-1 uses each run's own held-out tokens (seed 100 at
the same precision); the linear probe is as in ``bench_seeds.py``.

    .venv/bin/python benchmarks/bench_precision_training.py --tokenizer <demo tokenizer.pth> \
        [--images 250] [--epochs 8] [--seeds 0 1 2] [--work-dir /tmp/bench_precision_training]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smoke  # noqa: E402
from bench_learning_signal import add_set_argument  # noqa: E402
from bench_seeds import (  # noqa: E402
    METRICS,
    print_table,
    score_student,
    study_start,
    tokenize_study,
)

from engine.layout import imagenet_sample_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE = [
    "--tokenizer={tokenizer}", "--sample={imagenet}", "--images=16", "--epochs=1", "--seeds=0",
    "--probe-steps=5", "--work-dir={tmp}/work", "--out={tmp}/precision_training.json",
    *smoke.TINY_STAGES,
]  # fmt: skip
log = logging.getLogger("bench_precision_training")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--sample", type=Path, default=imagenet_sample_dir())
    parser.add_argument("--images", type=int, default=250)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--probe-steps", type=int, default=300)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bench_precision_training"))
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/precision_training.json"
    )
    add_set_argument(parser)
    args = smoke.parse_args(parser, SMOKE, argv)
    work, shards = study_start(args)
    tokenizer = str(args.tokenizer.resolve())
    results: dict[str, dict[str, list[float]]] = {}
    for precision in ("fp32", "bf16"):
        tokens, heldout = work / f"tokens-{precision}", work / f"heldout-{precision}"
        tokenize_study(shards, tokenizer, [0, 1, 2, 3], tokens, heldout, precision=precision)
        results[precision] = {m: [] for m in METRICS}
    for seed in args.seeds:
        for precision in ("fp32", "bf16"):  # interleaved within each run seed
            pretrain = {"tokens": str(work / f"tokens-{precision}"),
                        "train": {"precision": precision}}  # fmt: skip
            heldout = str(work / f"heldout-{precision}")
            scores = score_student(
                work, precision, seed, shards, heldout, pretrain, args, {"precision": precision}
            )
            for metric, value in scores.items():
                results[precision][metric].append(value)
    print_table("precision", results)
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
              "load_after": os.getloadavg()}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
