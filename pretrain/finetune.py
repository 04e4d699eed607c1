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
import json
import logging
import time
from pathlib import Path
from typing import Any

from engine.checkpoint import save_atomic, write_bytes_atomic
from pretrain.eval_config import FinetuneConfig, FinetuneTrain

__all__ = ["FinetuneConfig", "FinetuneTrain", "build_model", "finetune", "finetune_state"]

log = logging.getLogger(__name__)


def finetune_state(cfg: FinetuneConfig) -> dict:
    """The backbone's weights in timm's per-block-table layout (shared table copied per block)."""
    from pretrain.backbones import timm_state_dict

    return timm_state_dict(cfg.backbone, cfg.random_init)


def build_model(state: dict, num_classes: int, drop_path: float) -> Any:
    """timm ``Beit`` (avg pool + fc_norm + head x0.001) with ``state`` loaded."""
    from pretrain.backbones import build_timm_beit as timm_backbone
    from pretrain.backbones import infer_beit_shape

    shape = infer_beit_shape(state)
    model = timm_backbone(
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
        raise ValueError(
            f"backbone does not fit {shape}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model


class _Images:
    """Labelled encoded images in memory -> (view, label) for one epoch."""

    def __init__(self, records: list, size: int, train: bool, cfg: FinetuneConfig) -> None:
        self.records, self.size, self.train, self.cfg = records, size, train, cfg
        self.epoch = 0
        self.randaugment = None
        if train and cfg.randaugment:
            from torchvision.transforms import RandAugment

            self.randaugment = RandAugment(num_ops=2, magnitude=9)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        import torch

        from pretrain.linprobe import eval_views
        from shards.decode import decode_image
        from shards.views import AugConfig, render_view, sample_view

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


def _records(images: str, shard_size: int) -> list[tuple[str, bytes, int]]:
    from shards.images import iter_shard, list_shards

    out = []
    for shard in list_shards(images, shard_size=shard_size):
        out.extend(
            (r.key, r.data, r.label) for r in iter_shard(shard) if not r.error and r.label >= 0
        )
    if not out:
        raise ValueError(
            f"no labelled images in {images!r}; give an ImageFolder or labelled shards"
        )
    return out


def evaluate(model: Any, loader: Any, device: Any, precision: str = "fp32") -> dict[str, float]:
    """Top-1 (%) over ``loader`` (uint8 views, ImageNet normalisation), and top-5 (%) when the
    model has more than 5 classes (with 5 or fewer it is 100% by construction)."""
    import torch

    from engine.precision import autocast
    from shards.views import IMAGENET_MEAN, IMAGENET_STD, normalize, to_unit

    model.eval()
    right1 = right5 = n = 0
    classes = 0
    with torch.inference_mode(), autocast(precision, device):
        for views, labels in loader:
            x = normalize(to_unit(views.to(device)), IMAGENET_MEAN, IMAGENET_STD)
            logits = model(x)  # [B, C]
            classes = logits.shape[1]
            top = logits.topk(min(5, classes), dim=1).indices.cpu()
            right1 += int((top[:, 0] == labels).sum())
            right5 += int((top == labels[:, None]).any(dim=1).sum())
            n += len(labels)
    scores = {"top1": 100 * right1 / max(n, 1)}
    if classes > 5:
        scores["top5"] = 100 * right5 / max(n, 1)
    return scores


def _loaders(cfg: FinetuneConfig, size: int, train_recs: list, val_recs: list) -> tuple:
    """(train set, train loader, val loader): shuffled by a generator seeded from train.seed."""
    import torch
    from torch.utils.data import DataLoader

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


def _split(cfg: FinetuneConfig) -> tuple[list, list, int]:
    """(train records, val records, number of classes)."""
    from engine.errors import UserError
    from pretrain.linprobe import key_in_val

    records = _records(cfg.images, cfg.shard_size)
    if cfg.images_val:
        train_recs, val_recs = records, _records(cfg.images_val, cfg.shard_size)
    else:
        train_recs = [r for r in records if not key_in_val(r[0], cfg.val_fraction)]
        val_recs = [r for r in records if key_in_val(r[0], cfg.val_fraction)]
    if not train_recs or not val_recs:
        raise UserError(
            f"empty train or val split ({len(train_recs)}/{len(val_recs)} images); use more "
            "images, another val_fraction, or images_val="
        )
    return train_recs, val_recs, 1 + max(r[2] for r in train_recs + val_recs)


def _train_epoch(run: dict[str, Any], epoch: int) -> float:
    """One epoch of fine-tuning; returns the mean training loss."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from engine.guards import check_finite
    from engine.optim import set_lr
    from engine.precision import autocast
    from shards.views import IMAGENET_MEAN, IMAGENET_STD, normalize, to_unit

    cfg, model, optimizer, device = run["cfg"], run["model"], run["optimizer"], run["device"]
    t = cfg.train
    model.train()
    run["train_set"].epoch = epoch
    losses = []
    for views, labels in tqdm(run["loader"], desc=f"finetune {epoch + 1}/{t.epochs}", disable=None):
        run["lr"] = run["schedule"](run["step"])
        set_lr(optimizer, run["lr"])  # times each group's layer-decay lr_scale
        x = normalize(to_unit(views.to(device)), IMAGENET_MEAN, IMAGENET_STD)  # [B, 3, S, S]
        y = labels.to(device)
        with autocast(t.precision, device):
            if run["mixup"] is not None:
                x, y_soft = run["mixup"](x, y)
                logits = model(x).float()
                loss = torch.sum(-y_soft * F.log_softmax(logits, dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(model(x).float(), y, label_smoothing=t.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        run["scaler"].scale(loss).backward()
        run["scaler"].step(optimizer)
        run["scaler"].update()
        run["step"] += 1
        losses.append(loss.item())
        check_finite(losses[-1], run["step"], epoch)
    return sum(losses) / max(1, len(losses))


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune ``cfg.backbone`` on ``cfg.images``; returns the final accuracies."""
    import dataclasses

    import torch
    from timm.optim import create_optimizer_v2

    from engine.config import save_config, to_dict
    from engine.device import resolve_device
    from engine.errors import UserError
    from engine.metrics import MetricsWriter
    from engine.precision import resolve_precision
    from engine.schedule import Schedule

    if not cfg.images:
        raise UserError("no labelled images given; pass images=<folder, shards or parquet>")
    start = time.perf_counter()
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    t, out = cfg.train, Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    torch.manual_seed(t.seed)
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
    run: dict[str, Any] = {
        "cfg": cfg, "model": model, "optimizer": optimizer, "device": device, "step": 0,
        "train_set": train_set, "loader": loader, "mixup": _mixup(cfg, num_classes),
        "schedule": Schedule(cfg.lr, t.epochs * steps, t.warmup_epochs * steps, floor=t.min_lr),
        "scaler": torch.amp.GradScaler(device.type, enabled=precision == "fp16"), "lr": 0.0,
    }  # fmt: skip
    scores: dict[str, float] = {}
    with MetricsWriter(out, cfg.log, config=to_dict(cfg)) as metrics:
        for epoch in range(t.epochs):
            epoch_start = time.perf_counter()
            loss = _train_epoch(run, epoch)
            scores = evaluate(model, val_loader, device, precision)
            record = {"kind": "epoch", "epoch": epoch, "step": run["step"], "loss": loss, **scores}
            record |= {"lr": run["lr"], "seconds": round(time.perf_counter() - epoch_start, 2)}
            metrics.write(record)
            log.info("finetune epoch %d: loss %.4f top1 %.2f%%", epoch + 1, loss, scores["top1"])
    save_atomic(model.state_dict(), out / "finetuned.pth")
    results = {
        **{k: round(v, 2) for k, v in scores.items()},
        "backbone": cfg.backbone,
        "precision": precision,
        "num_classes": num_classes,
        "num_train": len(train_recs),
        "num_val": len(val_recs),
        "epochs": t.epochs,
        "checkpoint": str(out / "finetuned.pth"),
        "metrics": str(out / "metrics.jsonl"),
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_bytes_atomic(out / "results.json", json.dumps(results, indent=2).encode())
    return results


def _mixup(cfg: FinetuneConfig, num_classes: int) -> Any:
    """timm's Mixup/CutMix with label smoothing, or None when both are off."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        label_smoothing=cfg.train.label_smoothing,
        num_classes=num_classes,
    )
