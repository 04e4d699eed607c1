"""Stage 3 benchmarks: MIM step throughput offline vs online, and loader throughput.

1. Step throughput. One student and one tokenizer (random weights: speed does not depend on
   them), one batch, measured in one run:
     t_step  offline step: stored tokens from the batch -> forward, MIM loss, backward, AdamW
     t_tok   tokenizer forward on the same views
     t_online  online step: tokenizer forward + the same step (the reference's way)
   ceiling = (t_tok + t_step) / t_step is the best speed-up offline targets can give;
   achieved = t_online / t_step_offline; fraction = achieved / ceiling (target >= 0.97).
2. Loader throughput (samples/s): images + tokens + view rebuild + mask (pretrain.data) vs an
   image-only loader (decode + torchvision RandomResizedCrop + flip, same size and workers).
   Uses --images/--tokens when given, else builds a token dataset with random tokens over the
   first --images-limit images of the ImageNet sample (symlinked into a temp dir).

    .venv/bin/python benchmarks/bench_pretrain.py --pairs base:base,small:tiny --batch 8 --steps 3

Prints JSON and writes benchmarks/results/pretrain.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import smoke
import torch
from synthetic import random_token_dataset
from torchvision import transforms

from engine.layout import imagenet_sample_dir
from engine.optim import adamw, param_groups
from engine.precision import autocast, resolve_precision
from pretrain.data import MIMDataset
from pretrain.masking import block_mask, num_masked_for
from pretrain.model import BEiTv2, beit_config, mim_loss
from shards.decode import BadImage, decode_image
from shards.images import iter_shard, list_shards
from shards.reader import open_token_dataset
from shards.views import IMAGENET_MEAN, IMAGENET_STD, AugConfig, normalize, to_unit
from tokenize_corpus.tokenizer import Tokenizer
from tokenize_corpus.vqkd import VQKD, VQKD_SIZES, VQKDModelConfig

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = imagenet_sample_dir()  # $IMAGENET_SAMPLE, see engine/layout.py
SMOKE = [
    "--pairs=tiny:tiny", "--batch=2", "--steps=1", "--image-size=32", "--images={imagenet}",
    "--shard-size=8", "--workers=1", "--out={tmp}/pretrain.json",
]  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, steps: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def bench_step(student: str, tokenizer_size: str, args: argparse.Namespace) -> dict:
    """Offline vs online MIM step for one (student, tokenizer) size pair."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    tok_cfg = VQKDModelConfig(
        image_size=args.image_size, patch_size=16, kmeans_iters=0, **VQKD_SIZES[tokenizer_size]
    )
    tokenizer = Tokenizer(VQKD(tok_cfg)).to(device)
    cfg = beit_config(
        student, image_size=args.image_size, patch_size=16, vocab_size=tok_cfg.codebook_size
    )
    model = BEiTv2(cfg).to(device).train()
    optimizer = adamw(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.98), device=device)
    precision = resolve_precision(args.precision, device)

    batch = args.batch
    views_uint8 = torch.randint(
        0, 256, (batch, 3, args.image_size, args.image_size), dtype=torch.uint8
    )
    views = normalize(to_unit(views_uint8), IMAGENET_MEAN, IMAGENET_STD).to(device)
    views_uint8 = views_uint8.to(device)
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(
        np.stack([block_mask(cfg.grid, num_masked_for(cfg.grid), rng) for _ in range(batch)])
    ).to(device)
    # What the loader hands over offline: the stored tokens (uint16 on disk -> int64 tensor).
    stored = torch.randint(0, tok_cfg.codebook_size, (batch, cfg.num_patches)).to(device)

    def tokenize() -> torch.Tensor:
        # as targets=online: the tokenizer at the token dataset's precision (here the student's)
        return tokenizer.encode(to_unit(views_uint8), precision=precision)  # [B, N]

    def step(targets: torch.Tensor) -> None:
        with autocast(precision, device):
            result = mim_loss(model(views, masks), targets[masks])
        optimizer.zero_grad(set_to_none=True)
        result["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        optimizer.step()

    # Interleave the three measurements so drifting machine load hits them alike.
    t_step, t_tok, t_online = [], [], []
    for fn in (lambda: step(stored), tokenize, lambda: step(tokenize())):
        _timed(fn, 0, args.warmup, device)
    for _ in range(args.steps):
        t_step += _timed(lambda: step(stored), 1, 0, device)
        t_tok += _timed(tokenize, 1, 0, device)
        t_online += _timed(lambda: step(tokenize()), 1, 0, device)
    med = {
        k: statistics.median(v) for k, v in (("step", t_step), ("tok", t_tok), ("online", t_online))
    }
    ceiling = (med["tok"] + med["step"]) / med["step"]
    achieved = med["online"] / med["step"]
    return {
        "student": student,
        "tokenizer": tokenizer_size,
        "batch": batch,
        "image_size": args.image_size,
        "device": str(device),
        "precision": precision,
        "steps": args.steps,
        "t_step_offline_s": med["step"],
        "t_tokenizer_forward_s": med["tok"],
        "t_step_online_s": med["online"],
        "ceiling": ceiling,
        "achieved": achieved,
        "fraction_of_ceiling": achieved / ceiling,
        "offline_samples_per_s": batch / med["step"],
        "online_samples_per_s": batch / med["online"],
    }


# ---------------------------------------------------------------- loader throughput


class ImageOnlyDataset(torch.utils.data.IterableDataset):
    """The baseline: decode + RandomResizedCrop + flip (+ normalise), same shards and workers."""

    def __init__(self, images: str, shard_size: int, size: int) -> None:
        self.shards = list_shards(images, shard_size=shard_size)
        self.size = size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        transform = transforms.Compose(
            [
                transforms.RandomResizedCrop(
                    self.size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC
                ),
                transforms.RandomHorizontalFlip(),
                transforms.PILToTensor(),
            ]
        )
        for shard in self.shards[worker::workers]:
            for record in iter_shard(shard):
                try:
                    image = decode_image(record.data)
                except BadImage:
                    continue
                view = transform(image)  # uint8 [3, H, W]
                yield normalize(to_unit(view), IMAGENET_MEAN, IMAGENET_STD)


def build_random_tokens(images: str, out: Path, size: int, shard_size: int, jitter: bool) -> str:
    """A token dataset over ``images`` with sampled views (colour jitter or not) and random
    tokens (loader speed does not depend on token values)."""
    aug = AugConfig(size=size, jitter=(0.4, 0.4, 0.4) if jitter else ())
    grid = size // 16
    tokenizer = {"codebook_size": 8192, "grid": [grid, grid], "image_size": size, "patch_size": 16}
    random_token_dataset(images, out, shard_size, (0, 1, 2, 3), aug, tokenizer, ("webdataset",))
    return str(out)


def _loader_rate(dataset, batch: int, workers: int) -> tuple[float, int]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers)
    it = iter(loader)
    next(it)  # start-up (worker spawn, first shard open) is not throughput
    count, start = 0, time.perf_counter()
    for item in it:
        count += len(item["view"]) if isinstance(item, dict) else len(item)
    return count / max(time.perf_counter() - start, 1e-9), count


