"""Stage 3 run function: BEiT v2 masked image modelling from precomputed (or online) tokens.

``pretrain(cfg)`` wires things: the token dataset is checked against the model, the data path of
``pretrain.data`` feeds a short loop (AdamW, warmup + cosine per step, gradient clipping, bf16
autocast on CUDA, DDP under ``torchrun``), checkpoints are written atomically after every
``save_every`` epochs, and every run ends with a timm-loadable backbone (``pretrain.export``).

Resuming is exact: checkpoints are taken at epoch boundaries, and everything random inside an
epoch (shard order, view choice, masks, shuffle buffer, drop path) is seeded from (run seed,
epoch[, rank]), so ``k`` epochs + resume equals an uninterrupted run bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from engine.config import save_config, to_dict
from pretrain.config import PretrainConfig
from pretrain.data import MIMDataset, stable_hash
from pretrain.export import export_backbone
from pretrain.masking import num_masked_for
from pretrain.model import BEiTConfig, BEiTv2, beit_config, mim_loss
from shards.reader import TokenDataset, open_token_dataset
from shards.views import to_unit

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pth"
METRICS = "metrics.jsonl"
PLOT = "curves.png"
BACKBONE = "backbone_timm.pth"


def model_config(cfg: PretrainConfig, tokens: TokenDataset | None = None) -> BEiTConfig:
    """The student's ``BEiTConfig``: the named size and the non-null overrides; vocabulary, image
    and patch size left null are taken from the token dataset's tokenizer (explicit values are
    checked against it later, and a mismatch is refused)."""
    overrides = {
        f.name: getattr(cfg.model, f.name)
        for f in fields(cfg.model)
        if f.name != "size" and getattr(cfg.model, f.name) is not None
    }
    if tokens is not None:
        described = tokens.manifest.get("tokenizer") or {}
        overrides.setdefault("vocab_size", tokens.codebook_size)
        if described.get("image_size"):
            overrides.setdefault("image_size", int(described["image_size"]))
        if described.get("patch_size"):
            overrides.setdefault("patch_size", int(described["patch_size"]))
    return beit_config(cfg.model.size, **overrides)


def _weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as the reference: no decay for biases, norms and other 1-D parameters, nor
    for the names in ``model.no_weight_decay()`` (``cls_token``)."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then cosine down to ``floor``."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


class _Distributed:
    """Rank facts of this process; initialises a process group under ``torchrun``."""

    def __init__(self, device: torch.device) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owned = False
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.owned = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar metrics over ranks."""
        if self.world_size == 1 or not values:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64)
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(values, t.tolist(), strict=True)}

    def close(self) -> None:
        if self.owned:
            dist.destroy_process_group()


def _device(cfg: PretrainConfig) -> torch.device:
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "train.device=cuda but no CUDA device is visible; use train.device=cpu"
            )
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    # Write then rename: a kill mid-save leaves the previous checkpoint intact.
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _write_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _keep_metrics_before(path: Path, epoch: int) -> None:
    # On resume, drop lines of epochs that are about to be redone (after a kill mid-epoch).
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("epoch", 0) < epoch]
    path.write_text("".join(ln + "\n" for ln in kept))


def plot_metrics(metrics_path: Path, out: Path) -> Path:
    """Loss and both MIM accuracies per step (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    steps = [r for r in records if r.get("kind") == "step"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    x = [r["step"] for r in steps]
    axes[0].plot(x, [r["loss"] for r in steps])
    axes[0].set(title="loss (final layer + CLS head)", xlabel="step")
    axes[1].plot(x, [r["mim_acc"] for r in steps], label="final layer")
    axes[1].plot(x, [r["head_acc"] for r in steps], label="CLS head")
    axes[1].set(title="MIM accuracy", xlabel="step")
    axes[1].legend()
    axes[2].plot(x, [r["lr"] for r in steps])
    axes[2].set(title="learning rate", xlabel="step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Stage 3: pretrain BEiT v2 (see module docstring); returns paths and final accuracies."""
    device = _device(cfg)
    ddp = _Distributed(device)
    try:
        return _pretrain(cfg, device, ddp)
    finally:
        ddp.close()


