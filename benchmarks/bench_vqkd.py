"""Stage 1 benchmarks: VQ-KD training throughput per encoder size, and the demo preset's figures.

(a) Throughput: one training step (teacher forward, encoder, quantiser, decoder + loss, backward +
AdamW) at 224 px / patch 16 with the tiny, small and base encoders on random pixels; the median
of ``--steps`` timed steps after one warm-up step. Reports images/s and the share of a step spent
in each phase. The teacher is the offline EfficientNet-Lite0 (the CLIP teacher's weights are not
available offline); pass ``--teacher`` / ``--teacher-weights`` to time another.

(b) ``--demo IMAGES``: ``pipeline run stage=vqkd preset=demo images=IMAGES`` end to end, reporting
codebook usage and reconstruction cosine on the evaluation pass, and wall time (``--demo-set
KEY=VALUE``: more stage keys).

    python benchmarks/bench_vqkd.py --sizes tiny small base
    python benchmarks/bench_vqkd.py --sizes none --demo "$IMAGENET_SAMPLE"

Writes JSON to stdout and to ``benchmarks/results/vqkd.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import smoke
import torch
import torch.nn.functional as F

from engine.config import build_config, parse_overrides
from tokenize_corpus.config import VQKDConfig
from tokenize_corpus.teachers import load_teacher
from tokenize_corpus.train import vqkd
from tokenize_corpus.vqkd import VQKD, VQKD_SIZES, VQKDModelConfig

PHASES = ("teacher", "encoder", "quantiser", "decoder", "backward_optimizer")
SMOKE = [
    "--sizes", "tiny", "--batch=2", "--steps=1", "--demo={imagenet}", "--demo-out={tmp}/demo",
    *(f"--demo-set={kv}" for kv in smoke.TINY["vqkd"]), "--demo-set=train.epochs=1",
    "--out={tmp}/vqkd.json",
]  # fmt: skip


def time_step(model: VQKD, teacher: Any, optimizer: torch.optim.Optimizer, views: torch.Tensor):
    """One training step split into phases (seconds per phase), as the training loop runs it."""
    times = {}
    tic = time.perf_counter()
    features = teacher(views)  # [B, N, Dt]
    times["teacher"] = time.perf_counter() - tic
    tic = time.perf_counter()
    z = model.embed(views)  # [B, N, code_dim]
    times["encoder"] = time.perf_counter() - tic
    tic = time.perf_counter()
    quantized, _, commit = model.quantize(z)
    times["quantiser"] = time.perf_counter() - tic
    tic = time.perf_counter()
    rec = model.decode(quantized)  # [B, N, Dt]
    loss = commit + (1 - F.cosine_similarity(rec, features, dim=-1)).mean()
    times["decoder"] = time.perf_counter() - tic
    tic = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    times["backward_optimizer"] = time.perf_counter() - tic
    return times


def throughput(size: str, batch: int, steps: int, teacher_name: str, weights: str | None) -> dict:
    """Median step time, images/s and phase shares for one encoder size."""
    torch.manual_seed(0)
    teacher = load_teacher(teacher_name, weights, grid=(14, 14))
    cfg = VQKDModelConfig(teacher_dim=teacher.dim, **VQKD_SIZES[size])
    model = VQKD(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99))
    views = torch.rand(batch, 3, cfg.image_size, cfg.image_size)
    time_step(model, teacher, optimizer, views)  # warm-up (and the k-means initialisation)
    runs = [time_step(model, teacher, optimizer, views) for _ in range(steps)]
    totals = [sum(r.values()) for r in runs]
    median = statistics.median(totals)
    phase = {p: statistics.median(r[p] for r in runs) for p in PHASES}
    return {
        "size": size,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "width": cfg.width,
        "depth": cfg.depth,
        "decoder_depth": cfg.decoder_depth,
        "codebook": [cfg.codebook_size, cfg.code_dim],
        "teacher": teacher_name,
        "batch": batch,
        "steps_timed": steps,
        "median_step_s": round(median, 4),
        "images_per_s": round(batch / median, 2),
        "phase_median_s": {p: round(v, 4) for p, v in phase.items()},
        "phase_share": {p: round(v / sum(phase.values()), 3) for p, v in phase.items()},
    }


def demo(images: str, out_dir: str | None, keys: list[str]) -> dict:
    """The demo preset (plus ``keys``, KEY=VALUE) end to end on ``images``."""
    out = out_dir or tempfile.mkdtemp(prefix="bench-vqkd-demo-")
    paths = {"images": images, "out_dir": out}
    cfg = build_config(VQKDConfig, VQKDConfig.presets["demo"], parse_overrides(keys), paths)
    tic = time.perf_counter()
    summary = vqkd(cfg)
    return {
        "images": images,
        "out_dir": out,
        "wall_s": round(time.perf_counter() - tic, 1),
        "codebook_usage_fraction": summary["codebook_usage_fraction"],
        "perplexity": summary["perplexity"],
        "rec_cosine": summary["rec_cosine"],
        "codebook_size": cfg.model.codebook_size,
        "epochs": cfg.train.epochs,
        "steps": summary["steps"],
        "train_images": summary["train_images"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small", "base"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--teacher", default="efficientnet_lite0")
    parser.add_argument("--teacher-weights", default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--demo", default=None, help="image source for the demo-preset run")
    parser.add_argument("--demo-out", default=None)
    parser.add_argument(
        "--demo-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a stage key for the demo run, e.g. --demo-set train.epochs=2",
    )
    parser.add_argument("--out", default="benchmarks/results/vqkd.json")
    args = smoke.parse_args(parser, SMOKE)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "throughput": [],
    }
    for size in args.sizes:
        if size == "none":
            continue
        results["throughput"].append(
            throughput(size, args.batch, args.steps, args.teacher, args.teacher_weights)
        )
        print(json.dumps(results["throughput"][-1]), flush=True)
    if args.demo:
        results["demo"] = demo(args.demo, args.demo_out, args.demo_set)
    text = json.dumps(results, indent=2)
    print(text)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


if __name__ == "__main__":
    main()
