"""Linear probe: a linear classifier on frozen backbone features (docs/method.md §5).

``pipeline run stage=linprobe backbone=<file|random|teacher:NAME> images=<labelled images>``

* **Backbones.** ``backbone=`` is one of: a stage-3 pretrain checkpoint (our ``BEiTv2`` keys), a
  timm-exported backbone file (``pretrain.export``: per-block or shared relative position tables),
  ``random`` (a freshly initialised ``BEiTv2`` of ``random_init.size``: the baseline a pretrained
  model must beat) or ``teacher:<name>`` (a stage-1 teacher, e.g. ``teacher:efficientnet_lite0``:
  the "teacher's own features" baseline). The architecture of a file is read from its tensor
  shapes, so any of our checkpoints works without its config.
* **Features** (``pool=auto``): the CLS token when the CLS aggregation head was trained (the file
  has ``cls_pt_layers.*`` weights, or an exported file says ``cls_head_trained``), the mean of the
  patch tokens otherwise, as the paper's linear probe (docs/method.md §5). A teacher gives patch
  features only, so its features are always their mean. Every image is seen once through the
  evaluation view (resize to size/0.875, centre crop; ``shards.views``, ImageNet normalisation).
  Features are cached in ``out_dir/features-<hash>.pt``, the hash covering the backbone's weights,
  the image source (shard files, their sizes and member keys) and the view, so a rerun with new
  classifier settings does not run the backbone again.
* **Classifier.** Standardisation with the training features' mean/std (= BatchNorm without affine
  at eval time, as MAE's probe) followed by one ``Linear`` layer, trained with AdamW and a cosine
  schedule on minibatches of the cached features, cross-entropy. Chosen over LBFGS logistic
  regression because it scales to any feature count with the same code and memory.
* **Splits.** ``images_val=`` gives a separate evaluation source (e.g. Fashion-MNIST's test set);
  otherwise a fixed fraction of ``images`` is held out by a hash of each image key, so the split
  does not depend on order, worker count or the backbone.

Writes ``config.yaml``, ``metrics.jsonl`` (classifier training) and ``results.json``; returns
``{top1, top5, ...}`` (percentages).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.checkpoint import load_file, save_atomic
from engine.errors import UserError
from engine.metrics import MetricsWriter
from engine.optim import set_lr
from engine.precision import autocast
from engine.schedule import Schedule, scaled_lr
from engine.start import Run, start_run
from pretrain.backbones import Backbone, load_backbone
from pretrain.eval_config import LinprobeConfig, ProbeTrain
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
from shards.views import IMAGENET_MEAN, IMAGENET_STD, normalize, to_unit

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Images and features


def image_source_fingerprint(images: str, shard_size: int) -> tuple[str, list]:
    """A hash of an image source (shard files with sizes/mtimes, folder member keys)."""
    shards = list_shards(images, shard_size=shard_size)
    h = hashlib.sha256()
    for shard in shards:
        h.update(f"{shard.index}|{shard.url}|{shard.kind}|".encode())
        h.update("\n".join(shard.keys).encode())
        if os.path.isfile(shard.url):
            st = os.stat(shard.url)
            h.update(f"|{st.st_size}|{int(st.st_mtime)}".encode())
    return h.hexdigest(), shards


def extract_features(
    backbone: Backbone,
    images: str,
    shard_size: int,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> dict:
    """Run ``backbone`` once over every labelled image of ``images`` (under autocast at
    ``precision``; the features are returned in fp32).

    Returns {"keys": [K], "labels": int64 [K], "cls": [K, D] or None, "mean": [K, D],
    "skipped": [(key, reason)]}; images with label -1 or that fail to decode are skipped.
    """
    _, shards = image_source_fingerprint(images, shard_size)
    backbone.module.to(device)
    keys: list[str] = []
    labels: list[int] = []
    cls_rows: list[torch.Tensor] = []
    mean_rows: list[torch.Tensor] = []
    skipped: list[tuple[str, str]] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        views = to_unit(torch.stack(batch)).to(device)  # [B, 3, H, W] in [0, 1]
        if backbone.normalise:
            views = normalize(views, IMAGENET_MEAN, IMAGENET_STD)
        with torch.inference_mode(), autocast(precision, device):
            out = backbone.tokens(views).float()  # [B, 1+N, D] or [B, N, D]
        if backbone.has_cls:
            cls_rows.append(out[:, 0].cpu())
            out = out[:, 1:]
        mean_rows.append(out.mean(dim=1).cpu())  # [B, D]
        batch.clear()

    total = sum(len(shard.keys) for shard in shards) or None  # folders know their keys
    bar = tqdm(desc="features", unit="img", total=total, disable=None)
    for shard in shards:
        try:
            for rec in iter_shard(shard):
                if rec.error or rec.label < 0:
                    skipped.append((rec.key, rec.error or "no label"))
                    continue
                try:
                    image = decode_image(rec.data)
                except BadImage as err:
                    skipped.append((rec.key, str(err)))
                    continue
                batch.append(eval_views(image, rec.key, backbone.image_size))
                keys.append(rec.key)
                labels.append(rec.label)
                bar.update(1)
                if len(batch) == batch_size:
                    flush()
        except BadShard as err:  # the records read before the damage are kept
            log.warning("%s: %s; the rest of this shard is skipped", shard.url, err)
            skipped.append((shard.url, f"unreadable shard: {err}"))
    if batch:
        flush()
    bar.close()
    if not keys:
        raise UserError(
            f"no labelled images in {images!r} ({len(skipped)} skipped); give an ImageFolder "
            "(class/xxx.jpg), WebDataset shards with .cls or Parquet with a label column"
        )
    return {
        "keys": keys,
        "labels": torch.tensor(labels, dtype=torch.int64),
        "cls": torch.cat(cls_rows) if cls_rows else None,
        "mean": torch.cat(mean_rows),
        "skipped": skipped,
    }


def cached_features(
    cfg: LinprobeConfig, backbone: Backbone, images: str, device: torch.device
) -> dict:
    """``extract_features`` through the cache ``out_dir/features-<hash>.pt``.

    ``cfg.train.precision`` must be resolved (``fp32``/``bf16``/``fp16``): it is part of the key.
    """
    source_fp, _ = image_source_fingerprint(images, cfg.shard_size)
    view = {"size": backbone.image_size, "view": "eval-centre-crop-0.875", "norm": "imagenet"}
    if cfg.train.precision != "fp32":  # fp32 keys stay those of caches written before precision
        view["precision"] = cfg.train.precision
    digest = hashlib.sha256(
        json.dumps([backbone.fingerprint, source_fp, view], sort_keys=True).encode()
    ).hexdigest()[:20]
    path = Path(cfg.out_dir) / f"features-{digest}.pt"
    if path.exists():
        log.info("features from cache %s", path)
        return load_file(path) | {"path": str(path)}
    feats = extract_features(
        backbone, images, cfg.shard_size, cfg.feature_batch_size, device, cfg.train.precision
    )
    save_atomic(feats, path)
    return feats | {"path": str(path)}


# ---------------------------------------------------------------------------------------------
# The classifier


def train_probe(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    num_classes: int,
    spec: ProbeTrain,
    metrics: MetricsWriter | None = None,
) -> dict:
    """Standardise + Linear trained with AdamW and the shared cosine schedule (no warmup).

    Returns top-1 (%) on val and train, and top-5 (%) on val only when there are more than 5
    classes (with 5 or fewer, top-5 is 100% by construction and says nothing: None then).
    ``metrics``: where the classifier's loss goes, or None.
    """
    gen = torch.Generator().manual_seed(spec.seed)
    mean = x_train.mean(0, keepdim=True)
    std = x_train.std(0, keepdim=True).clamp_min(1e-6)
    xt, xv = (x_train - mean) / std, (x_val - mean) / std  # [n, D]
    head = torch.nn.Linear(xt.shape[1], num_classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    peak = scaled_lr(spec.blr, spec.batch_size, ProbeTrain.REFERENCE_BATCH)
    opt = torch.optim.AdamW(head.parameters(), lr=peak, weight_decay=spec.weight_decay)
    schedule = Schedule(peak, max(spec.steps, 1))
    n = xt.shape[0]
    order = torch.randperm(n, generator=gen)
    pos = 0
    for step in tqdm(range(spec.steps), desc="probe", unit="step", disable=None, leave=False):
        if pos + min(spec.batch_size, n) > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + spec.batch_size]
        pos += len(idx)
        set_lr(opt, schedule(step))
        loss = F.cross_entropy(head(xt[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if metrics is not None and (step % 20 == 0 or step == spec.steps - 1):
            metrics.write({"kind": "step", "step": step + 1, "probe_loss": loss.item()})

    def accuracy(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float | None]:
        with torch.no_grad():
            logits = head(x)  # [n, C]
        scores = topk_scores(*topk_hits(logits, y), len(y), num_classes)
        return scores["top1"], scores.get("top5")

    top1, top5 = accuracy(xv, y_val)
    train_top1, _ = accuracy(xt, y_train)
    return {"top1": top1, "top5": top5, "train_top1": train_top1}


def linprobe(cfg: LinprobeConfig) -> dict:
    """Run the linear probe described by ``cfg``; writes results.json and returns it."""
    check_inputs(cfg)
    start = time.perf_counter()
    with start_run(cfg, data_parallel=False) as run:
        return _probe(run, start)


def _probe(run: Run[LinprobeConfig], start: float) -> dict:
    """Features (cached), the split, the classifier; results.json."""
    cfg, device, out = run.cfg, run.device, run.out
    backbone = load_backbone(cfg)
    if cfg.image_size and not cfg.backbone.startswith("teacher:"):
        raise UserError(
            f"image_size={cfg.image_size} only applies to backbone=teacher:<name>; a checkpoint "
            "carries its own image size and backbone=random uses random_init.image_size"
        )
    feats = cached_features(cfg, backbone, cfg.images, device)
    pool = cfg.pool
    if pool == "auto":
        pool = "cls" if backbone.cls_head_trained else "mean"
    if pool == "cls" and feats["cls"] is None:
        raise UserError(f"pool=cls, but backbone {cfg.backbone!r} has no CLS token; use pool=mean")
    x, y, keys = feats[pool], feats["labels"], feats["keys"]
    if cfg.images_val:
        val = cached_features(cfg, backbone, cfg.images_val, device)
        xt, yt, xv, yv = x, y, val[pool], val["labels"]
        val_path = val["path"]
    else:
        in_val = torch.tensor([key_in_val(k, cfg.val_fraction) for k in keys])
        if in_val.all() or not in_val.any():
            raise UserError(
                f"val_fraction={cfg.val_fraction} leaves an empty split of {len(keys)} images; "
                "use more images or a fraction in (0, 1)"
            )
        xt, yt, xv, yv = x[~in_val], y[~in_val], x[in_val], y[in_val]
        val_path = feats["path"]
    num_classes = int(max(int(yt.max()), int(yv.max())) + 1)
    with run.metrics() as metrics:
        scores = train_probe(xt, yt, xv, yv, num_classes, cfg.train, metrics)
    results = {
        **{k: None if v is None else round(v, 2) for k, v in scores.items()},
        "backbone": cfg.backbone,
        "backbone_fingerprint": backbone.fingerprint,
        "backbone_info": backbone.description,
        "pool": pool,
        "precision": cfg.train.precision,
        "feature_dim": int(x.shape[1]),
        "num_classes": num_classes,
        "num_train": int(len(yt)),
        "num_val": int(len(yv)),
        "skipped": len(feats["skipped"]),
        "features": [feats["path"], val_path],
        "seconds": round(time.perf_counter() - start, 1),
        "out_dir": str(out),
    }
    write_results(out, results)
    log.info("linprobe %s: top1 %.2f%% (top5 %s)", cfg.backbone, results["top1"], results["top5"])
    return results