def _pretrain(cfg: PretrainConfig, device: torch.device, ddp: _Distributed) -> dict[str, Any]:
    out = Path(cfg.out_dir)
    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    if not cfg.tokens:
        raise ValueError("tokens= is not set: pass the token dataset written by stage=tokenize")
    tokens = open_token_dataset(cfg.tokens)
    images_info = tokens.manifest.get("images") or {}
    images = cfg.images or images_info.get("source") or ""
    if not images:
        raise ValueError(
            "images= is not set and the token manifest names no image source: pass the image "
            "shards that stage 2 tokenized"
        )
    shard_size = cfg.shard_size or int(images_info.get("shard_size") or 256)
    mcfg = model_config(cfg, tokens)
    per_rank_batch, rest = divmod(cfg.train.batch_size, ddp.world_size)
    if rest or per_rank_batch < 1:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} does not split evenly over "
            f"{ddp.world_size} ranks; use a multiple of {ddp.world_size}"
        )

    online = cfg.targets == "online"
    tokenizer = None
    if online:
        if not cfg.tokenizer:
            raise ValueError("targets=online needs tokenizer=<tokenizer checkpoint>")
        from tokenize_corpus.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer, device=str(device))
        # Online targets must be the same targets: same tokenizer as the stored ones.
        tokens.check(
            codebook_size=mcfg.vocab_size,
            grid=mcfg.grid,
            image_size=mcfg.image_size,
            fingerprint=tokenizer.fingerprint,
        )

    dataset = MIMDataset(
        images,
        tokens,
        vocab_size=mcfg.vocab_size,
        grid=mcfg.grid,
        image_size=mcfg.image_size,
        num_masked=cfg.mask.num_masked or num_masked_for(mcfg.grid),
        min_patches=cfg.mask.min_patches,
        run_seed=cfg.train.seed,
        shard_size=shard_size,
        shuffle_buffer=cfg.train.shuffle_buffer,
        rank=ddp.rank,
        world_size=ddp.world_size,
        online=online,
    )
    workers = cfg.train.num_workers
    steps_per_epoch = []
    for epoch in range(cfg.train.epochs):
        dataset.set_epoch(epoch)
        steps_per_epoch.append(dataset.batches_per_epoch(per_rank_batch, workers))
    if min(steps_per_epoch, default=0) < 1:
        raise ValueError(
            f"not one full batch of {per_rank_batch} per rank from {dataset.num_rows} images in "
            f"{len(dataset.shards)} shards over {ddp.world_size} rank(s) x {max(1, workers)} "
            "worker(s): lower train.batch_size or train.num_workers"
        )
    total_steps = sum(steps_per_epoch)
    warmup_steps = sum(steps_per_epoch[: cfg.train.warmup_epochs])

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = BEiTv2(mcfg).to(device)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.train.weight_decay),
        lr=cfg.lr,
        betas=tuple(cfg.train.betas),
        eps=cfg.train.eps,
    )
    ckpt_path = out / CHECKPOINT
    metrics_path = out / METRICS
    start_epoch, step = 0, 0
    if cfg.train.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt["config"]["model"] != asdict(mcfg):
            raise ValueError(
                f"cannot resume from {ckpt_path}: it was trained with model {ckpt['config']['model']}, "
                f"this run builds {asdict(mcfg)}; use another out_dir or the same model settings"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
        log.info("resuming from %s at epoch %d (step %d)", ckpt_path, start_epoch, step)
    elif cfg.train.resume:
        log.info("resume=true but no checkpoint at %s: starting from scratch", ckpt_path)
    if ddp.main:
        if start_epoch:
            _keep_metrics_before(metrics_path, start_epoch)
        else:
            metrics_path.write_text("")

    net: torch.nn.Module = model
    if ddp.world_size > 1:
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    use_amp = cfg.train.amp and device.type == "cuda"
    samples_per_step = per_rank_batch * ddp.world_size
    log.info(
        "pretraining %s (%d params) on %d images, %d steps/epoch x %d epochs, lr %.3g, %s targets",
        cfg.model.size,
        sum(p.numel() for p in model.parameters()),
        dataset.num_rows,
        steps_per_epoch[0],
        cfg.train.epochs,
        cfg.lr,
        cfg.targets,
    )

    last: dict[str, float] = {"mim_acc": float("nan"), "head_acc": float("nan")}
    for epoch in range(start_epoch, cfg.train.epochs):
        dataset.set_epoch(epoch)
        # Drop path and anything else random in the step: seeded per (run seed, epoch, rank).
        torch.manual_seed(stable_hash("torch", cfg.train.seed, epoch, ddp.rank))
        loader = DataLoader(
            dataset,
            batch_size=per_rank_batch,
            num_workers=workers,
            drop_last=True,
            pin_memory=device.type == "cuda",
        )
        net.train()
        sums: dict[str, float] = {}
        count, skipped = 0, 0
        start = tick = time.perf_counter()
        bar = tqdm(
            total=steps_per_epoch[epoch],
            desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
            disable=not ddp.main,
            leave=False,
        )
        for i, batch in enumerate(loader):
            if i >= steps_per_epoch[epoch]:
                break  # every rank stops after the same number of steps (see batches_per_epoch)
            lr = lr_at(step, total_steps, warmup_steps, cfg.lr, cfg.train.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            views = batch["view"].to(device, non_blocking=True)  # [B, 3, H, W]
            mask = batch["mask"].to(device, non_blocking=True)  # [B, N]
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else nullcontext()
            with autocast:
                if tokenizer is not None:
                    with torch.no_grad():
                        targets = tokenizer.encode(to_unit(batch["view_uint8"].to(device)))
                else:
                    targets = batch["tokens"].to(device, non_blocking=True)  # [B, N]
                result = mim_loss(net(views, mask), targets[mask])
            optimizer.zero_grad(set_to_none=True)
            result["loss"].backward()
            if cfg.train.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
            optimizer.step()
            step += 1
            skipped += int(batch["skipped"].sum())
            values = {
                k: float(result[k].detach())
                for k in ("loss", "mim_loss", "head_loss", "mim_acc", "head_acc")
            }
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            now = time.perf_counter()
            if ddp.main and (step % cfg.train.log_every == 0 or i == steps_per_epoch[epoch] - 1):
                record = {"kind": "step", "epoch": epoch, "step": step, **values, "lr": lr}
                record["samples_per_s"] = samples_per_step / max(now - tick, 1e-9)
                _write_metrics(metrics_path, record)
            tick = now
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.3f}", acc=f"{values['mim_acc']:.3f}")
        bar.close()
        seconds = time.perf_counter() - start
        means = ddp.mean({k: v / max(1, count) for k, v in sums.items()})
        skipped_all = ddp.mean({"skipped": float(skipped)})["skipped"] * ddp.world_size
        last = means
        if ddp.main:
            record = {
                "kind": "epoch",
                "epoch": epoch,
                "step": step,
                **means,
                "lr": lr,
                "seconds": seconds,
                "samples_per_s": count * samples_per_step / max(seconds, 1e-9),
                "skipped_images": int(round(skipped_all)),
            }
            _write_metrics(metrics_path, record)
            log.info(
                "epoch %d: loss %.4f mim_acc %.4f head_acc %.4f (%.1f s)",
                epoch + 1,
                means.get("loss", float("nan")),
                means.get("mim_acc", float("nan")),
                means.get("head_acc", float("nan")),
                seconds,
            )
            done = epoch + 1
            if done % max(1, cfg.train.save_every) == 0 or done == cfg.train.epochs:
                _save_checkpoint(
                    ckpt_path,
                    {
                        "model": model.state_dict(),
                        "config": {"model": asdict(mcfg), "pretrain": to_dict(cfg)},
                        "optimizer": optimizer.state_dict(),
                        "epoch": done,
                        "step": step,
                        "rng": {"torch": torch.get_rng_state()},
                    },
                )
        if ddp.world_size > 1:
            dist.barrier()

    summary: dict[str, Any] = {"checkpoint": str(ckpt_path), "metrics": str(metrics_path)}
    if ddp.world_size > 1:
        # DDP keeps replicas identical by construction; check it rather than assume it.
        digests: list[Any] = [None] * ddp.world_size
        dist.all_gather_object(digests, _weights_digest(model))
        summary["ranks_identical"] = len(set(digests)) == 1
        if not summary["ranks_identical"]:
            log.error("model weights differ between ranks after training: %s", digests)
    if ddp.main:
        backbone = out / BACKBONE
        export_backbone(ckpt_path, backbone)
        summary["backbone"] = str(backbone)
        summary["plot"] = str(plot_metrics(metrics_path, out / PLOT))
        summary["mim_acc"] = last.get("mim_acc")
        summary["head_acc"] = last.get("head_acc")
        summary["epochs"] = cfg.train.epochs
        summary["steps"] = step
        summary["exit_code"] = 0 if summary.get("ranks_identical", True) else 1
    return summary
