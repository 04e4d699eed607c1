"""One stage-3 epoch: the MIM training step under autocast, metrics and the progress bar.

The student runs under autocast at ``train.precision`` (bf16 where the hardware is fast at it);
its weights, gradients and the AdamW state stay fp32 (master weights), and the losses are
computed in fp32 (``pretrain.model.mim_loss``). fp16 (GPUs only) adds a gradient scaler. Online
targets are tokenized at the token dataset's own precision, not the student's, so that
``targets=online`` sees exactly the tokens stage 2 stored (docs/design.md §5).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from engine.distributed import Distributed
from engine.guards import check_finite
from engine.metrics import MetricsWriter
from engine.optim import set_lr
from engine.precision import autocast
from engine.schedule import Schedule
from pretrain.config import PretrainConfig
from pretrain.data import MIMDataset, stable_hash
from pretrain.model import BEiTConfig, mim_loss
from shards.views import to_unit

log = logging.getLogger(__name__)

VALUES = ("loss", "mim_loss", "head_loss", "mim_acc", "head_acc")


@dataclass
class Loop:
    """The state a stage-3 run carries from epoch to epoch."""

    cfg: PretrainConfig
    out: Path
    device: torch.device
    ddp: Distributed
    model: torch.nn.Module  # the unwrapped student (what checkpoints hold)
    net: torch.nn.Module  # what the step calls: the student under DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: Schedule
    dataset: MIMDataset
    per_rank_batch: int
    steps_per_epoch: list[int]
    metrics: MetricsWriter
    tokenizer: Any  # tokenize_corpus.tokenizer.Tokenizer for targets=online, else None
    target_precision: str  # the token dataset's precision (online targets use it)
    mcfg: BEiTConfig
    start_epoch: int = 0
    step: int = 0


def train_step(loop: Loop, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One optimiser step on ``batch``; returns the (unsynchronised) loss tensors."""
    t, device = loop.cfg.train, loop.device
    views = batch["view"].to(device, non_blocking=True)  # [B, 3, H, W]
    mask = batch["mask"].to(device, non_blocking=True)  # [B, N] bool
    if loop.tokenizer is not None:
        pixels = to_unit(batch["view_uint8"].to(device))  # [B, 3, H, W] in [0, 1]
        targets = loop.tokenizer.encode(pixels, precision=loop.target_precision)  # [B, N]
    else:
        targets = batch["tokens"].to(device, non_blocking=True)  # [B, N]
    with autocast(t.precision, device):
        result = mim_loss(loop.net(views, mask), targets[mask])
    loop.optimizer.zero_grad(set_to_none=True)
    loop.scaler.scale(result["loss"]).backward()
    if t.clip_grad > 0:
        loop.scaler.unscale_(loop.optimizer)
        torch.nn.utils.clip_grad_norm_(loop.model.parameters(), t.clip_grad)
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    return result


def run_epoch(loop: Loop, epoch: int) -> dict[str, float]:
    """Train one epoch; writes step and epoch records; returns the epoch means over ranks."""
    cfg, ddp = loop.cfg, loop.ddp
    loop.dataset.set_epoch(epoch)
    # Drop path and anything else random in the step: seeded per (run seed, epoch, rank).
    torch.manual_seed(stable_hash("torch", cfg.train.seed, epoch, ddp.rank))
    loader = DataLoader(
        loop.dataset,
        batch_size=loop.per_rank_batch,
        num_workers=cfg.train.num_workers,
        drop_last=True,
        pin_memory=loop.device.type == "cuda",
    )
    loop.net.train()
    steps = loop.steps_per_epoch[epoch]
    samples_per_step = loop.per_rank_batch * ddp.world_size
    sums: dict[str, float] = {}
    count, skipped, lr = 0, 0, 0.0
    start = tick = time.perf_counter()
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not ddp.main,
               leave=False)  # fmt: skip
    for i, batch in enumerate(loader):
        if i >= steps:
            break  # every rank stops after the same number of steps (see batches_per_epoch)
        lr = loop.schedule(loop.step)
        set_lr(loop.optimizer, lr)
        result = train_step(loop, batch)
        loop.step += 1
        skipped += int(batch["skipped"].sum())
        values = {k: float(result[k].detach()) for k in VALUES}
        check_finite(values["loss"], loop.step, epoch)
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        now = time.perf_counter()
        if ddp.main and (loop.step % cfg.train.log_every == 0 or i == steps - 1):
            record = {"kind": "step", "epoch": epoch, "step": loop.step, **values, "lr": lr}
            record["samples_per_s"] = samples_per_step / max(now - tick, 1e-9)
            loop.metrics.write(record)
        tick = now
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.3f}", acc=f"{values['mim_acc']:.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    means = ddp.mean({k: v / max(1, count) for k, v in sums.items()})
    skipped_all = ddp.mean({"skipped": float(skipped)})["skipped"] * ddp.world_size
    if ddp.main:
        loop.metrics.write(
            {
                "kind": "epoch",
                "epoch": epoch,
                "step": loop.step,
                **means,
                "lr": lr,
                "seconds": seconds,
                "samples_per_s": count * samples_per_step / max(seconds, 1e-9),
                "skipped_images": int(round(skipped_all)),
            }
        )
        log.info(
            "epoch %d: loss %.4f mim_acc %.4f head_acc %.4f (%.1f s)",
            epoch + 1,
            means.get("loss", float("nan")),
            means.get("mim_acc", float("nan")),
            means.get("head_acc", float("nan")),
            seconds,
        )
    return means
