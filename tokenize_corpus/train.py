"""Stage 1: train a VQ-KD tokenizer by distilling a frozen teacher (docs/method.md §1).

``pipeline run stage=vqkd images=<source> [preset=demo] ...`` runs :func:`vqkd`. One process,
``torchrun --nproc_per_node N`` or ``srun -n N`` (DDP; gloo on CPU, nccl on GPUs). Outputs in
``out_dir``:
``config.yaml`` (first, with the resolved precision), ``checkpoint.pth`` (after every epoch,
atomic; weights in the official tokenizer layout plus the optimiser state under ``train_state``),
``tokenizer.pth`` (the final tokenizer for stage 2), ``metrics.jsonl`` (+ TensorBoard events in
``tensorboard/``) and ``metrics.png``.

The teacher and the tokenizer run under autocast at ``train.precision`` (``auto``: bf16 where the
hardware is fast at it); the task layer, the codebook lookup and the losses stay in fp32, as the
reference's, and so do the weights and the optimiser. An epoch has ``images // batch_size``
steps, and its data is a pure function of (seed, epoch) (``tokenize_corpus.vqkd_data``), so
``train.resume=true`` restarts at the last finished epoch and reproduces the uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from engine.checkpoint import load_file
from engine.config import to_dict
from engine.distributed import Distributed
from engine.errors import ConfigError, UserError
from engine.guards import check_finite
from engine.metrics import METRICS, MetricsWriter
from engine.optim import adamw, param_groups, set_lr
from engine.plots import Panel, plot_metrics
from engine.precision import autocast
from engine.schedule import Schedule
from engine.start import Run, start_run
from shards.images import list_shards
from shards.views import AugConfig, to_unit
from tokenize_corpus.config import VQKDConfig
from tokenize_corpus.teachers import Teacher, load_teacher
from tokenize_corpus.tokenizer import save_tokenizer
from tokenize_corpus.vqkd import VQKD, VQKD_SIZES, VQKDModelConfig
from tokenize_corpus.vqkd_data import EvalSet, TrainViews, count_images

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pth"
TOKENIZER = "tokenizer.pth"
PLOT = "metrics.png"
PANELS = [
    Panel("loss", ("loss",), with_epoch_means=True),
    Panel("reconstruction cosine", ("rec_cosine",), with_epoch_means=True),
    Panel("commitment loss", ("commit_loss",), with_epoch_means=True),
    Panel("learning rate", ("lr",)),
    Panel("codebook usage (eval, fraction)", ("eval_codebook_usage_fraction",), "epoch", "epoch"),
    Panel("token perplexity (eval)", ("eval_perplexity",), "epoch", "epoch"),
]


def vqkd(cfg: VQKDConfig) -> dict[str, Any]:
    """Train a tokenizer as ``cfg`` says; returns a summary (paths and final figures)."""
    summary, _ = fit(cfg)
    return summary


def model_config(cfg: VQKDConfig, teacher_dim: int) -> VQKDModelConfig:
    """The tokenizer's model config: the named size, then the explicit overrides."""
    m = cfg.model
    shape = dict(VQKD_SIZES[m.size])
    for key in ("width", "depth", "heads", "decoder_depth"):
        if getattr(m, key) is not None:
            shape[key] = getattr(m, key)
    return VQKDModelConfig(
        image_size=m.image_size,
        patch_size=m.patch_size,
        code_dim=m.code_dim,
        codebook_size=m.codebook_size,
        teacher_dim=teacher_dim,
        ema_decay=m.ema_decay,
        kmeans_iters=m.kmeans_iters,
        dead_code_steps=m.dead_code_steps,
        **shape,
    )


@dataclass
class Loop:
    """The state the stage-1 loop carries from epoch to epoch."""

    cfg: VQKDConfig
    out: Path
    device: torch.device
    ddp: Distributed
    teacher: Teacher
    model: VQKD
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    metrics: MetricsWriter
    steps_per_epoch: int
    num_images: int
    step: int = 0
    bad_images: int = 0


