"""Full fine-tuning of a backbone on labelled images (docs/method.md §5, the BEiT v2 recipe, simplified).

``pipeline run stage=finetune backbone=<checkpoint|exported file|random> images=<labelled images>``

* **Model.** timm's ``Beit`` in its fine-tuning form: per-block relative position tables (the
  shared pretraining table is *copied into every block*, as the reference fine-tuning does, via
  ``pretrain.export.backbone_state_dict``), mean-pooled patch tokens -> a fresh LayerNorm
  (``fc_norm``) -> a linear head initialised x0.001 (timm's ``head_init_scale``), drop path.
* **Optimisation.** AdamW with layer-wise lr decay (0.65: block l of L gets lr * 0.65^(L - l),
  the patch embedding 0.65^(L + 1); timm's ``param_groups_layer_decay``), weight decay 0.05 except
  biases/norms/tables, linear warmup then cosine per step, cross-entropy with label smoothing 0.1.
  Optional: mixup/cutmix (timm ``Mixup``) and RandAugment (torchvision), off by default.
* **Data.** Encoded images are held in memory (the demo and benchmark sets are small) and decoded
  per sample; training views are random-resized crops + flips from ``shards.views`` (deterministic
  in (seed, epoch, key)), evaluation views the centre crop of the linear probe. Validation as the
  linear probe: ``images_val=`` or a key-hash split of ``images``.

Writes ``config.yaml``, ``metrics.jsonl`` (one line per epoch: loss, top1, top5, lr, seconds),
``finetuned.pth`` (the timm state dict) and ``results.json``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader
from torchvision.transforms import RandAugment
from tqdm import tqdm

from engine.checkpoint import save_atomic
from engine.errors import ConfigError, UserError
from engine.guards import check_finite
from engine.optim import set_lr
from engine.precision import autocast
from engine.schedule import Schedule
from engine.start import Run, start_run
from pretrain.backbones import build_timm_beit, timm_state_dict
from pretrain.checkpoints import infer_beit_shape
from pretrain.errors import BackboneError
from pretrain.eval_config import FinetuneConfig
from pretrain.evaluation import (
    check_inputs,
    eval_views,
    key_in_val,
    topk_hits,
    topk_scores,
    write_results,
)
from shards.decode import BadImage, decode_image
from shards.images import iter_shard, list_shards
from shards.records import BadShard
from shards.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugConfig,
    normalize,
    render_view,
    sample_view,
    to_unit,
)

log = logging.getLogger(__name__)

Record = tuple[str, bytes, int]  # (key, encoded image, label)


def finetune_state(cfg: FinetuneConfig) -> dict:
    """The backbone's weights in timm's per-block-table layout (shared table copied per block)."""
    return timm_state_dict(cfg.backbone, cfg.random_init)


def build_model(state: dict, num_classes: int, drop_path: float) -> torch.nn.Module:
    """timm ``Beit`` (avg pool + fc_norm + head x0.001) with ``state`` loaded."""
    shape = infer_beit_shape(state)
    model = build_timm_beit(
        shape,
        num_classes=num_classes,
        drop_path=drop_path,
        global_pool="avg",
        use_fc_norm=True,
        head_init_scale=0.001,
    )
    kept = {k: v for k, v in state.items() if not k.startswith("norm.")}  # mean pool: fc_norm
    missing, unexpected = model.load_state_dict(kept, strict=False)
    fresh = ("head.", "fc_norm.")
    missing = [k for k in missing if not k.startswith(fresh) and "relative_position_index" not in k]
    if missing or unexpected:
        raise BackboneError(
            f"backbone does not fit {shape}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model


class _Images:
    """Labelled encoded images in memory -> (view, label) for one epoch."""

    def __init__(self, records: list[Record], size: int, train: bool, cfg: FinetuneConfig) -> None:
        self.records, self.size, self.train, self.cfg = records, size, train, cfg
        self.epoch = 0
        self.randaugment = (
            RandAugment(num_ops=2, magnitude=9) if train and cfg.randaugment else None
        )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        key, data, label = self.records[i]
        image = decode_image(data)
        if not self.train:
            return eval_views(image, key, self.size), label
        aug = AugConfig(size=self.size, scale=self.cfg.crop_scale, jitter=())
        # view seed from (run seed, epoch): a new crop every epoch, reproducible
        seed = self.cfg.train.seed * 100_003 + self.epoch
        view = render_view(image, sample_view(aug, key, seed, image.width, image.height))
        if self.randaugment is not None:
            digest = hashlib.sha256(f"{key}/{seed}".encode()).digest()
            torch.manual_seed(int.from_bytes(digest[:4], "little"))
            view = self.randaugment(view)
        return view, label  # uint8 [3, S, S]


@dataclass
class Loop:
    """The state the fine-tuning loop carries from epoch to epoch."""

    cfg: FinetuneConfig
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: Schedule
    train_set: _Images
    loader: DataLoader
    mixup: Mixup | None  # None when mixup and cutmix are both off
    step: int = 0
    lr: float = 0.0  # the rate of the last step


def labelled_records(images: str, shard_size: int) -> list[Record]:
    """The labelled images of ``images`` that decode (each is decoded once here, so a bad one
    is skipped and counted rather than failing a DataLoader worker mid-epoch)."""
    out, bad = [], 0
    for shard in list_shards(images, shard_size=shard_size):
        try:
            for r in iter_shard(shard):
                if r.error or r.label < 0:
                    continue
                try:
                    decode_image(r.data)
                except BadImage:
                    bad += 1
                    continue
                out.append((r.key, r.data, r.label))
        except BadShard as err:  # the records read before the damage are kept
            log.warning("%s: %s; the rest of this shard is skipped", shard.url, err)
    if bad:
        log.warning("%s: %d image(s) that do not decode are skipped", images, bad)
    if not out:
        raise UserError(f"no labelled images in {images!r}; give an ImageFolder or labelled shards")
    return out


def evaluate(
    model: torch.nn.Module, loader: DataLoader, device: torch.device, precision: str = "fp32"
) -> dict[str, float]:
    """Top-1 (%) over ``loader`` (uint8 views, ImageNet normalisation), and top-5 (%) when the
    model has more than 5 classes (``pretrain.evaluation.topk_scores``)."""
    model.eval()
    hits1 = hits5 = n = classes = 0
    with torch.inference_mode(), autocast(precision, device):
        for views, labels in loader:
            x = normalize(to_unit(views.to(device)), IMAGENET_MEAN, IMAGENET_STD)
            logits = model(x)  # [B, C]
            classes = logits.shape[1]
            top1, top5 = topk_hits(logits, labels)
            hits1, hits5, n = hits1 + top1, hits5 + top5, n + len(labels)
    return topk_scores(hits1, hits5, n, classes)


def _loaders(
    cfg: FinetuneConfig, size: int, train_recs: list[Record], val_recs: list[Record]
) -> tuple[_Images, DataLoader, DataLoader]:
    """(train set, train loader, val loader): shuffled by a generator seeded from train.seed."""
    t = cfg.train
    train_set = _Images(train_recs, size, True, cfg)
    train_loader = DataLoader(
        train_set,
        batch_size=t.batch_size,
        shuffle=True,
        drop_last=len(train_recs) >= t.batch_size,
        num_workers=t.num_workers,
        generator=torch.Generator().manual_seed(t.seed),
    )
    val_loader = DataLoader(
        _Images(val_recs, size, False, cfg), batch_size=t.batch_size, num_workers=t.num_workers
    )
    return train_set, train_loader, val_loader


def _split(cfg: FinetuneConfig) -> tuple[list[Record], list[Record], int]:
    """(train records, val records, number of classes)."""
    records = labelled_records(cfg.images, cfg.shard_size)
    if cfg.images_val:
        train_recs, val_recs = records, labelled_records(cfg.images_val, cfg.shard_size)
    else:
        train_recs = [r for r in records if not key_in_val(r[0], cfg.val_fraction)]
        val_recs = [r for r in records if key_in_val(r[0], cfg.val_fraction)]
    if not train_recs or not val_recs:
        raise UserError(
            f"empty train or val split ({len(train_recs)}/{len(val_recs)} images); use more "
            "images, another val_fraction, or images_val="
        )
    return train_recs, val_recs, 1 + max(r[2] for r in train_recs + val_recs)


def _train_epoch(loop: Loop, epoch: int) -> float:
    """One epoch of fine-tuning; returns the mean training loss."""
    t, device = loop.cfg.train, loop.device
    loop.model.train()
    loop.train_set.epoch = epoch
    losses = []
    for views, labels in tqdm(loop.loader, desc=f"finetune {epoch + 1}/{t.epochs}", disable=None):
        loop.lr = loop.schedule(loop.step)
        set_lr(loop.optimizer, loop.lr)  # times each group's layer-decay lr_scale
        x = normalize(to_unit(views.to(device)), IMAGENET_MEAN, IMAGENET_STD)  # [B, 3, S, S]
        y = labels.to(device)
        with autocast(t.precision, device):
            if loop.mixup is not None:
                x, y_soft = loop.mixup(x, y)
                logits = loop.model(x).float()
                loss = torch.sum(-y_soft * F.log_softmax(logits, dim=-1), dim=-1).mean()
            else:
                logits = loop.model(x).float()
                loss = F.cross_entropy(logits, y, label_smoothing=t.label_smoothing)
        loop.optimizer.zero_grad(set_to_none=True)
        loop.scaler.scale(loss).backward()
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
        loop.step += 1
        losses.append(loss.item())
        check_finite(losses[-1], loop.step, epoch)
    return sum(losses) / max(1, len(losses))


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune ``cfg.backbone`` on ``cfg.images``; returns the final accuracies."""
    scale = cfg.crop_scale
    if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
        raise ConfigError(f"crop_scale={list(scale)}: pass [min, max] with 0 < min <= max")
    check_inputs(cfg)
    start = time.perf_counter()
    with start_run(cfg, data_parallel=False) as run:
        return _fit(run, start)


