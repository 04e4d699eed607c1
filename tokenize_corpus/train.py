"""Stage 1: train a VQ-KD tokenizer by distilling a frozen teacher (docs/method.md §1).

``pipeline run stage=vqkd images=<source> [preset=demo] ...`` runs :func:`vqkd`. One process or
``torchrun --nproc_per_node N`` (DDP; gloo on CPU, nccl on GPUs). Outputs in ``out_dir``:
``config.yaml`` (first), ``checkpoint.pth`` (after every epoch, atomic; weights in the official
tokenizer layout plus the optimiser state under ``train_state``), ``tokenizer.pth`` (the final
tokenizer for stage 2), ``metrics.jsonl`` and ``metrics.png``.

Data order is a pure function of (seed, epoch): image shards are permuted per epoch, split over
(rank, DataLoader worker) slots, shuffled in a buffer by a seeded generator, and every view's
crop/flip comes from :func:`shards.views.sample_view` keyed by (image key, epoch). So
``train.resume=true`` restarts at the last finished epoch and reproduces the uninterrupted run
step for step. An epoch has ``images // batch_size`` steps; a slot that runs out of images
before its share of steps cycles through its shards again (new view seeds), which keeps every
rank at the same step count even when shards differ in size or hold bad images.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

from engine.config import save_config, to_dict
from shards.decode import BadImage, decode_image
from shards.images import BadShard, ImageShard, iter_shard, list_shards
from shards.views import AugConfig, render_view, sample_view, to_unit
from tokenize_corpus.config import VQKDConfig
from tokenize_corpus.teachers import Teacher, load_teacher
from tokenize_corpus.tokenizer import save_tokenizer
from tokenize_corpus.vqkd import VQKD, VQKD_SIZES, VQKDModelConfig

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pth"
TOKENIZER = "tokenizer.pth"
METRICS = "metrics.jsonl"
PLOT = "metrics.png"
SHUFFLE_BUFFER = 512
# Eval views and teacher features are kept in memory between passes up to this many images.
EVAL_CACHE_IMAGES = 4096


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


def fit(cfg: VQKDConfig) -> tuple[dict[str, Any], VQKD]:
    """Run the training loop; returns the summary and the trained (unwrapped) model."""
    if not cfg.images:
        raise ValueError("images is empty; pass images=<folder, tar shards or parquet files>")
    start_time = time.perf_counter()
    out = Path(cfg.out_dir)
    rank, world, device = _setup_distributed(cfg.train.device)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    if cfg.train.batch_size % world:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by {world} processes"
        )
    rank_batch = cfg.train.batch_size // world

    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts)
    teacher = load_teacher(
        cfg.teacher.name, cfg.teacher.weights or None, _grid(cfg), cfg.teacher.input_size
    ).to(device)
    mcfg = model_config(cfg, teacher.dim)
    model = VQKD(mcfg, all_reduce=dist.all_reduce if world > 1 else None, rank=rank).to(device)

    shards = list_shards(cfg.images)
    num_images = _count_images(shards)
    if num_images == 0:
        raise ValueError(f"no images found in {cfg.images!r}")
    steps_per_epoch = max(1, num_images // cfg.train.batch_size)
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup_steps = int(round(cfg.train.warmup_epochs * steps_per_epoch))
    optimizer = _optimizer(model, cfg)

    step, start_epoch, bad_images = 0, 0, 0
    checkpoint = out / CHECKPOINT
    if cfg.train.resume and checkpoint.exists():
        step, start_epoch, bad_images = _load_checkpoint(checkpoint, model, optimizer, mcfg, device)
        log.info("resumed from %s at epoch %d, step %d", checkpoint, start_epoch, step)
    elif cfg.train.resume:
        log.warning("train.resume=true but %s does not exist; starting from scratch", checkpoint)
    if rank == 0:
        _truncate_metrics(out / METRICS, step)

    net: torch.nn.Module = model
    if world > 1:
        # Buffers (the codebook) are kept in sync by the quantiser's all-reduced statistics, not
        # by DDP broadcasting rank 0's copy, so a desynchronised codebook would show in tests.
        net = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
        )

    aug = AugConfig(
        size=mcfg.image_size, scale=cfg.train.crop_scale, flip=True, jitter=(), eval_seed0=False
    )
    dataset = TrainViews(shards, aug, cfg.train.seed, steps_per_epoch, rank_batch, rank, world)
    eval_set = EvalSet(cfg.eval.images or cfg.images, cfg.eval.max_images, mcfg.image_size)
    autocast = device.type == "cuda"
    last_eval: dict[str, float] = {}
    bar = _progress(total_steps, step, disable=rank != 0)
    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        dataset.epoch = epoch
        loader = DataLoader(dataset, batch_size=None, num_workers=cfg.train.num_workers)
        sums = {"loss": 0.0, "rec_cosine": 0.0, "commit_loss": 0.0}
        for batch in loader:
            lr = _lr_at(step, total_steps, warmup_steps, cfg.train.lr, cfg.train.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            tic = time.perf_counter()
            views = to_unit(batch["views"]).to(device, non_blocking=True)  # [B, 3, H, W]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                features = teacher(views)  # [B, N, Dt]
                result = net(views, features)
            optimizer.zero_grad(set_to_none=True)
            result["loss"].backward()
            optimizer.step()
            step += 1
            bad_images += int(batch["bad"])
            values = _mean_over_ranks(
                [result["loss"], result["rec_cosine"], result["commit_loss"]], world
            )
            for key, value in zip(sums, values, strict=True):
                sums[key] += value
            bar.update(1)
            bar.set_postfix(loss=f"{values[0]:.4f}", cos=f"{values[1]:.3f}")
            if rank == 0 and (step % cfg.train.log_every == 0 or step == 1):
                _append(
                    out / METRICS,
                    {
                        "kind": "step",
                        "step": step,
                        "epoch": epoch,
                        "loss": values[0],
                        "rec_cosine": values[1],
                        "commit_loss": values[2],
                        "lr": lr,
                        "images_per_s": cfg.train.batch_size / (time.perf_counter() - tic),
                    },
                )
        record: dict[str, Any] = {"kind": "epoch", "step": step, "epoch": epoch}
        record.update({k: v / steps_per_epoch for k, v in sums.items()})
        last_epoch = epoch == cfg.train.epochs - 1
        if last_epoch or (cfg.train.eval_every > 0 and (epoch + 1) % cfg.train.eval_every == 0):
            last_eval = evaluate(model, teacher, eval_set, device, rank, world)
            record.update({f"eval_{k}": v for k, v in last_eval.items()})
        record["bad_images"] = bad_images
        if rank == 0:
            _append(out / METRICS, record)
            _save_checkpoint(checkpoint, model, optimizer, cfg, step, epoch + 1, bad_images)
            log.info("epoch %d: %s", epoch, json.dumps(record))
        if world > 1:
            dist.barrier()
    bar.close()

    if not last_eval:  # resumed after the last epoch: evaluate what is there
        last_eval = evaluate(model, teacher, eval_set, device, rank, world)
    summary = {
        "checkpoint": str(checkpoint),
        "tokenizer": str(out / TOKENIZER),
        "metrics": str(out / METRICS),
        "plot": str(out / PLOT),
        "config": str(out / "config.yaml"),
        "codebook_usage": last_eval.get("codebook_usage"),
        "perplexity": last_eval.get("perplexity"),
        "rec_cosine": last_eval.get("rec_cosine"),
        "steps": step,
        "train_images": num_images,
        "bad_images": bad_images,
        "seconds": round(time.perf_counter() - start_time, 1),
    }
    if rank == 0:
        save_tokenizer(model, out / TOKENIZER, extra={"teacher": cfg.teacher.name})
        plot_metrics(out / METRICS, out / PLOT)
    if world > 1:
        dist.barrier()
    return summary, model


class TrainViews(IterableDataset):
    """Training views in batches: ``{"views": uint8 [B, 3, S, S], "bad": int}`` per step.

    Set :attr:`epoch` before iterating. Worker ``w`` of ``num_workers`` produces the batches of
    steps ``w, w + num_workers, ...`` so the DataLoader's in-order round robin yields steps in
    order; what each batch holds depends only on (seed, epoch, rank, world, num_workers).
    """

    def __init__(
        self,
        shards: list[ImageShard],
        aug: AugConfig,
        seed: int,
        steps: int,
        batch_size: int,
        rank: int,
        world: int,
    ) -> None:
        super().__init__()
        self.shards, self.aug, self.seed = shards, aug, seed
        self.steps, self.batch_size, self.rank, self.world = steps, batch_size, rank, world
        self.epoch = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, slots = self.rank * workers + worker, self.world * workers
        my_steps = len(range(worker, self.steps, workers))
        views: list[torch.Tensor] = []
        bad = 0
        stream = self._views(slot, slots)
        for _ in range(my_steps):
            while len(views) < self.batch_size:
                item = next(stream)
                if item is None:
                    bad += 1
                else:
                    views.append(item)
            yield {"views": torch.stack(views), "bad": bad}
            views, bad = [], 0

    def _views(self, slot: int, slots: int) -> Iterator[torch.Tensor | None]:
        """This slot's views for the epoch, cycling with fresh view seeds; None = a bad image."""
        for cycle in range(1_000_000):
            seed = self.seed * 1_000_003 + self.epoch * 1_009 + cycle
            rng = np.random.default_rng([self.seed, self.epoch, cycle, slot])
            good = 0
            for record in _shuffled(self._records(slot, slots, cycle), rng):
                if record.error:
                    log.warning("skipping %s: %s", record.key, record.error)
                    yield None
                    continue
                try:
                    image = decode_image(record.data)
                except BadImage as err:
                    log.warning("skipping %s: %s", record.key, err)
                    yield None
                    continue
                params = sample_view(self.aug, record.key, seed, image.width, image.height)
                good += 1
                yield render_view(image, params)  # uint8 [3, S, S]
            if good == 0:
                raise ValueError(
                    f"slot {slot}: no decodable images among the shards it reads; check images="
                )
        raise RuntimeError("unreachable")

    def _records(self, slot: int, slots: int, cycle: int) -> Iterator[Any]:
        order = np.random.default_rng([self.seed, self.epoch, cycle]).permutation(len(self.shards))
        ordered = [self.shards[i] for i in order]
        if len(ordered) >= slots:  # whole shards per slot: each slot reads only its own
            yield from _read_shards(ordered[slot::slots])
            return
        # fewer shards than slots: every slot reads them all and keeps every slots-th record
        for i, record in enumerate(_read_shards(ordered)):
            if i % slots == slot:
                yield record


