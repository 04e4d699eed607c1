"""Backbones for the probes, fine-tuning and the export, built from any checkpoint.

Checkpoints are read and filtered in ``pretrain.checkpoints`` (the one checkpoint filter); this
module turns them into our ``BEiTv2``, timm's ``Beit`` or a random-init backbone.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from timm.models.beit import Beit
from torch import nn

from engine.errors import ConfigError
from pretrain.checkpoints import (
    REBUILT_BUFFERS,
    SHARED_TABLE,
    checkpoint_filter_fn,
    infer_beit_shape,
    load_beitv2,
    per_block_tables,
    read_checkpoint,
    split_checkpoint,
    state_dict_of,
)
from pretrain.errors import BackboneError, BackboneNotFound
from pretrain.model import BEiTConfig, BEiTv2, beit_config
from tokenize_corpus.teachers import load_teacher

log = logging.getLogger(__name__)


def backbone_state_dict(
    state_dict: Mapping[str, torch.Tensor], cfg: BEiTConfig
) -> dict[str, torch.Tensor]:
    """timm ``beitv2_*`` state dict: shared table copied into every block, pretraining parts dropped.

    Checks ``state_dict`` against ``BEiTv2(cfg)`` first, so a checkpoint that does not match its
    config fails here, naming the keys, rather than later inside timm.
    """
    state = checkpoint_filter_fn(state_dict, None)
    with torch.device("meta"):
        reference = BEiTv2(cfg)
    try:
        result = reference.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:  # shape mismatches
        raise BackboneError(f"checkpoint does not match its model config ({cfg}): {err}") from None
    problems = [f"missing {k}" for k in result.missing_keys]
    problems += [f"unexpected {k}" for k in result.unexpected_keys]
    if problems:
        raise BackboneError(
            "checkpoint does not match its model config "
            f"({cfg}): {', '.join(problems[:8])}{' ...' if len(problems) > 8 else ''}"
        )
    cpu = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return per_block_tables(cpu, cfg.depth)


# ---- building models ------------------------------------------------------------------------


def build_timm_beit(
    shape: Mapping[str, Any],
    num_classes: int = 0,
    drop_path: float = 0.0,
    global_pool: str = "token",
    use_fc_norm: bool = False,
    **extra: Any,
) -> nn.Module:
    """timm's ``Beit`` with the architecture ``infer_beit_shape`` found (no abs. position).

    The defaults keep the pretrained final ``norm`` over all tokens (as ``pretrain.export``);
    fine-tuning passes ``global_pool="avg", use_fc_norm=True`` (mean pool -> fresh LayerNorm).
    """
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


class RandomSpec(Protocol):
    """The ``backbone=random`` settings (``pretrain.eval_config.RandomInit``)."""

    size: str
    image_size: int
    patch_size: int
    width: int | None
    depth: int | None
    heads: int | None
    seed: int


def random_beitv2(spec: RandomSpec) -> tuple[BEiTv2, BEiTConfig]:
    """A freshly initialised ``BEiTv2`` without CLS head (the untrained baseline), seeded."""
    overrides = {
        k: v for k, v in (("width", spec.width), ("depth", spec.depth), ("heads", spec.heads)) if v
    }
    try:
        cfg = beit_config(
            spec.size,
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            use_cls_head=False,
            **overrides,
        )
    except ValueError as err:  # a shape the model cannot have: the config's mistake
        raise ConfigError(f"random_init.*: {err}") from None
    torch.manual_seed(spec.seed)
    return BEiTv2(cfg), cfg


def timm_state_dict(backbone: str, random_init: RandomSpec) -> dict[str, torch.Tensor]:
    """Backbone weights in timm's per-block-table layout, for ``backbone=<file>`` or ``random``."""
    if backbone == "random":
        model, cfg = random_beitv2(random_init)
        return backbone_state_dict(model.state_dict(), cfg)
    raw = read_checkpoint(_existing(backbone))
    state = state_dict_of(raw)
    if SHARED_TABLE in state:  # a pretraining checkpoint (ours or the reference's)
        state, cfg = split_checkpoint(raw, need_tap=False)
        return backbone_state_dict(state, cfg)
    return {k: v for k, v in state.items() if not k.endswith(REBUILT_BUFFERS)}  # timm layout


