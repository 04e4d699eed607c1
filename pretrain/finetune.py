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
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from engine.config import StageConfig
from engine.layout import DEMO, RUNS
from pretrain.linprobe import RandomInit

log = logging.getLogger(__name__)

REFERENCE_BATCH = 1024  # the paper's fine-tuning batch: blr is the lr at this batch


@dataclass(frozen=True)
class FinetuneConfig(StageConfig):
    """Fine-tune a backbone end to end with layer-wise lr decay."""

    backbone: str = "random"  # pretrain checkpoint, timm-exported backbone file, or "random"
    images: str = ""  # labelled images: ImageFolder, WebDataset (.cls) or Parquet (label)
    images_val: str | None = None  # null = hold out val_fraction of `images` by key hash
    val_fraction: float = 0.2
    out_dir: str = RUNS.finetune
    shard_size: int = 256
    epochs: int = 100
    batch_size: int = 1024
    blr: float = 5e-4  # lr at batch 1024, scaled linearly (see FinetuneConfig.lr)
    min_lr: float = 1e-6
    warmup_epochs: int = 5
    layer_decay: float = 0.65
    weight_decay: float = 0.05
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    mixup: float = 0.0  # reference: 0.8
    cutmix: float = 0.0  # reference: 1.0
    randaugment: bool = False  # reference: rand-m9-mstd0.5 (torchvision RandAugment(2, 9) here)
    crop_scale: tuple[float, ...] = (0.08, 1.0)
    num_workers: int = 0  # DataLoader workers
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    random_init: RandomInit = field(default_factory=RandomInit)

    presets: ClassVar[dict[str, dict]] = {
        "demo": {
            "out_dir": DEMO.finetune,
            "epochs": 3,
            "batch_size": 32,
            "blr": 3.2e-2,  # lr 1e-3 at batch 32: a tiny model, a few epochs
            "warmup_epochs": 1,
            "drop_path": 0.0,
            "random_init": {"size": "tiny", "image_size": 64, "patch_size": 8},
        },
        # The paper's ViT-B/16 recipe (300-epoch pretraining row of docs/method.md §5).
        "base": {
            "epochs": 100,
            "batch_size": 1024,
            "blr": 5e-4,
            "warmup_epochs": 5,
            "drop_path": 0.1,
            "mixup": 0.8,
            "cutmix": 1.0,
            "randaugment": True,
            "random_init": {"size": "base", "image_size": 224, "patch_size": 16},
        },
    }

    @property
    def lr(self) -> float:
        """Peak lr: ``blr`` (defined at batch 1024) scaled linearly to ``batch_size``."""
        return self.blr * self.batch_size / REFERENCE_BATCH


def finetune_state(cfg: FinetuneConfig) -> dict:
    """The backbone's weights in timm's per-block-table layout (shared table copied per block)."""
    import torch

    from pretrain.export import backbone_state_dict, split_checkpoint
    from pretrain.linprobe import _load_file, _state_dict
    from pretrain.model import BEiTv2, beit_config

    if cfg.backbone == "random":
        ri = cfg.random_init
        overrides = {
            k: v for k, v in (("width", ri.width), ("depth", ri.depth), ("heads", ri.heads)) if v
        }
        mcfg = beit_config(
            ri.size,
            image_size=ri.image_size,
            patch_size=ri.patch_size,
            use_cls_head=False,
            **overrides,
        )
        torch.manual_seed(ri.seed)
        return backbone_state_dict(BEiTv2(mcfg).state_dict(), mcfg)
    if not Path(cfg.backbone).is_file():
        raise FileNotFoundError(
            f"backbone {cfg.backbone!r} not found; pass backbone=<pretrain checkpoint or exported "
            "file> or backbone=random"
        )
    raw = _load_file(cfg.backbone)
    state = _state_dict(raw)
    if "rel_pos_bias.relative_position_bias_table" in state:
        state, mcfg = split_checkpoint(raw)
        return backbone_state_dict(state, mcfg)
    return state


def build_model(state: dict, num_classes: int, drop_path: float) -> Any:
    """timm ``Beit`` (avg pool + fc_norm + head x0.001) with ``state`` loaded."""
    from pretrain.linprobe import infer_beit_shape, timm_backbone

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
        seed = self.cfg.seed * 100_003 + self.epoch
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