def _read_shards(shards: list[ImageShard]) -> Iterator[Any]:
    for shard in shards:
        try:
            yield from iter_shard(shard)
        except BadShard as err:
            log.warning(
                "image shard %s is damaged (%s); using the records read before", shard.url, err
            )


def _shuffled(items: Iterator[Any], rng: np.random.Generator) -> Iterator[Any]:
    """A seeded shuffle buffer: memory bounded by SHUFFLE_BUFFER, order fixed by ``rng``."""
    buffer: list[Any] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= SHUFFLE_BUFFER:
            yield buffer.pop(int(rng.integers(len(buffer))))
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))


class EvalSet:
    """Centre-crop evaluation views of the first ``max_images`` decodable images of a source.

    Views and teacher features are cached after the first pass when they are few enough.
    """

    def __init__(self, images: str, max_images: int, size: int) -> None:
        self.images, self.max_images, self.size = images, max_images, size
        self.aug = AugConfig(size=size, eval_seed0=True)
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def views(self, rank: int, world: int, batch_size: int) -> Iterator[torch.Tensor]:
        """uint8 ``[B, 3, S, S]`` batches of this rank's share (image i goes to rank i % world)."""
        batch: list[torch.Tensor] = []
        index = 0
        for record in _read_shards(list_shards(self.images)):
            if self.max_images and index >= self.max_images:
                break
            if record.error:
                continue
            try:
                image = decode_image(record.data)
            except BadImage:
                continue
            if index % world == rank:
                params = sample_view(self.aug, record.key, 0, image.width, image.height)
                batch.append(render_view(image, params))
            index += 1
            if len(batch) == batch_size:
                yield torch.stack(batch)
                batch = []
        if batch:
            yield torch.stack(batch)

    def batches(
        self, teacher: Teacher, device: torch.device, rank: int, world: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(views in [0, 1], teacher features)`` on ``device``."""
        if self._cache is not None:
            for views, features in self._cache:
                yield to_unit(views).to(device), features.to(device)
            return
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        for views in self.views(rank, world, batch_size=64):
            unit = to_unit(views).to(device)
            features = teacher(unit)  # [B, N, Dt]
            if self.max_images and self.max_images <= EVAL_CACHE_IMAGES:
                cache.append((views, features.cpu()))
            yield unit, features
        if self.max_images and self.max_images <= EVAL_CACHE_IMAGES:
            self._cache = cache


@torch.no_grad()
def evaluate(
    model: VQKD, teacher: Teacher, eval_set: EvalSet, device: torch.device, rank: int, world: int
) -> dict[str, float]:
    """Codebook usage (% of codes used at least once), perplexity and reconstruction cosine."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(model.config.codebook_size, dtype=torch.float64, device=device)
    cos_sum = torch.zeros((), dtype=torch.float64, device=device)
    images = torch.zeros((), dtype=torch.float64, device=device)
    for views, features in eval_set.batches(teacher, device, rank, world):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            result = model(views, features)
        counts += torch.bincount(result["tokens"].flatten(), minlength=counts.numel()).double()
        cos_sum += result["rec_cosine"].double() * views.shape[0]
        images += views.shape[0]
    if world > 1:
        for tensor in (counts, cos_sum, images):
            dist.all_reduce(tensor)
    model.train(was_training)
    probs = counts / counts.sum().clamp(min=1)
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return {
        "codebook_usage": float((counts > 0).double().mean() * 100),
        "perplexity": float(entropy.exp()),
        "rec_cosine": float(cos_sum / images.clamp(min=1)),
        "images": int(images),
    }


def plot_metrics(metrics: Path, path: Path) -> Path:
    """Draw loss, reconstruction cosine, commitment, lr and codebook usage/perplexity to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    panels = [
        ("loss", "loss"),
        ("rec_cosine", "reconstruction cosine"),
        ("commit_loss", "commitment loss"),
        ("lr", "learning rate"),
    ]
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        ax.plot([r["step"] for r in steps], [r[key] for r in steps], label="step")
        if key != "lr":
            ax.plot([r["step"] for r in epochs], [r[key] for r in epochs], "o-", label="epoch mean")
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("step")
    evals = [r for r in epochs if "eval_codebook_usage" in r]
    for ax, key, title in (
        (axes.flat[4], "eval_codebook_usage", "codebook usage (eval, %)"),
        (axes.flat[5], "eval_perplexity", "token perplexity (eval)"),
    ):
        ax.plot([r["epoch"] + 1 for r in evals], [r[key] for r in evals], "o-")
        ax.set_title(title)
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _grid(cfg: VQKDConfig) -> tuple[int, int]:
    side = cfg.model.image_size // cfg.model.patch_size
    return (side, side)


def _setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when launched with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _count_images(shards: list[ImageShard]) -> int:
    """Records that are images (folder shards know their keys; tars/parquet are read once)."""
    total = 0
    for shard in shards:
        if shard.kind == "folder":
            total += len(shard.keys)
        else:
            total += sum(1 for record in _read_shards([shard]) if not record.error)
    return total


def _optimizer(model: VQKD, cfg: VQKDConfig) -> torch.optim.AdamW:
    # No weight decay on biases, norms and embeddings (the reference's timm optimiser factory).
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.ndim <= 1 or name.endswith(("pos_embed", "cls_token"))
        (no_decay if skip else decay).append(param)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.train.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.train.lr,
        betas=tuple(cfg.train.betas),
        eps=cfg.train.eps,
    )


def _lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warmup to ``peak`` then cosine to ``floor`` (per step)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def _mean_over_ranks(values: list[torch.Tensor], world: int) -> list[float]:
    stacked = torch.stack([v.detach().float() for v in values])
    if world > 1:
        dist.all_reduce(stacked)
        stacked /= world
    return stacked.tolist()


def _save_checkpoint(
    path: Path,
    model: VQKD,
    optimizer: torch.optim.Optimizer,
    cfg: VQKDConfig,
    step: int,
    next_epoch: int,
    bad_images: int,
) -> None:
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
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("config") != asdict(mcfg):
        raise ValueError(
            f"{path} was trained with model config {ckpt.get('config')}, this run asks for "
            f"{asdict(mcfg)}; resume with the same model settings or use a new out_dir"
        )
    state = ckpt.get("train_state")
    if not isinstance(state, dict):
        raise ValueError(f"{path} has no training state; it is a tokenizer, not a checkpoint")
    result = model.load_state_dict(ckpt["model"], strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"quantize.unused_steps"}:
        raise ValueError(f"{path} does not fit the model: {result}")
    model.quantize.unused_steps.copy_(state["unused_steps"].to(device))
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    if "rng_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["step"]), int(state["epoch"]), int(state.get("bad_images", 0))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records past ``step`` (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(f"{line}\n" for line in keep))


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _progress(total: int, initial: int, disable: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="vqkd", unit="step", disable=disable)