def fit(cfg: VQKDConfig) -> tuple[dict[str, Any], VQKD]:
    """Run the training loop; returns the summary and the trained (unwrapped) model."""
    if not cfg.images:
        raise UserError("images is empty; pass images=<folder, tar shards or parquet files>")
    scale = cfg.train.crop_scale
    if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
        raise ConfigError(f"train.crop_scale={list(scale)}: pass [min, max] with 0 < min <= max")
    # the image sources are listed before the run starts (no out_dir yet, no teacher built)
    list_shards(cfg.images)
    if cfg.eval.images:
        list_shards(cfg.eval.images)
    start_time = time.perf_counter()
    with start_run(cfg) as run:
        loop, start_epoch = _start(run)
        last_eval = _train(loop, start_epoch)
        return _finish(loop, last_eval, start_time), loop.model


def _start(run: Run[VQKDConfig]) -> tuple[Loop, int]:
    """Build teacher, model, optimiser and metrics; resume from the checkpoint when asked.
    (start_run seeded torch: the same initial weights on every rank; DDP also broadcasts.)"""
    cfg, device, ddp, out = run.cfg, run.device, run.ddp, run.out
    if cfg.train.batch_size % ddp.world_size:
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by {ddp.world_size} "
            "processes; use a multiple of the process count"
        )
    side = cfg.model.image_size // cfg.model.patch_size
    teacher = load_teacher(
        cfg.teacher.name, cfg.teacher.weights or None, (side, side), cfg.teacher.input_size
    ).to(device)
    mcfg = model_config(cfg, teacher.dim)
    try:
        model = VQKD(mcfg, all_reduce=ddp.all_reduce, rank=ddp.rank).to(device)
    except ValueError as err:  # a shape the model cannot have: the config's mistake
        raise ConfigError(f"model.*: {err}") from None
    num_images = count_images(list_shards(cfg.images))
    if num_images == 0:
        raise UserError(f"no images found in {cfg.images!r}")
    steps_per_epoch = max(1, num_images // cfg.train.batch_size)
    t = cfg.train
    optimizer = adamw(
        param_groups(model, t.weight_decay), lr=cfg.lr, betas=t.betas, eps=t.eps, device=device
    )
    step, start_epoch, bad_images = 0, 0, 0
    checkpoint = out / CHECKPOINT
    if t.resume and checkpoint.exists():
        step, start_epoch, bad_images = _load_checkpoint(checkpoint, model, optimizer, mcfg, device)
        log.info("resumed from %s at epoch %d, step %d", checkpoint, start_epoch, step)
    elif t.resume:
        log.warning("train.resume=true but %s does not exist; starting from scratch", checkpoint)
    metrics = run.metrics(keep=(lambda r: r["step"] <= step) if step else None, resume_step=step)
    # Buffers (the codebook) are kept in sync by the quantiser's all-reduced statistics, not by
    # DDP broadcasting rank 0's copy, so a desynchronised codebook would show in tests.
    net = ddp.wrap(model, device, broadcast_buffers=False)
    total = steps_per_epoch * t.epochs
    warmup = int(round(t.warmup_epochs * steps_per_epoch))
    schedule = Schedule(cfg.lr, total, warmup, floor=t.min_lr)
    loop = Loop(cfg, out, device, ddp, teacher, model, net, optimizer, schedule, metrics,
                steps_per_epoch, num_images, step, bad_images)  # fmt: skip
    return loop, start_epoch


def _train(loop: Loop, start_epoch: int) -> dict[str, float]:
    """Epochs ``start_epoch..`` with a checkpoint after each; returns the last evaluation."""
    cfg, t = loop.cfg, loop.cfg.train
    aug = AugConfig(
        size=cfg.model.image_size, scale=t.crop_scale, flip=True, jitter=(), eval_seed0=False
    )
    rank_batch = t.batch_size // loop.ddp.world_size
    dataset = TrainViews(
        list_shards(cfg.images), aug, t.seed, loop.steps_per_epoch, rank_batch, loop.ddp.rank,
        loop.ddp.world_size,
    )  # fmt: skip
    eval_set = EvalSet(cfg.eval.images or cfg.images, cfg.eval.max_images, cfg.model.image_size)
    last_eval: dict[str, float] = {}
    bar = _progress(loop.steps_per_epoch * t.epochs, loop.step, disable=not loop.ddp.main)
    for epoch in range(start_epoch, t.epochs):
        loop.model.train()
        dataset.epoch = epoch
        loader = DataLoader(dataset, batch_size=None, num_workers=t.num_workers)
        sums = {"loss": 0.0, "rec_cosine": 0.0, "commit_loss": 0.0}
        for batch in loader:
            values = _step(loop, batch, epoch)
            for key in sums:
                sums[key] += values[key]
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}", cos=f"{values['rec_cosine']:.3f}")
        record: dict[str, Any] = {"kind": "epoch", "step": loop.step, "epoch": epoch}
        record.update({k: v / loop.steps_per_epoch for k, v in sums.items()})
        last_epoch = epoch == t.epochs - 1
        if last_epoch or (t.eval_every > 0 and (epoch + 1) % t.eval_every == 0):
            last_eval = evaluate(
                loop.model, loop.teacher, eval_set, loop.device, loop.ddp, t.precision
            )
            record.update({f"eval_{k}": v for k, v in last_eval.items()})
        record["bad_images"] = loop.bad_images
        if loop.ddp.main:
            loop.metrics.write(record)
            _save_checkpoint(
                loop.out / CHECKPOINT, loop.model, loop.optimizer, cfg, loop.step, epoch + 1,
                loop.bad_images,
            )  # fmt: skip
            log.info("epoch %d: %s", epoch, json.dumps(record))
        loop.ddp.barrier()
    bar.close()
    if not last_eval:  # resumed after the last epoch: evaluate what is there
        last_eval = evaluate(loop.model, loop.teacher, eval_set, loop.device, loop.ddp, t.precision)
    return last_eval


