"""Stage 3 run function: BEiT v2 masked image modelling from precomputed (or online) tokens.

``pretrain(cfg)`` wires things: the token dataset is checked against the model, the data path of
``pretrain.data`` feeds the loop of ``pretrain.loop`` (AdamW with fp32 master weights, the shared
warmup + cosine schedule per step, gradient clipping, autocast at ``train.precision``, DDP under
``torchrun`` or ``srun``), checkpoints are written atomically after every ``save_every`` epochs,
and every run ends with a timm-loadable backbone (``pretrain.export``).

Resuming is exact: checkpoints are taken at epoch boundaries, and everything random inside an
epoch (shard order, view choice, masks, shuffle buffer, drop path) is seeded from (run seed,
epoch[, rank]), so ``k`` epochs + resume equals an uninterrupted run bit for bit, and a
checkpoint holds no generator state.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import load_file, save_atomic
from engine.config import to_dict
from engine.distributed import Distributed
from engine.errors import ConfigError, UserError
from engine.metrics import METRICS
from engine.optim import adamw, param_groups
from engine.plots import Panel, plot_metrics
from engine.schedule import Schedule
from engine.start import Run, start_run
from pretrain.config import PretrainConfig
from pretrain.data import MIMDataset
from pretrain.export import export_backbone
from pretrain.loop import Loop, run_epoch
from pretrain.masking import num_masked_for
from pretrain.model import BEiTConfig, BEiTv2, beit_config
from shards.reader import TokenDataset
from shards.token_sets import resolve
from tokenize_corpus.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pth"
PLOT = "curves.png"
BACKBONE = "backbone_timm.pth"
PANELS = [
    Panel("loss (final layer + CLS head)", ("loss",)),
    Panel("MIM accuracy", ("mim_acc", "head_acc")),
    Panel("learning rate", ("lr",)),
]


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
    try:
        return beit_config(cfg.model.size, **overrides)
    except ValueError as err:  # a shape the model cannot have: the config's mistake
        raise ConfigError(f"model.*: {err}") from None


def _weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    # Temp file + fsync + rename: a kill mid-save leaves the previous checkpoint intact.
    save_atomic(payload, path)


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Stage 3: pretrain BEiT v2 (see module docstring); returns paths and final accuracies."""
    tokens = _open_tokens(cfg)  # before the run starts: a wrong tokens= writes nothing
    with start_run(cfg) as run:
        loop = _start(run, tokens)
        t, ddp = loop.cfg.train, loop.ddp
        last: dict[str, float] = {"mim_acc": float("nan"), "head_acc": float("nan")}
        for epoch in range(loop.start_epoch, t.epochs):
            last = run_epoch(loop, epoch)
            done = epoch + 1
            if ddp.main and (done % max(1, t.save_every) == 0 or done == t.epochs):
                _save_checkpoint(loop.out / CHECKPOINT, _checkpoint_payload(loop, done))
            ddp.barrier()
        return _finish(loop, last)


def _open_tokens(cfg: PretrainConfig) -> TokenDataset:
    """The token dataset (or its token set) of ``tokens=``/``token_set=``."""
    if not cfg.tokens:
        raise UserError("tokens= is not set: pass the token dataset written by stage=tokenize")
    tokens = resolve(cfg.tokens, cfg.token_set).open()
    if cfg.token_set:
        log.info("token set %s: %s", cfg.token_set, tokens.path)
    return tokens