def _existing(path: str) -> str:
    if "://" not in path and not (path and Path(path).is_file()):
        what = "is a folder, not a file" if path and Path(path).is_dir() else "not found"
        raise BackboneNotFound(
            f"backbone {path!r} {what}; pass backbone=<pretrain checkpoint or exported "
            "file>, backbone=random or backbone=teacher:<name>"
        )
    return path


def check_backbone(spec: str) -> None:
    """Refuse a ``backbone=`` that names no file (before a run starts; the file is read later).
    ``random`` and ``teacher:<name>`` pass."""
    if spec != "random" and not spec.startswith("teacher:"):
        _existing(spec)


# ---- frozen feature extractors (linear probe) -----------------------------------------------


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


class BackboneSpec(Protocol):
    """What :func:`load_backbone` reads from a probe config (``LinprobeConfig``)."""

    backbone: str
    random_init: RandomSpec
    image_size: int | None
    teacher_weights: str | None


def load_backbone(cfg: BackboneSpec) -> Backbone:
    """The frozen backbone ``cfg.backbone`` names: a checkpoint or backbone file, ``random``, or
    ``teacher:<name>`` (see ``pretrain.linprobe``)."""
    spec = cfg.backbone
    if spec == "random":
        model, mcfg = random_beitv2(cfg.random_init)
        desc = {"kind": "random", **{k: getattr(mcfg, k) for k in ("width", "depth", "heads")}}
        ri = dict(vars(cfg.random_init))
        fp = hashlib.sha256(json.dumps([desc, ri], sort_keys=True).encode()).hexdigest()
        return Backbone(model.eval(), mcfg.image_size, True, False, "random-" + fp[:16], desc)
    if spec.startswith("teacher:"):
        name = spec.split(":", 1)[1]
        size = cfg.image_size or 224
        teacher = load_teacher(name, cfg.teacher_weights, (size // 16, size // 16)).eval()
        fp_src = _file_sha256(cfg.teacher_weights) if cfg.teacher_weights else "default-weights"
        fp = hashlib.sha256(f"{name}/{fp_src}".encode()).hexdigest()
        desc = {"kind": "teacher", "name": name, "dim": getattr(teacher, "dim", None)}
        return Backbone(teacher, size, False, False, "teacher-" + fp[:16], desc, normalise=False)
    raw = read_checkpoint(_existing(spec))
    state = state_dict_of(raw)
    fingerprint = _file_sha256(spec)
    if SHARED_TABLE in state and "mask_token" in state:
        # A pretraining checkpoint (ours or the reference's): the exact module that was trained.
        model, mcfg = load_beitv2(raw, need_tap=False)  # features only
        shape = {k: getattr(mcfg, k) for k in ("image_size", "patch_size", "width", "depth")}
        desc = {"kind": "pretrain checkpoint", "path": spec, **shape}
        return Backbone(model.eval(), mcfg.image_size, True, mcfg.use_cls_head, fingerprint, desc)
    shape = infer_beit_shape(state)
    # An exported backbone has lost cls_pt_layers; its sidecar (pretrain.export) still says
    # whether the CLS head was trained.
    sidecar = Path(spec + ".json")
    side = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    cls_trained = bool(side.get("config", {}).get("use_cls_head", False))
    cls_trained = cls_trained or bool(shape["head_layers"])
    model = build_timm_beit(shape)
    kept = checkpoint_filter_fn(state, model)
    missing, unexpected = model.load_state_dict(kept, strict=False)
    missing = [k for k in missing if "k_bias" not in k]
    if missing or unexpected:
        raise BackboneError(
            f"{spec}: weights do not fit a BEiT of shape {shape}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    desc = {"kind": "timm backbone file", "path": spec, **shape}
    return Backbone(model.eval(), shape["image_size"], True, cls_trained, fingerprint, desc)