def _step(loop: Loop, batch: dict[str, Any], epoch: int) -> dict[str, float]:
    """One optimiser step; returns the rank-averaged losses (and logs them every log_every)."""
    t = loop.cfg.train
    lr = loop.schedule(loop.step)
    set_lr(loop.optimizer, lr)
    tic = time.perf_counter()
    views = to_unit(batch["views"]).to(loop.device, non_blocking=True)  # [B, 3, H, W]
    with autocast(t.precision, loop.device):
        with torch.no_grad():
            features = loop.teacher(views)  # [B, N, Dt]
        result = loop.net(views, features)
    loop.optimizer.zero_grad(set_to_none=True)
    result["loss"].backward()
    loop.optimizer.step()
    loop.step += 1
    loop.bad_images += int(batch["bad"])
    stacked = torch.stack(
        [result[k].detach().float() for k in ("loss", "rec_cosine", "commit_loss")]
    )
    loop.ddp.sum_(stacked)
    loss, cosine, commit = (stacked / loop.ddp.world_size).tolist()
    check_finite(loss, loop.step, epoch)
    values = {"loss": loss, "rec_cosine": cosine, "commit_loss": commit}
    if loop.ddp.main and (loop.step % t.log_every == 0 or loop.step == 1):
        loop.metrics.write(
            {
                "kind": "step",
                "step": loop.step,
                "epoch": epoch,
                **values,
                "lr": lr,
                "images_per_s": t.batch_size / (time.perf_counter() - tic),
            }
        )
    return values


