"""What half precision changes in the tokens: agreement with fp32, margins, speed.

For each tokenizer and each half precision (bf16; fp16 too where CPU autocast runs it) it encodes
the same views as fp32 does and reports:

- ``agree``: share of patches whose code equals the fp32 code;
- the fp32 top-2 margin (d_2nd - d_1st of squared distances to the unit codes) of the patches
  whose code differs, beside the same margin over all patches: a flip needs a near tie, since
  margin <= 2 |z32 - z_half| |c_i - c_j| (unit vectors), which is also checked on every flip;
- ``noise``: |z32 - z_half| of the normalised code vectors (median, max);
- encode views/s at batch 16, fp32 and bf16 interleaved (median of ``--reps``).

The encoder runs under autocast, the task layer and lookup in fp32 (``Tokenizer.encode``); the
first batch's tokens are checked against ``Tokenizer.encode(precision=...)`` so the figures are
those of the production code path. fp16 is called through ``torch.autocast`` directly, since
``precision=fp16`` is refused on CPU.

Views: the centre square of each image, resized to the tokenizer's size (PIL bicubic), [0, 1].

    python benchmarks/bench_precision_tokens.py --demo-tokenizer /tmp/h2_vqkd/tokenizer.pth
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import smoke
import torch
import torch.nn.functional as F
from PIL import Image
from synthetic import TINY_VQKD

from tokenize_corpus.tokenizer import Tokenizer, load_tokenizer
from tokenize_corpus.vqkd import VQKD, VQKDModelConfig

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = {"official": {}, "tiny": TINY_VQKD}  # VQKDModelConfig overrides
SMOKE = [
    "--images={imagenet}", "--demo-tokenizer={tokenizer}", "--demo-images=8", "--layout=tiny",
    "--official-images=8", "--batch=4", "--reps=1", "--out={tmp}/precision_tokens.json",
]  # fmt: skip


def load_views(folder: Path, size: int, limit: int) -> torch.Tensor:
    """[M, 3, size, size] float views in [0, 1] (centre square, bicubic resize)."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    views = []
    for path in files[:limit]:
        with Image.open(path) as im:
            im = im.convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
            views.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    return torch.stack(views).float() / 255.0


@torch.no_grad()
def vectors(tok: Tokenizer, x: torch.Tensor, precision: str) -> torch.Tensor:
    """Normalised fp32 code vectors [B*N, D] with the encoder at ``precision``."""
    dtype = DTYPES[precision]
    if dtype is None:
        z = tok.model.embed(x)
    else:
        with torch.autocast("cpu", dtype=dtype):
            z = tok.model.embed(x)
    return F.normalize(z.float(), dim=-1).reshape(-1, z.shape[-1])


def fp16_available() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    except RuntimeError:
        return False


