"""GPU readiness in one short run: tokenizer, stage 2, stage-3 step, 1-GPU NCCL DDP.

On a CUDA machine (a few minutes):

1. tokenizer: the official-layout ViT-B/16 VQ-KD (random weights) encodes the same views in
   fp32 and bf16: code agreement and views/s at batch 64;
2. stage 2 end to end on one GPU worker (``pipeline run stage=tokenize cluster.n_workers=1
   cluster.device=cuda``; the tiny tokenizer with ``--tiny``) over ``--images``, with the share
   of the wall time spent decoding the JPEGs on the CPU (measured separately on the same
   files): if it is large, decode is the bottleneck (GPU JPEG decode would have to reproduce
   the CPU views bit for bit to keep the view contract, docs/design.md §2, so it is not
   switched on here);
3. the stage-3 step (ViT-B/16, 224 px, batch 8, AdamW): bf16 autocast vs fp32, interleaved; with
   ``--ref <unilm beit2 folder>`` also the reference model's own fp32 step;
4. a 1-process NCCL process group: an all_reduce of a CUDA tensor.

Without CUDA each CUDA part is skipped with the reason; the tokenizer and step parts then run as
a CPU smoke on tiny models (``--tiny`` is implied), so CI keeps the script working.
Writes JSON to ``--out`` and prints it.

    python benchmarks/gpu_check.py --images $IMAGENET_SAMPLE --out benchmarks/results/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import smoke
import torch
import torch.distributed as dist
from PIL import Image
from synthetic import TINY_VQKD

from pretrain.model import BEiTConfig, BEiTv2, mim_loss
from tokenize_corpus.tokenizer import Tokenizer, save_tokenizer
from tokenize_corpus.vqkd import VQKD, VQKDModelConfig

SMOKE = ["--tiny", "--reps=1", "--images={imagenet}", "--out={tmp}/gpu_check.json"]
TINY_BEIT = BEiTConfig(
    image_size=32, patch_size=8, width=32, depth=1, heads=1, vocab_size=16, head_from_layer=1
)


def _vqkd_config(tiny: bool) -> VQKDModelConfig:
    """The tiny tokenizer, or the official-layout ViT-B/16 VQ-KD (8192 codes); random codebook."""
    return VQKDModelConfig(**TINY_VQKD) if tiny else VQKDModelConfig(kmeans_iters=0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def check_tokenizer(device: torch.device, tiny: bool, batch: int, reps: int) -> dict:
    """fp32 vs bf16 codes of the same views; views/s of each (interleaved, medians)."""
    torch.manual_seed(0)
    tok = Tokenizer(VQKD(_vqkd_config(tiny))).to(device)
    size = tok.image_size
    views = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    ref = tok.encode(views, precision="fp32")
    half = tok.encode(views, precision="bf16")
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(reps):
        for p in times:
            times[p].append(_timed(lambda p=p: tok.encode(views, precision=p), device))
    rate = {p: batch / statistics.median(t) for p, t in times.items()}
    return {
        "model": "tiny" if tiny else "official-layout ViT-B/16 VQ-KD, random weights",
        "agree_bf16": (ref == half).float().mean().item(),
        "views_per_s": rate,
        "bf16_over_fp32": rate["bf16"] / rate["fp32"],
    }


def _step_fn(model: torch.nn.Module, opt, views, mask, targets, dtype, device, reference: bool):
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(views, bool_masked_pos=mask) if reference else model(views, mask)
            if reference:  # the reference returns [final logits, CLS-head logits]
                loss = sum(torch.nn.functional.cross_entropy(o.float(), targets) for o in out)
            else:
                loss = mim_loss(out, targets)["loss"]
        loss.backward()
        opt.step()

    return step


def _reference_model(ref: str, cfg: BEiTConfig) -> torch.nn.Module:
    sys.path.insert(0, ref)
    import modeling_pretrain  # the reference's own model (outside this repo)

    return modeling_pretrain.VisionTransformerForMaskedImageModelingCLS(
        img_size=cfg.image_size, patch_size=cfg.patch_size, vocab_size=cfg.vocab_size,
        embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        init_values=cfg.layer_scale_init, use_abs_pos_emb=False, use_shared_rel_pos_bias=True,
        early_layers=cfg.early_layers, head_layers=cfg.head_layers,
    )  # fmt: skip


def check_step(device: torch.device, tiny: bool, reps: int, ref: str | None) -> dict:
    """Stage-3 train step seconds: ours bf16 and fp32 (and the reference's fp32), interleaved."""
    cfg = TINY_BEIT if tiny else BEiTConfig()
    batch = 8
    gen = torch.Generator().manual_seed(0)
    views = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=gen).to(device)
    mask = torch.zeros(batch, cfg.num_patches, dtype=torch.bool)
    mask[:, : max(1, cfg.num_patches * 75 // 196)] = True
    mask = mask[:, torch.randperm(cfg.num_patches, generator=gen)].to(device)
    targets = torch.randint(0, cfg.vocab_size, (int(mask.sum()),), generator=gen).to(device)
    runs = {}
    for name, dtype in (("ours_bf16", torch.bfloat16), ("ours_fp32", None)):
        torch.manual_seed(0)
        model = BEiTv2(cfg).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        runs[name] = _step_fn(model, opt, views, mask, targets, dtype, device, False)
    if ref:
        model = _reference_model(ref, cfg).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        runs["reference_fp32"] = _step_fn(model, opt, views, mask, targets, None, device, True)
    for step in runs.values():  # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, step in runs.items():
            times[name].append(_timed(step, device))
    med = {name: statistics.median(t) for name, t in times.items()}
    out: dict = {"model": "tiny" if tiny else "ViT-B/16 224 px", "batch": batch, "seconds": med}
    base = med.get("reference_fp32", med["ours_fp32"])
    out["bf16_over_baseline"] = med["ours_bf16"] / base
    out["baseline"] = "reference_fp32" if "reference_fp32" in med else "ours_fp32"
    return out


def _decode_seconds(files: list[Path]) -> float:
    start = time.perf_counter()
    for path in files:
        with Image.open(path) as im:
            im.convert("RGB").load()
    return time.perf_counter() - start


def check_stage2(images: str | None, seeds: int, tiny: bool) -> dict:
    """``stage=tokenize`` on one GPU worker; wall time, views/s and the JPEG decode share."""
    if not images or not Path(images).is_dir():
        return {"skipped": f"--images {images!r} is not a folder of images"}
    files = sorted(p for p in Path(images).iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        cfg = _vqkd_config(tiny)
        tok_path = save_tokenizer(VQKD(cfg), Path(tmp) / "tokenizer.pth")
        cmd = [
            sys.executable, "-m", "pipeline.cli", "run", "stage=tokenize", f"images={images}",
            f"tokenizer={tok_path}", f"out_dir={tmp}/tokens", f"aug.size={cfg.image_size}",
            f"seeds={list(range(seeds))}", "cluster.n_workers=1", "cluster.device=cuda",
            "precision=auto", "formats=[parquet]",
        ]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"failed": proc.returncode, "stderr": proc.stderr[-2000:]}
    decode = _decode_seconds(files) * seeds  # every view decodes its image once
    return {
        "images": len(files),
        "seeds": seeds,
        "wall_s": wall,
        "views_per_s": len(files) * seeds / wall,
        "decode_share": decode / wall,
    }


def check_nccl() -> dict:
    """A 1-process NCCL group: all_reduce of a CUDA tensor returns it unchanged (world 1)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        x = torch.arange(4.0, device="cuda")
        dist.all_reduce(x)
        ok = torch.equal(x.cpu(), torch.arange(4.0))
    finally:
        dist.destroy_process_group()
    return {
        "all_reduce_ok": bool(ok),
        "nccl_version": ".".join(map(str, torch.cuda.nccl.version())),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default=os.environ.get("IMAGENET_SAMPLE"))
    ap.add_argument("--ref", default=None, help="unilm beit2 folder: time the reference's step")
    ap.add_argument("--tiny", action="store_true", help="tiny models (a smoke run)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = smoke.parse_args(ap, SMOKE, argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tiny = args.tiny or not cuda
    report: dict = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (no CUDA device)",
        "torch": torch.__version__,
    }
    batch = 64 if cuda and not tiny else 4
    report["tokenizer"] = check_tokenizer(device, tiny, batch, args.reps)
    report["stage3_step"] = check_step(device, tiny, args.reps, args.ref if cuda else None)
    if cuda:
        report["stage2"] = check_stage2(args.images, args.seeds, tiny)
        report["nccl_ddp"] = check_nccl()
    else:
        why = "no CUDA device (the tokenizer and step above ran as a CPU smoke)"
        report["stage2"] = smoke.skipped("stage 2 on one GPU worker", why)
        report["nccl_ddp"] = smoke.skipped("the NCCL all_reduce", why)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
