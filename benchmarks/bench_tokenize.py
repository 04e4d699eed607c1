"""Benchmark stage 2: views/s per worker at each precision end to end through Dask and
forward-only, 2 vs 1 workers, bytes per token, worker peak memory as the corpus grows 8x, rerun
time (BENCHMARKS.md, "Stage 2: tokenizing on Dask" and "Stage 2 throughput by precision").

    .venv/bin/python benchmarks/bench_tokenize.py                      # full: 1000 images, ViT-B/16
    .venv/bin/python benchmarks/bench_tokenize.py --images 32 --shard-size 8 --mem-shards 1
    .venv/bin/python benchmarks/bench_tokenize.py --precisions auto,fp32 --skip-memory

Precisions are measured interleaved in one run (forward-only for each, then the 1-worker job for
each, then forward-only again), so their ratio is not skewed by a shared machine's drift; the
first precision listed is the one the 2-worker run and the rerun use. Forward-only times
``Tokenizer.encode`` and, as the bar it should reach, timm's plain ViT of the encoder's shape
(``--model base``: ``vit_base_patch16_224``, random weights) under the same autocast, thread
count, batch and image size: one batch of each per precision in turn, the orders alternating
from batch to batch, medians over both slots, and their ratio per precision.

The ImageNet sample is packed into WebDataset shards with ``shards.pack`` (the first ``--images``
files, linked into a scratch folder). The tokenizer has random weights (speed does not depend on
them): ``--model base`` is the ViT-B/16 VQ-KD at 224 with 8192 codes. Forward-only throughput is
measured in this process with the same torch thread count as one worker
(``cluster.threads_per_worker``) at the same batch size, so the ratio compares like with like.
Prints a JSON and writes ``benchmarks/results/tokenize.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import smoke
import timm
import torch
from torch import nn

from engine.layout import imagenet_sample_dir
from engine.precision import autocast, resolve_precision
from shards.pack import PackConfig, pack
from shards.views import AugConfig
from tokenize_corpus.config import ClusterConfig, TokenizeConfig
from tokenize_corpus.job import tokenize
from tokenize_corpus.tokenizer import Tokenizer, load_tokenizer, save_tokenizer
from tokenize_corpus.vqkd import VQKD, VQKD_SIZES, VQKDModelConfig

DEFAULT_SAMPLE = imagenet_sample_dir()  # $IMAGENET_SAMPLE, see engine/layout.py
RESULTS = Path(__file__).resolve().parent / "results" / "tokenize.json"
SMOKE = [
    "--sample={imagenet}", "--images=16", "--shard-size=8", "--seeds=2", "--batch-size=16",
    "--model=tiny", "--image-size=32", "--forward-batches=1", "--precisions=auto",
    "--mem-shards=1", "--out={tmp}/tokenize.json",
]  # fmt: skip


def bare_vit(tokenizer: Tokenizer) -> nn.Module:
    """timm's plain ViT with the tokenizer encoder's shape, random weights.

    For the base tokenizer the overrides are timm's own values: ``vit_base_patch16_224`` as is.
    """
    c = tokenizer.config
    return timm.create_model(
        "vit_base_patch16_224", pretrained=False, img_size=c.image_size,
        patch_size=c.patch_size, embed_dim=c.width, depth=c.depth, num_heads=c.heads,
    ).eval()  # fmt: skip


def forward_only(tokenizer_path: str, args: argparse.Namespace) -> dict[str, dict[str, list]]:
    """Views/s of single batches of ``Tokenizer.encode`` and of :func:`bare_vit` on random pixels.

    ``--forward-batches`` rounds; in each, every precision in turn times one batch of each
    model, the order of precisions and of the two models flipping every round (one warm-up
    batch of each first, not timed). Returns ``{precision: {"encode": [...], "bare": [...],
    "encode_cpu": [...], "bare_cpu": [...]}}``; ``_cpu`` counts the thread's CPU time instead of
    the wall clock: with one torch thread the forward runs on this thread, and its CPU time
    leaves out the time other processes on a shared machine held the core.
    """
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(tokenizer_path)
    bare = bare_vit(tokenizer)
    size = tokenizer.image_size
    pixels = torch.rand(args.batch_size, 3, size, size)  # [B, 3, S, S]

    def run_bare(precision: str) -> None:
        with autocast(precision, "cpu"):
            bare(pixels)

    runs = {"encode": lambda p: tokenizer.encode(pixels, precision=p), "bare": run_bare}
    precisions = list(zip(args.precisions, [resolved(p) for p in args.precisions], strict=True))
    views = {p: {k: [] for name in runs for k in (name, f"{name}_cpu")} for p in args.precisions}
    with torch.inference_mode():
        for _, p in precisions:
            for run_one in runs.values():
                run_one(p)
        for r in range(args.forward_batches):
            flip = -1 if r % 2 else 1
            for requested, p in precisions[::flip]:
                for name, run_one in list(runs.items())[::flip]:
                    start, cpu = time.perf_counter(), time.thread_time()
                    run_one(p)
                    views[requested][name].append(args.batch_size / (time.perf_counter() - start))
                    views[requested][f"{name}_cpu"].append(
                        args.batch_size / (time.thread_time() - cpu)
                    )
    return views


def pack_sample(sample: Path, count: int, shard_size: int, out: Path) -> str:
    """Pack the first ``count`` sample images into tars of ``shard_size``; return the tar glob."""
    files = sorted(sample.glob("*.JPEG"))[:count]
    if len(files) < count:
        raise SystemExit(f"--images {count}: only {len(files)} images in {sample}")
    folder = out / "flat"
    folder.mkdir(parents=True)
    for f in files:
        os.symlink(f, folder / f.name)
    shards = out / "shards"
    summary = pack(PackConfig(images=str(folder), out_dir=str(shards), shard_size=shard_size))
    if summary.get("exit_code"):
        raise SystemExit(f"packing failed: {summary}")
    return str(shards / "*.tar")


def repeat_shards(pattern: str, times: int, out: Path) -> str:
    """A corpus with ``times`` x the shard count (copies of the same tars): 8x corpus growth."""
    out.mkdir(parents=True)
    tars = sorted(Path(pattern).parent.glob("*.tar"))
    for t in range(times):
        for i, tar in enumerate(tars):
            os.symlink(tar, out / f"shard-{t * len(tars) + i:06d}.tar")
    return str(out / "*.tar")


def make_tokenizer(model: str, image_size: int, path: Path) -> str:
    torch.manual_seed(0)
    # patch 16, 8192 codes
    config = VQKDModelConfig(**VQKD_SIZES[model], image_size=image_size, kmeans_iters=0)
    vqkd = VQKD(config).eval()
    with torch.no_grad():  # a random unit-norm codebook: a zero one would map every patch to 0
        codebook = torch.nn.functional.normalize(torch.randn_like(vqkd.quantize.codebook), dim=-1)
        vqkd.quantize.codebook.copy_(codebook)
    return save_tokenizer(vqkd, path)


def run(
    images: str,
    tokenizer: str,
    out: Path,
    args: argparse.Namespace,
    workers: int,
    precision: str = "fp32",
) -> dict:
    cfg = TokenizeConfig(
        images=images,
        tokenizer=tokenizer,
        out_dir=str(out),
        seeds=tuple(range(args.seeds)),
        aug=AugConfig(size=args.image_size),
        batch_size=args.batch_size,
        precision=precision,
        cluster=ClusterConfig(n_workers=workers, threads_per_worker=args.threads, dashboard=False),
    )
    start = time.perf_counter()
    summary = tokenize(cfg)
    summary["wall_seconds"] = time.perf_counter() - start
    if summary["exit_code"]:
        raise SystemExit(f"tokenize failed: {summary}")
    return summary


def resolved(precision: str) -> str:
    return resolve_precision(precision, "cpu")


def precision_runs(images: str, tokenizer: str, scratch: Path, args: argparse.Namespace) -> dict:
    """Forward-only and the 1-worker job at every precision, interleaved (see the docstring)."""
    precisions = args.precisions
    before = forward_only(tokenizer, args)
    jobs = {p: run(images, tokenizer, scratch / f"tokens1-{p}", args, 1, p) for p in precisions}
    after = forward_only(tokenizer, args)
    out = {}
    for p in precisions:
        one = jobs[p]
        samples = {k: before[p][k] + after[p][k] for k in before[p]}
        medians = {k: statistics.median(v) for k, v in samples.items()}
        forward, bare_median = medians["encode"], medians["bare"]
        # End to end per worker: views over the summed task time of one worker (tokenizer load
        # included), against forward-only at the same batch size, threads and precision.
        e2e = one["views_this_run"] / one["task_seconds"]
        encode_phase = one["views_this_run"] / one["encode_seconds"]
        out[p] = {
            "resolved": one["precision"],
            "forward_only_views_per_s": round(forward, 2),
            "forward_only_before_after": [
                round(statistics.median(v[p]["encode"]), 2) for v in (before, after)
            ],
            "bare_vit_views_per_s": round(bare_median, 2),
            "forward_only_over_bare_vit": round(forward / bare_median, 3),
            "forward_only_over_bare_vit_cpu_time": round(
                medians["encode_cpu"] / medians["bare_cpu"], 3
            ),
            "forward_only_and_bare_vit_samples": {
                k: [round(x, 3) for x in v] for k, v in samples.items()
            },
            "encode_phase_views_per_s_1_worker": round(encode_phase, 2),
            "encode_phase_over_bare_vit": round(encode_phase / bare_median, 3),
            "end_to_end_views_per_s_1_worker": round(e2e, 2),
            "end_to_end_over_forward_only": round(e2e / forward, 3),
            "end_to_end_views_per_s_1_worker_wall": round(
                one["views_this_run"] / one["run_seconds"], 2
            ),
            "forward_share_of_task_time": round(one["encode_seconds"] / one["task_seconds"], 3),
            "run_seconds_1_worker": one["run_seconds"],
            "wall_seconds_1_worker": round(one["wall_seconds"], 2),
            "worker_peak_rss_mb_1_worker": one["worker_peak_rss_mb"],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE)
    parser.add_argument("--images", type=int, default=1000, help="images of the sample to use")
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=4, help="K views per image")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--model", default="base", choices=["tiny", "small", "base"])
    parser.add_argument("--image-size", type=int, default=224, help="the tokenizer's and views'")
    parser.add_argument(
        "--forward-batches", type=int, default=3,
        help="timed batches of encode and of the bare ViT per precision, before and after the jobs",
    )  # fmt: skip
    parser.add_argument(
        "--precisions", type=lambda s: s.split(","), default=["auto", "fp32"],
        help="comma list; the first is used for the 2-worker run and the rerun",
    )  # fmt: skip
    parser.add_argument(
        "--scaling-repeats", type=int, default=1,
        help="1-worker / 2-worker pairs at the first precision, interleaved (median ratio)",
    )  # fmt: skip
    parser.add_argument("--mem-shards", type=int, default=2, help="shards of the 1x memory corpus")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = smoke.parse_args(parser, SMOKE)
    logging.basicConfig(level=logging.WARNING)

    scratch = Path(tempfile.mkdtemp(prefix="bench_tokenize_"))
    main_precision = args.precisions[0]
    try:
        images = pack_sample(args.sample, args.images, args.shard_size, scratch / "sample")
        tokenizer = make_tokenizer(args.model, args.image_size, scratch / "tokenizer.pth")
        per_precision = precision_runs(images, tokenizer, scratch, args)
        first = scratch / f"tokens1-{main_precision}"
        rerun = run(images, tokenizer, first, args, 1, main_precision)
        one = per_precision[main_precision]
        ones, twos = [one["run_seconds_1_worker"]], []
        for r in range(args.scaling_repeats):
            if r:  # the first pair's 1-worker run is the precision run above
                ones.append(
                    run(images, tokenizer, scratch / f"s1-{r}", args, 1, main_precision)[
                        "run_seconds"
                    ]
                )
            two = run(images, tokenizer, scratch / f"tokens2-{r}", args, 2, main_precision)
            twos.append(two["run_seconds"])
        pairs = [round(a / b, 3) for a, b in zip(ones, twos, strict=True)]
        manifest = json.loads((first / "manifest.json").read_text())
        result = {
            "config": {**vars(args), "sample": str(args.sample), "out": str(args.out)},
            "bare_vit": "timm vit_base_patch16_224 with the tokenizer encoder's shape",
            "views": rerun["views"],
            "precisions": per_precision,
            "run_seconds_1_worker_pairs": ones,
            "run_seconds_2_workers_pairs": twos,
            "speedup_2_workers_pairs": pairs,
            "speedup_2_workers": round(statistics.median(pairs), 3),
            "run_seconds_2_workers": two["run_seconds"],
            "wall_seconds_2_workers": round(two["wall_seconds"], 2),
            "bytes_per_token": manifest["totals"]["bytes_per_token"],
            "rerun_seconds": round(rerun["wall_seconds"], 3),
            "rerun_over_first_run": round(rerun["wall_seconds"] / one["wall_seconds_1_worker"], 4),
        }
        if "fp32" in per_precision and main_precision != "fp32":
            result[f"{main_precision}_over_fp32_end_to_end"] = round(
                one["end_to_end_views_per_s_1_worker"]
                / per_precision["fp32"]["end_to_end_views_per_s_1_worker"],
                3,
            )
        if not args.skip_memory:
            base_tars = sorted(Path(images).parent.glob("*.tar"))[: args.mem_shards]
            small = scratch / "mem_small"
            small.mkdir()
            for i, tar in enumerate(base_tars):
                os.symlink(tar.resolve(), small / f"shard-{i:06d}.tar")
            grown = repeat_shards(str(small / "*.tar"), 8, scratch / "mem8")
            m1 = run(
                str(small / "*.tar"), tokenizer, scratch / "tokens_m1", args, 1, main_precision
            )
            m8 = run(grown, tokenizer, scratch / "tokens_m8", args, 1, main_precision)
            result.update(
                worker_peak_rss_mb_corpus_1x=m1["worker_peak_rss_mb"],
                worker_peak_rss_mb_corpus_8x=m8["worker_peak_rss_mb"],
                peak_rss_growth_8x=round(
                    m8["worker_peak_rss_mb"] / m1["worker_peak_rss_mb"] - 1, 4
                ),
                memory_shards=[args.mem_shards, 8 * args.mem_shards],
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
