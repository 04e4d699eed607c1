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
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.eval_config import LinprobeConfig, ProbeTrain, RandomInit

__all__ = ["LinprobeConfig", "ProbeTrain", "RandomInit", "linprobe", "train_probe"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Backbones


def _state_dict(obj: Any) -> dict:
    """The tensor dict inside a checkpoint (unwrapping ``model``/``module``/``state_dict``)."""
    import torch

    for key in ("model", "module", "state_dict", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            inner = obj[key]
            if any(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    if isinstance(obj, dict) and any(isinstance(v, torch.Tensor) for v in obj.values()):
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise ValueError("no state dict found (expected tensors at the top level or under 'model')")


def infer_beit_shape(state: dict) -> dict:
    """Architecture of a BEiT (ours or timm's) from its tensor shapes.

    Returns image_size, patch_size, width, depth, heads, mlp_ratio, layer_scale (bool),
    shared_table (bool), vocab_size (0 without LM head) and head_layers (CLS head blocks).
    """
    proj = state["patch_embed.proj.weight"]  # [D, 3, p, p]
    width, patch = int(proj.shape[0]), int(proj.shape[-1])
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    shared = "rel_pos_bias.relative_position_bias_table" in state
    table_key = (
        "rel_pos_bias.relative_position_bias_table"
        if shared
        else "blocks.0.attn.relative_position_bias_table"
    )
    if table_key not in state:
        raise ValueError(
            "not a BEiT backbone: no relative position table "
            "(expected rel_pos_bias.relative_position_bias_table or blocks.0.attn.*)"
        )
    rows, heads = (int(s) for s in state[table_key].shape)  # [(2g-1)^2 + 3, heads]
    side = (math.isqrt(rows - 3) + 1) // 2
    head_ids = {int(k.split(".")[1]) for k in state if k.startswith("cls_pt_layers.")}
    return {
        "image_size": side * patch,
        "patch_size": patch,
        "width": width,
        "depth": depth,
        "heads": heads,
        "mlp_ratio": int(state["blocks.0.mlp.fc1.weight"].shape[0]) / width,
        "layer_scale": "blocks.0.gamma_1" in state,
        "shared_table": shared,
        "vocab_size": int(state["lm_head.weight"].shape[0]) if "lm_head.weight" in state else 0,
        "head_layers": len(head_ids),
    }


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Backbone:
    """A frozen feature extractor: ``tokens(views)`` -> [B, 1+N, D] (or [B, N, D] for teachers)."""

    module: Any
    image_size: int
    has_cls: bool  # tokens() returns a CLS token first
    cls_head_trained: bool
    fingerprint: str
    description: dict
    normalise: bool = True  # False for teachers: they take [0, 1] pixels, own normalisation

    def tokens(self, views: Any) -> Any:
        """views [B, 3, H, W] (normalised, or in [0, 1] for teachers) -> token features."""
        if hasattr(self.module, "forward_features"):
            return self.module.forward_features(views)
        return self.module(views)


def load_backbone(cfg: LinprobeConfig) -> Backbone:
    """Build the frozen backbone ``cfg.backbone`` names (see the module docstring)."""
    import torch

    spec = cfg.backbone
    if spec == "random":
        from pretrain.model import BEiTv2, beit_config

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
        model = BEiTv2(mcfg).eval()
        desc = {"kind": "random", **{k: getattr(mcfg, k) for k in ("width", "depth", "heads")}}
        fp = hashlib.sha256(json.dumps([desc, ri.__dict__], sort_keys=True).encode()).hexdigest()
        return Backbone(model, mcfg.image_size, True, False, "random-" + fp[:16], desc)
    if spec.startswith("teacher:"):
        from tokenize_corpus.teachers import load_teacher

        name = spec.split(":", 1)[1]
        size = cfg.image_size or 224
        teacher = load_teacher(name, cfg.teacher_weights, (size // 16, size // 16)).eval()
        fp_src = _file_sha256(cfg.teacher_weights) if cfg.teacher_weights else "default-weights"
        fp = hashlib.sha256(f"{name}/{fp_src}".encode()).hexdigest()
        desc = {"kind": "teacher", "name": name, "dim": getattr(teacher, "dim", None)}
        return Backbone(teacher, size, False, False, "teacher-" + fp[:16], desc, normalise=False)
    if not os.path.exists(spec):
        raise FileNotFoundError(
            f"backbone {spec!r} not found; pass backbone=<pretrain checkpoint or exported file>, "
            "backbone=random or backbone=teacher:<name>"
        )
    raw = _load_file(spec)
    state = _state_dict(raw)
    fingerprint = _file_sha256(spec)
    if "rel_pos_bias.relative_position_bias_table" in state and "mask_token" in state:
        # Our own pretrain checkpoint: rebuild the exact module that was trained.
        from pretrain.export import split_checkpoint
        from pretrain.model import BEiTv2

        state, mcfg = split_checkpoint(raw)
        model = BEiTv2(mcfg)
        model.load_state_dict(state, strict=True)
        cls_trained = mcfg.use_cls_head
        shape = {k: getattr(mcfg, k) for k in ("image_size", "patch_size", "width", "depth")}
        desc = {"kind": "pretrain checkpoint", "path": spec, **shape}
        return Backbone(model.eval(), mcfg.image_size, True, cls_trained, fingerprint, desc)
    shape = infer_beit_shape(state)
    # An exported backbone has lost cls_pt_layers; its sidecar (pretrain.export) still says
    # whether the CLS head was trained.
    sidecar = Path(spec + ".json")
    side = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    cls_trained = bool(side.get("config", {}).get("use_cls_head", False))
    cls_trained = cls_trained or bool(shape["head_layers"])
    model = timm_backbone(shape)
    drop = ("mask_token", "lm_head.", "cls_pt_layers.", "relative_position_index")
    kept = {k: v for k, v in state.items() if not any(s in k for s in drop)}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    missing = [k for k in missing if "relative_position_index" not in k and "k_bias" not in k]
    if missing or unexpected:
        raise ValueError(
            f"{spec}: weights do not fit a BEiT of shape {shape}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    desc = {"kind": "timm backbone file", "path": spec, **shape}
    return Backbone(model.eval(), shape["image_size"], True, cls_trained, fingerprint, desc)


def _load_file(path: str) -> Any:
    """A checkpoint or backbone file (.safetensors or torch.save), tensors only when possible."""
    import pickle

    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Training checkpoints may carry non-tensor state (RNG states); only trust local files.
        log.warning("%s holds non-tensor objects; loading it with weights_only=False", path)
        return torch.load(path, map_location="cpu", weights_only=False)


def timm_backbone(
    shape: dict,
    num_classes: int = 0,
    drop_path: float = 0.0,
    global_pool: str = "token",
    use_fc_norm: bool = False,
    **extra: Any,
) -> Any:
    """timm's ``Beit`` with the architecture ``infer_beit_shape`` found (no abs. position).

    The defaults keep the pretrained final ``norm`` over all tokens (as ``pretrain.export``);
    fine-tuning passes ``global_pool="avg", use_fc_norm=True`` (mean pool -> fresh LayerNorm).
    """
    from timm.models.beit import Beit

    return Beit(
        img_size=shape["image_size"],
        patch_size=shape["patch_size"],
        embed_dim=shape["width"],
        depth=shape["depth"],
        num_heads=shape["heads"],
        mlp_ratio=shape["mlp_ratio"],
        num_classes=num_classes,
        use_abs_pos_emb=False,
        use_rel_pos_bias=not shape["shared_table"],
        use_shared_rel_pos_bias=shape["shared_table"],
        init_values=0.1 if shape["layer_scale"] else None,
        drop_path_rate=drop_path,
        global_pool=global_pool,
        use_fc_norm=use_fc_norm,
        **extra,
    )


# ---------------------------------------------------------------------------------------------
# Images and features


def image_source_fingerprint(images: str, shard_size: int) -> tuple[str, list]:
    """A hash of an image source (shard files with sizes/mtimes, folder member keys)."""
    from shards.images import list_shards

    shards = list_shards(images, shard_size=shard_size)
    h = hashlib.sha256()
    for shard in shards:
        h.update(f"{shard.index}|{shard.url}|{shard.kind}|".encode())
        h.update("\n".join(shard.keys).encode())
        if os.path.isfile(shard.url):
            st = os.stat(shard.url)
            h.update(f"|{st.st_size}|{int(st.st_mtime)}".encode())
    return h.hexdigest(), shards


def eval_views(image: Any, key: str, size: int) -> Any:
    """The evaluation view of one decoded image: uint8 [3, size, size] (resize + centre crop)."""
    from shards.views import AugConfig, render_view, sample_view

    aug = AugConfig(size=size, eval_seed0=True, jitter=(), flip=False)
    params = sample_view(aug, key, 0, image.width, image.height)
    return render_view(image, params)


def extract_features(
    backbone: Backbone,
    images: str,
    shard_size: int,
    batch_size: int,
    device: Any,
    precision: str = "fp32",
) -> dict:
    """Run ``backbone`` once over every labelled image of ``images`` (under autocast at
    ``precision``; the features are returned in fp32).

    Returns {"keys": [K], "labels": int64 [K], "cls": [K, D] or None, "mean": [K, D],
    "skipped": [(key, reason)]}; images with label -1 or that fail to decode are skipped.
    """
    import torch
    from tqdm import tqdm

    from engine.precision import autocast
    from shards.decode import BadImage, decode_image
    from shards.images import iter_shard
    from shards.views import IMAGENET_MEAN, IMAGENET_STD, normalize, to_unit

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
    if batch:
        flush()
    bar.close()
    if not keys:
        raise ValueError(
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


def cached_features(cfg: LinprobeConfig, backbone: Backbone, images: str, device: Any) -> dict:
    """``extract_features`` through the cache ``out_dir/features-<hash>.pt``.

    ``cfg.train.precision`` must be resolved (``fp32``/``bf16``/``fp16``): it is part of the key.
    """
    from engine.checkpoint import load_file, save_atomic

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


def key_in_val(key: str, fraction: float) -> bool:
    """Deterministic hold-out by key hash (independent of order and backbone)."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def train_probe(
    x_train: Any,
    y_train: Any,
    x_val: Any,
    y_val: Any,
    num_classes: int,
    spec: ProbeTrain,
    metrics: Any = None,
) -> dict:
    """Standardise + Linear trained with AdamW and the shared cosine schedule (no warmup).

    Returns top-1 (%) on val and train, and top-5 (%) on val only when there are more than 5
    classes (with 5 or fewer, top-5 is 100% by construction and says nothing: None then).
    ``metrics``: an ``engine.metrics.MetricsWriter`` for the classifier's loss, or None.
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from engine.optim import set_lr
    from engine.schedule import Schedule

    gen = torch.Generator().manual_seed(spec.seed)
    mean = x_train.mean(0, keepdim=True)
    std = x_train.std(0, keepdim=True).clamp_min(1e-6)
    xt, xv = (x_train - mean) / std, (x_val - mean) / std  # [n, D]
    head = torch.nn.Linear(xt.shape[1], num_classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    peak = spec.blr * spec.batch_size / ProbeTrain.REFERENCE_BATCH
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
        top = logits.topk(min(5, num_classes), dim=1).indices  # [n, k]
        top1 = 100 * (top[:, 0] == y).float().mean().item()
        if num_classes <= 5:
            return top1, None
        return top1, 100 * (top == y[:, None]).any(dim=1).float().mean().item()

    top1, top5 = accuracy(xv, y_val)
    train_top1, _ = accuracy(xt, y_train)
    return {"top1": top1, "top5": top5, "train_top1": train_top1}


def linprobe(cfg: LinprobeConfig) -> dict:
    """Run the linear probe described by ``cfg``; writes results.json and returns it."""
    import dataclasses

    import torch

    from engine.checkpoint import write_bytes_atomic
    from engine.config import save_config, to_dict
    from engine.device import resolve_device
    from engine.errors import UserError
    from engine.metrics import MetricsWriter
    from engine.precision import resolve_precision

    if not cfg.images:
        raise UserError("no labelled images given; pass images=<folder, shards or parquet>")
    start = time.perf_counter()
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
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
    with MetricsWriter(out, cfg.log, config=to_dict(cfg)) as metrics:
        scores = train_probe(xt, yt, xv, yv, num_classes, cfg.train, metrics)
    results = {
        **{k: None if v is None else round(v, 2) for k, v in scores.items()},
        "backbone": cfg.backbone,
        "backbone_fingerprint": backbone.fingerprint,
        "backbone_info": backbone.description,
        "pool": pool,
        "precision": precision,
        "feature_dim": int(x.shape[1]),
        "num_classes": num_classes,
        "num_train": int(len(yt)),
        "num_val": int(len(yv)),
        "skipped": len(feats["skipped"]),
        "features": [feats["path"], val_path],
        "seconds": round(time.perf_counter() - start, 1),
        "out_dir": str(out),
    }
    write_bytes_atomic(out / "results.json", json.dumps(results, indent=2).encode())
    log.info("linprobe %s: top1 %.2f%% (top5 %s)", cfg.backbone, results["top1"], results["top5"])
    return results