def _lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))


def evaluate(model: Any, loader: Any, device: str) -> dict[str, float]:
    """Top-1/top-5 (%) over ``loader`` (uint8 views, ImageNet normalisation)."""
    import torch

    from shards.views import IMAGENET_MEAN, IMAGENET_STD, normalize, to_unit

    model.eval()
    right1 = right5 = n = 0
    with torch.inference_mode():
        for views, labels in loader:
            x = normalize(to_unit(views.to(device)), IMAGENET_MEAN, IMAGENET_STD)
            logits = model(x)  # [B, C]
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
            right1 += int((top[:, 0] == labels).sum())
            right5 += int((top == labels[:, None]).any(dim=1).sum())
            n += len(labels)
    return {"top1": 100 * right1 / max(n, 1), "top5": 100 * right5 / max(n, 1)}


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune ``cfg.backbone`` on ``cfg.images``; returns the final accuracies."""
    import torch
    import torch.nn.functional as F
    from timm.optim import create_optimizer_v2
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from engine.config import save_config
    from pretrain.linprobe import key_in_val, resolve_device
    from shards.views import IMAGENET_MEAN, IMAGENET_STD, normalize, to_unit

    if not cfg.images:
        raise ValueError("no labelled images given; pass images=<folder, shards or parquet>")
    start = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    records = _records(cfg.images, cfg.shard_size)
    if cfg.images_val:
        train_recs, val_recs = records, _records(cfg.images_val, cfg.shard_size)
    else:
        train_recs = [r for r in records if not key_in_val(r[0], cfg.val_fraction)]
        val_recs = [r for r in records if key_in_val(r[0], cfg.val_fraction)]
    if not train_recs or not val_recs:
        raise ValueError(f"empty train or val split ({len(train_recs)}/{len(val_recs)} images)")
    num_classes = 1 + max(r[2] for r in train_recs + val_recs)

    state = finetune_state(cfg)
    model = build_model(state, num_classes, cfg.drop_path).to(device)
    size = model.patch_embed.img_size[0]
    train_set = _Images(train_recs, size, True, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(train_recs) >= cfg.batch_size,
        num_workers=cfg.num_workers,
        generator=gen,
    )
    val_loader = DataLoader(
        _Images(val_recs, size, False, cfg), batch_size=cfg.batch_size, num_workers=cfg.num_workers
    )
    optimizer = create_optimizer_v2(
        model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay
    )
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup

        mixup = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            label_smoothing=cfg.label_smoothing,
            num_classes=num_classes,
        )
    steps_per_epoch = len(train_loader)
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch
    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("")
    step = 0
    scores: dict[str, float] = {}
    for epoch in range(cfg.epochs):
        model.train()
        train_set.epoch = epoch
        losses = []
        epoch_start = time.perf_counter()
        for views, labels in tqdm(
            train_loader, desc=f"finetune {epoch + 1}/{cfg.epochs}", disable=None
        ):
            lr = _lr_at(step, total, warmup, cfg.lr, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            x = normalize(to_unit(views.to(device)), IMAGENET_MEAN, IMAGENET_STD)  # [B, 3, S, S]
            y = labels.to(device)
            if mixup is not None:
                x, y_soft = mixup(x, y)
                loss = torch.sum(-y_soft * F.log_softmax(model(x), dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
        scores = evaluate(model, val_loader, device)
        record = {
            "epoch": epoch,
            "step": step,
            "loss": sum(losses) / max(1, len(losses)),
            **scores,
            "lr": lr,
            "seconds": round(time.perf_counter() - epoch_start, 2),
        }
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        log.info(
            "finetune epoch %d: loss %.4f top1 %.2f%%", epoch + 1, record["loss"], scores["top1"]
        )
    torch.save(model.state_dict(), out / "finetuned.pth")
    results = {
        **{k: round(v, 2) for k, v in scores.items()},
        "backbone": cfg.backbone,
        "num_classes": num_classes,
        "num_train": len(train_recs),
        "num_val": len(val_recs),
        "epochs": cfg.epochs,
        "checkpoint": str(out / "finetuned.pth"),
        "metrics": str(metrics_path),
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results