def _start(run: Run[PretrainConfig], tokens: TokenDataset) -> Loop:
    """Everything the loop needs: data, model, optimiser, targets, metrics; resumed if asked."""
    cfg, device, ddp, out = run.cfg, run.device, run.ddp, run.out
    mcfg = model_config(cfg, tokens)
    per_rank_batch, rest = divmod(cfg.train.batch_size, ddp.world_size)
    if rest or per_rank_batch < 1:
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} does not split evenly over "
            f"{ddp.world_size} ranks; use a multiple of {ddp.world_size}"
        )
    tokenizer = _online_tokenizer(cfg, tokens, mcfg, device)
    dataset = _dataset(cfg, tokens, mcfg, ddp)
    steps = _steps_per_epoch(cfg, dataset, per_rank_batch, ddp)
    total_steps, warmup_steps = sum(steps), sum(steps[: cfg.train.warmup_epochs])

    # Seeded again (start_run seeded first): loading the online tokenizer draws from the
    # generator, and both target modes must start from the same weights, on every rank.
    torch.manual_seed(cfg.train.seed)
    model = BEiTv2(mcfg).to(device)
    t = cfg.train
    optimizer = adamw(
        param_groups(model, t.weight_decay), lr=cfg.lr, betas=t.betas, eps=t.eps, device=device
    )
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    start_epoch, step = _resume(cfg, out / CHECKPOINT, mcfg, model, optimizer, scaler)
    metrics = run.metrics(
        keep=(lambda r: r.get("epoch", 0) < start_epoch) if start_epoch else None,
        resume_step=step,
    )
    net = ddp.wrap(model, device)
    if t.compile:
        net = torch.compile(net)
    log.info(
        "pretraining %s (%d params) on %d images, %d steps/epoch x %d epochs, lr %.3g, "
        "%s targets, %s",
        cfg.model.size, sum(p.numel() for p in model.parameters()), dataset.num_rows, steps[0],
        t.epochs, cfg.lr, cfg.targets, t.precision,
    )  # fmt: skip
    return Loop(
        cfg=cfg, out=out, device=device, ddp=ddp, model=model, net=net, optimizer=optimizer,
        scaler=scaler, schedule=Schedule(cfg.lr, total_steps, warmup_steps, floor=t.min_lr),
        dataset=dataset, per_rank_batch=per_rank_batch, steps_per_epoch=steps, metrics=metrics,
        tokenizer=tokenizer, target_precision=tokens.precision, mcfg=mcfg,
        start_epoch=start_epoch, step=step,
    )  # fmt: skip


def _online_tokenizer(
    cfg: PretrainConfig, tokens: TokenDataset, mcfg: BEiTConfig, device: torch.device
) -> Any:
    """The tokenizer for ``targets=online`` (None offline), checked to be the dataset's own."""
    if cfg.targets != "online":
        return None
    if not cfg.tokenizer:
        raise UserError("targets=online needs tokenizer=<tokenizer checkpoint>")
    tokenizer = load_tokenizer(cfg.tokenizer, device=str(device))
    # Online targets must be the same targets: same tokenizer as the stored ones (and, in the
    # loop, the same precision: the dataset's).
    tokens.check(
        codebook_size=mcfg.vocab_size,
        grid=mcfg.grid,
        image_size=mcfg.image_size,
        fingerprint=tokenizer.fingerprint,
    )
    return tokenizer


def _dataset(
    cfg: PretrainConfig, tokens: TokenDataset, mcfg: BEiTConfig, ddp: Distributed
) -> MIMDataset:
    """The MIM samples of this rank (docs/design.md §5)."""
    images_info = tokens.manifest.get("images") or {}
    images = cfg.images or images_info.get("source") or ""
    if not images:
        raise UserError(
            "images= is not set and the token manifest names no image source: pass the image "
            "shards that stage 2 tokenized"
        )
    num_masked = cfg.mask.num_masked or num_masked_for(mcfg.grid)
    if not 0 < num_masked <= mcfg.num_patches:
        raise ConfigError(
            f"mask.num_masked={num_masked}: mask 1 to {mcfg.num_patches} patches of the "
            f"{mcfg.grid[0]}x{mcfg.grid[1]} grid (null: about 40%)"
        )
    return MIMDataset(
        images,
        tokens,
        vocab_size=mcfg.vocab_size,
        grid=mcfg.grid,
        image_size=mcfg.image_size,
        num_masked=num_masked,
        min_patches=cfg.mask.min_patches,
        run_seed=cfg.train.seed,
        shard_size=cfg.shard_size or int(images_info.get("shard_size") or 256),
        shuffle_buffer=cfg.train.shuffle_buffer,
        rank=ddp.rank,
        world_size=ddp.world_size,
        online=cfg.targets == "online",
        seeds=cfg.views.seeds,  # refuses seeds the dataset does not store
        source=cfg.views.source,  # fresh refuses targets=offline
    )