def _finish(loop: Loop, last_eval: dict[str, float], start_time: float) -> dict[str, Any]:
    """Write the tokenizer and the plot (rank 0); the run's summary."""
    out = loop.out
    summary = {
        "checkpoint": str(out / CHECKPOINT),
        "tokenizer": str(out / TOKENIZER),
        "metrics": str(out / METRICS),
        "plot": str(out / PLOT),
        "config": str(out / "config.yaml"),
        "codebook_usage_fraction": last_eval.get("codebook_usage_fraction"),
        "perplexity": last_eval.get("perplexity"),
        "rec_cosine": last_eval.get("rec_cosine"),
        "precision": loop.cfg.train.precision,
        "steps": loop.step,
        "train_images": loop.num_images,
        "bad_images": loop.bad_images,
        "seconds": round(time.perf_counter() - start_time, 1),
    }
    loop.metrics.close()
    if loop.ddp.main:
        save_tokenizer(loop.model, out / TOKENIZER, extra={"teacher": loop.cfg.teacher.name})
        plot_metrics(out / METRICS, out / PLOT, PANELS)
    loop.ddp.barrier()
    return summary


@torch.no_grad()
def evaluate(
    model: VQKD,
    teacher: Teacher,
    eval_set: EvalSet,
    device: torch.device,
    ddp: Distributed,
    precision: str = "fp32",
) -> dict[str, float]:
    """Codebook usage (the fraction of codes used at least once, in [0, 1]), token perplexity
    and reconstruction cosine over the evaluation set, summed over ranks."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(model.config.codebook_size, dtype=torch.float64, device=device)
    cos_sum = torch.zeros((), dtype=torch.float64, device=device)
    images = torch.zeros((), dtype=torch.float64, device=device)
    with autocast(precision, device):
        for views, features in eval_set.batches(teacher, device, ddp.rank, ddp.world_size):
            result = model(views, features)
            counts += torch.bincount(result["tokens"].flatten(), minlength=counts.numel()).double()
            cos_sum += result["rec_cosine"].double() * views.shape[0]
            images += views.shape[0]
    for tensor in (counts, cos_sum, images):
        ddp.sum_(tensor)
    model.train(was_training)
    probs = counts / counts.sum().clamp(min=1)
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return {
        "codebook_usage_fraction": float((counts > 0).double().mean()),
        "perplexity": float(entropy.exp()),
        "rec_cosine": float(cos_sum / images.clamp(min=1)),
        "images": int(images),
    }


def _save_checkpoint(
    path: Path,
    model: VQKD,
    optimizer: torch.optim.Optimizer,
    cfg: VQKDConfig,
    step: int,
    next_epoch: int,
    bad_images: int,
) -> None:
    """The tokenizer file plus ``train_state`` (optimiser, RNG, counters); written atomically."""
    state = {
        "step": step,
        "epoch": next_epoch,
        "bad_images": bad_images,
        "optimizer": optimizer.state_dict(),
        "unused_steps": model.quantize.unused_steps.detach().cpu().clone(),
        "rng_cpu": torch.get_rng_state(),
        "run_config": to_dict(cfg),
    }
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state_all()
    save_tokenizer(model, path, extra={"teacher": cfg.teacher.name, "train_state": state})


def _load_checkpoint(
    path: Path,
    model: VQKD,
    optimizer: torch.optim.Optimizer,
    mcfg: VQKDModelConfig,
    device: torch.device,
) -> tuple[int, int, int]:
    """Restore weights, optimiser and RNG; return (step, next epoch, bad images so far)."""
    ckpt = load_file(path)
    if ckpt.get("config") != asdict(mcfg):
        raise UserError(
            f"{path} was trained with model config {ckpt.get('config')}, this run asks for "
            f"{asdict(mcfg)}; resume with the same model settings or use a new out_dir"
        )
    state = ckpt.get("train_state")
    if not isinstance(state, dict):
        raise UserError(f"{path} has no training state; it is a tokenizer, not a checkpoint")
    result = model.load_state_dict(ckpt["model"], strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"quantize.unused_steps"}:
        raise UserError(f"{path} does not fit the model: {result}")
    model.quantize.unused_steps.copy_(state["unused_steps"].to(device))
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    if "rng_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["step"]), int(state["epoch"]), int(state.get("bad_images", 0))


def _progress(total: int, initial: int, disable: bool) -> Any:
    return tqdm(total=total, initial=initial, desc="vqkd", unit="step", disable=disable)