def bench_loader(args: argparse.Namespace, tmp: Path) -> list[dict]:
    size = args.image_size
    results = []
    images = args.images
    if not images:
        files = sorted(SAMPLE.glob("*.JPEG"))[: args.images_limit]
        if not files:
            return [{"skipped": f"no --images and no ImageNet sample at {SAMPLE}"}]
        folder = tmp / "images"
        folder.mkdir()
        for f in files:
            os.symlink(f, folder / f.name)
        images = str(folder)
    variants = []
    if args.tokens:
        variants.append(("given token dataset", args.tokens))
    else:
        for jitter in (True, False):
            out = tmp / f"tokens-jitter{int(jitter)}"
            variants.append(
                (
                    f"random tokens, views with jitter={jitter}",
                    build_random_tokens(images, out, size, args.shard_size, jitter),
                )
            )
    for _ in range(args.loader_rounds):
        base, n = _loader_rate(
            ImageOnlyDataset(images, args.shard_size, size), args.batch, args.workers
        )
        for name, tokens_dir in variants:
            tokens = open_token_dataset(tokens_dir)
            grid = tokens.grid or (size // 16, size // 16)
            ds = MIMDataset(
                images,
                tokens,
                vocab_size=tokens.codebook_size,
                grid=grid,
                image_size=size,
                num_masked=num_masked_for(grid),
                shard_size=args.shard_size,
                shuffle_buffer=64,
            )
            rate, count = _loader_rate(ds, args.batch, args.workers)
            results.append(
                {
                    "variant": name,
                    "image_size": size,
                    "workers": args.workers,
                    "batch": args.batch,
                    "samples": count,
                    "mim_loader_samples_per_s": rate,
                    "image_only_samples_per_s": base,
                    "ratio": rate / base,
                }
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", default="base:base,small:tiny", help="student:tokenizer sizes")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision",
        default="fp32",
        help="train.precision of student and tokenizer (auto|fp32|bf16)",
    )
    parser.add_argument("--images", default="", help="image source (default: ImageNet sample)")
    parser.add_argument("--tokens", default="", help="token dataset for --images")
    parser.add_argument("--images-limit", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--loader-rounds", type=int, default=1)
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--skip-loader", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pretrain.json"))
    args = smoke.parse_args(parser, SMOKE)

    report: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if not args.skip_step:
        report["step"] = [
            bench_step(*pair.split(":"), args) for pair in args.pairs.split(",") if pair
        ]
    if not args.skip_loader:
        with tempfile.TemporaryDirectory() as tmp:
            report["loader"] = bench_loader(args, Path(tmp))
    text = json.dumps(report, indent=2)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