def _steps_per_epoch(
    cfg: PretrainConfig, dataset: MIMDataset, per_rank_batch: int, ddp: Distributed
) -> list[int]:
    """Optimiser steps of each epoch, the same on every rank (from the shard sizes)."""
    workers = cfg.train.num_workers
    steps = []
    for epoch in range(cfg.train.epochs):
        dataset.set_epoch(epoch)
        steps.append(dataset.batches_per_epoch(per_rank_batch, workers))
    if min(steps, default=0) < 1:
        raise UserError(
            f"not one full batch of {per_rank_batch} per rank from {dataset.num_rows} images in "
            f"{len(dataset.shards)} shards over {ddp.world_size} rank(s) x {max(1, workers)} "
            "worker(s): lower train.batch_size or train.num_workers"
        )
    return steps


def _resume(
    cfg: PretrainConfig,
    path: Path,
    mcfg: BEiTConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> tuple[int, int]:
    """(start epoch, step): restored from ``path`` when ``train.resume``, else (0, 0)."""
    if not cfg.train.resume:
        return 0, 0
    if not path.exists():
        log.info("resume=true but no checkpoint at %s: starting from scratch", path)
        return 0, 0
    ckpt = load_file(path)
    if ckpt["config"]["model"] != asdict(mcfg):
        raise UserError(
            f"cannot resume from {path}: it was trained with model {ckpt['config']['model']}, "
            f"this run builds {asdict(mcfg)}; use another out_dir or the same model settings"
        )
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if "scaler" in ckpt and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    start_epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
    log.info("resuming from %s at epoch %d (step %d)", path, start_epoch, step)
    return start_epoch, step


def _checkpoint_payload(loop: Loop, done: int) -> dict[str, Any]:
    payload = {
        "model": loop.model.state_dict(),
        "config": {"model": asdict(loop.mcfg), "pretrain": to_dict(loop.cfg)},
        "optimizer": loop.optimizer.state_dict(),
        "epoch": done,
        "step": loop.step,
    }
    if loop.scaler.is_enabled():
        payload["scaler"] = loop.scaler.state_dict()
    return payload


def _finish(loop: Loop, last: dict[str, float]) -> dict[str, Any]:
    """Check the replicas agree, export the backbone and the plot; the run's summary."""
    ckpt_path, metrics_path = loop.out / CHECKPOINT, loop.out / METRICS
    loop.metrics.close()
    summary: dict[str, Any] = {"checkpoint": str(ckpt_path), "metrics": str(metrics_path)}
    if loop.ddp.world_size > 1:
        # DDP keeps replicas identical by construction; check it rather than assume it.
        digests = loop.ddp.gather_objects(_weights_digest(loop.model))
        summary["ranks_identical"] = len(set(digests)) == 1
        if not summary["ranks_identical"]:
            log.error("model weights differ between ranks after training: %s", digests)
    if loop.ddp.main:
        backbone = loop.out / BACKBONE
        export_backbone(ckpt_path, backbone)
        summary["backbone"] = str(backbone)
        summary["plot"] = str(plot_metrics(metrics_path, loop.out / PLOT, PANELS))
        summary["tokens"] = loop.dataset.tokens.path  # the token set read (token_set=)
        summary["fingerprint"] = loop.dataset.tokens.fingerprint
        summary["mim_acc"] = last.get("mim_acc")
        summary["head_acc"] = last.get("head_acc")
        summary["precision"] = loop.cfg.train.precision
        summary["epochs"] = loop.cfg.train.epochs
        summary["steps"] = loop.step
        summary["exit_code"] = 0 if summary.get("ranks_identical", True) else 1
    return summary