def _summary(values: torch.Tensor) -> dict:
    if values.numel() == 0:
        return {"n": 0}
    q = torch.quantile(values.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {
        "n": int(values.numel()),
        "p10": q[0].item(),
        "median": q[1].item(),
        "p90": q[2].item(),
        "max": values.max().item(),
    }


def agreement(tok: Tokenizer, views: torch.Tensor, precisions: list[str], batch: int) -> dict:
    """Per precision: agreement with fp32, margins of flips vs all, encoder noise."""
    codebook = tok.model.quantize.codebook.float()  # [K, D]
    z32 = torch.cat([vectors(tok, b, "fp32") for b in views.split(batch)])
    dist = torch.cdist(z32, codebook).pow(2)  # [M, K] fp32 squared distances
    top2 = dist.topk(2, dim=1, largest=False).values
    margin_all = top2[:, 1] - top2[:, 0]
    ref = tok.model.tokens(z32.view(len(views), -1, z32.shape[-1])).flatten()
    first = tok.encode(views[:batch]).flatten()
    assert torch.equal(first, ref[: first.numel()]), "bench path != Tokenizer.encode"
    out = {"patches": int(ref.numel()), "margin_all": _summary(margin_all)}
    for precision in precisions:
        zh = torch.cat([vectors(tok, b, precision) for b in views.split(batch)])
        half = tok.model.tokens(zh.view(len(views), -1, zh.shape[-1])).flatten()
        if precision != "fp16":  # the production path gives the same tokens
            first = tok.encode(views[:batch], precision=precision).flatten()
            assert torch.equal(first, half[: first.numel()]), "bench path != Tokenizer.encode"
        noise = (z32 - zh).norm(dim=-1)
        flips = (ref != half).nonzero().flatten()
        i, j = ref[flips], half[flips]
        flip_margin = dist[flips, j] - dist[flips, i]
        bound = 2 * noise[flips] * (codebook[i] - codebook[j]).norm(dim=-1) + 1e-5
        out[precision] = {
            "agree": (ref == half).float().mean().item(),
            "flips": int(flips.numel()),
            "margin_of_flips": _summary(flip_margin),
            "flips_within_noise_bound": bool((flip_margin <= bound).all()),
            "noise": _summary(noise),
        }
    return out


def speed(tok: Tokenizer, views: torch.Tensor, batch: int, reps: int) -> dict:
    """Encode views/s at ``batch``, fp32 and bf16 interleaved; medians and the ratio."""
    x = views[:batch]
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for p in times:  # warm-up
        tok.encode(x, precision=p)
    for _ in range(reps):
        for p in times:
            start = time.perf_counter()
            tok.encode(x, precision=p)
            times[p].append(time.perf_counter() - start)
    med = {p: batch / statistics.median(t) for p, t in times.items()}
    return {"views_per_s": med, "bf16_over_fp32": med["bf16"] / med["fp32"], "reps": reps}


def official_layout(layout: str = "official", seed: int = 0) -> Tokenizer:
    """The official ViT-B/16 VQ-KD shape (8192 codes of 32 dims), or the tiny one (``--layout``),
    random weights."""
    torch.manual_seed(seed)
    model = VQKD(VQKDModelConfig(**{"kmeans_iters": 0, **LAYOUTS[layout]}))  # random unit codebook
    return Tokenizer(model.eval())


def main() -> None:
    default_images = os.environ.get("IMAGENET_SAMPLE", "/work/shared/data/imagenet-sample")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default=default_images)
    ap.add_argument("--demo-tokenizer", default=None)
    ap.add_argument("--demo-images", type=int, default=1000)
    ap.add_argument("--official-images", type=int, default=64)
    ap.add_argument(
        "--layout", choices=sorted(LAYOUTS), default="official", help="the tokenizer's shape"
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/precision_tokens.json")
    args = smoke.parse_args(ap, SMOKE)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    precisions = ["bf16"] + (["fp16"] if fp16_available() else [])
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results: dict = {"uptime_before": uptime, "precisions": precisions, "batch": args.batch}
    folder = Path(args.images)
    if args.demo_tokenizer:
        tok = load_tokenizer(args.demo_tokenizer)
        views = load_views(folder, tok.image_size, args.demo_images)
        results["demo"] = {
            "tokenizer": args.demo_tokenizer,
            "describe": tok.describe(),
            "images": len(views),
            **agreement(tok, views, precisions, args.batch),
            "speed": speed(tok, views, args.batch, args.reps),
        }
        print(json.dumps(results["demo"], indent=1))
    tok = official_layout(args.layout)
    views = load_views(folder, tok.image_size, args.official_images)
    results["official_layout"] = {
        "layout": args.layout,
        "weights": "random (seed 0): no released tokenizer offline",
        "images": len(views),
        **agreement(tok, views, precisions, args.batch),
        "speed": speed(tok, views, args.batch, args.reps),
    }
    print(json.dumps(results["official_layout"], indent=1))
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results["uptime_after"] = uptime
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