def _fit(run: Run[FinetuneConfig], start: float) -> dict:
    """Data, model, optimiser, the epochs; finetuned.pth and results.json."""
    cfg, device, out = run.cfg, run.device, run.out
    t = cfg.train
    train_recs, val_recs, num_classes = _split(cfg)
    model = build_model(finetune_state(cfg), num_classes, cfg.drop_path).to(device)
    train_set, loader, val_loader = _loaders(
        cfg, model.patch_embed.img_size[0], train_recs, val_recs
    )
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = create_optimizer_v2(
        model, opt="adamw", lr=cfg.lr, weight_decay=t.weight_decay, layer_decay=t.layer_decay,
        **fast,
    )  # fmt: skip
    steps = len(loader)
    loop = Loop(
        cfg, device, model, optimizer,
        scaler=torch.amp.GradScaler(device.type, enabled=run.precision == "fp16"),
        schedule=Schedule(cfg.lr, t.epochs * steps, t.warmup_epochs * steps, floor=t.min_lr),
        train_set=train_set, loader=loader, mixup=_mixup(cfg, num_classes),
    )  # fmt: skip
    scores: dict[str, float] = {}
    with run.metrics() as metrics:
        for epoch in range(t.epochs):
            epoch_start = time.perf_counter()
            loss = _train_epoch(loop, epoch)
            scores = evaluate(model, val_loader, device, run.precision)
            record = {"kind": "epoch", "epoch": epoch, "step": loop.step, "loss": loss, **scores}
            record |= {"lr": loop.lr, "seconds": round(time.perf_counter() - epoch_start, 2)}
            metrics.write(record)
            log.info("finetune epoch %d: loss %.4f top1 %.2f%%", epoch + 1, loss, scores["top1"])
    save_atomic(model.state_dict(), out / "finetuned.pth")
    results = {
        **{k: round(v, 2) for k, v in scores.items()},
        "backbone": cfg.backbone,
        "precision": run.precision,
        "num_classes": num_classes,
        "num_train": len(train_recs),
        "num_val": len(val_recs),
        "epochs": t.epochs,
        "checkpoint": str(out / "finetuned.pth"),
        "metrics": str(out / "metrics.jsonl"),
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_results(out, results)
    return results


def _mixup(cfg: FinetuneConfig, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix with label smoothing, or None when both are off."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        label_smoothing=cfg.train.label_smoothing,
        num_classes=num_classes,
    )
