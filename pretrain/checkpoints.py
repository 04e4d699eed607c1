"""Reading BEiT checkpoints of any origin and mapping them onto our model (docs/method.md §3-§5).

``pretrain.backbones`` builds models from what this module reads.

Three kinds of file reach the probes, fine-tuning and the export:

- **our pretraining checkpoints** (``pretrain.train``): ``{"model": BEiTv2 state dict,
  "config": {"model": asdict(BEiTConfig)}, ...}``, or a bare ``BEiTv2`` state dict;
- **reference pretraining checkpoints** (unilm ``beit2``, ``VisionTransformerForMaskedImage
  ModelingCLS`` with a shared relative position bias): the same parameter names as ours plus the
  ``rel_pos_bias.relative_position_index`` buffer, and an ``args`` namespace that names the tap
  layer (``early_layers``) and layer scale;
- **timm backbone files** (``pretrain.export`` or timm's own ``beitv2_*``): per-block relative
  position tables, no mask token, LM head or CLS head.

:func:`checkpoint_filter_fn` maps any of them onto a target model, in the manner of timm's
``checkpoint_filter_fn``: wrapper prefixes (``module.``, ``_orig_mod.``) go, buffers every model
rebuilds from the grid (``relative_position_index``) are dropped by name, and for a timm target
the shared table is copied into each block and the pretraining-only parts are dropped. Loads
after the filter are strict.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from engine.checkpoint import load_file
from pretrain.errors import BackboneError
from pretrain.model import BEIT_SIZES, BEiTConfig, BEiTv2

log = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
# Parameters only pretraining uses; a timm backbone has no place for them.
PRETRAIN_ONLY = ("mask_token", "lm_head.", "cls_pt_layers.", "rel_pos_bias.")
# Buffers derived from the grid, which every model rebuilds (the reference saves them).
REBUILT_BUFFERS = ("relative_position_index",)


# ---- reading --------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> Any:
    """The object in a checkpoint file (torch ``weights_only`` or safetensors; no pickles)."""
    return load_file(path)


def _strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in WRAPPER_PREFIXES:  # DDP and torch.compile rename, the weights are the same
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def state_dict_of(obj: Any) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint (under ``model``/``module``/``state_dict``/``model_ema``
    or at the top level), wrapper prefixes removed."""
    if isinstance(obj, Mapping):
        for key in ("model", "module", "state_dict", "model_ema"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(torch.is_tensor(v) for v in inner.values()):
                return _strip_wrappers({k: v for k, v in inner.items() if torch.is_tensor(v)})
        if any(torch.is_tensor(v) for v in obj.values()):
            return _strip_wrappers({k: v for k, v in obj.items() if torch.is_tensor(v)})
    raise BackboneError(
        "no state dict found (expected tensors at the top level or under 'model'); pass a "
        "pretrain checkpoint, a reference BEiT v2 checkpoint or an exported backbone"
    )


# ---- shapes and configs ---------------------------------------------------------------------


def infer_beit_shape(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture of a BEiT (ours, the reference's or timm's) from its tensor shapes.

    Returns image_size, patch_size, width, depth, heads, mlp_ratio, layer_scale (bool),
    shared_table (bool), vocab_size (0 without LM head) and head_layers (CLS head blocks).
    """
    if "patch_embed.proj.weight" not in state or not any(k.startswith("blocks.") for k in state):
        raise BackboneError("not a BEiT state dict: no patch_embed.proj.weight or blocks.*")
    proj = state["patch_embed.proj.weight"]  # [D, 3, p, p]
    width, patch = int(proj.shape[0]), int(proj.shape[-1])
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    shared = SHARED_TABLE in state
    table_key = SHARED_TABLE if shared else "blocks.0.attn.relative_position_bias_table"
    if table_key not in state:
        raise BackboneError(
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


def config_from_dict(model_config: Mapping[str, Any]) -> BEiTConfig:
    """Rebuild a ``BEiTConfig`` from its stored dict (``asdict`` form; ``size`` picks a preset)."""
    names = {f.name for f in fields(BEiTConfig)}
    values = dict(BEIT_SIZES.get(str(model_config.get("size", "")), {}))
    unknown = sorted(set(model_config) - names - {"size"})
    if unknown:
        log.warning("ignoring model config keys %s (not BEiTConfig fields)", unknown)
    values.update({k: v for k, v in model_config.items() if k in names})
    return BEiTConfig(**values)


def _named_size(width: int, depth: int, heads: int) -> dict[str, Any] | None:
    for size in BEIT_SIZES.values():
        if (size["width"], size["depth"], size["heads"]) == (width, depth, heads):
            return size
    return None


def _tap_layer(width: int, depth: int, heads: int, args: Any) -> tuple[int, float | None]:
    """(head_from_layer, layer_scale_init or None) of a checkpoint that has no config.

    A reference checkpoint's ``args`` say them (``early_layers``, ``layer_scale_init_value``);
    otherwise a named size does (base -> 9, large -> 21, their presets). Any other shape is
    refused: the weights cannot tell which block the CLS head was trained to read.
    """
    early = getattr(args, "early_layers", None) if args is not None else None
    scale = getattr(args, "layer_scale_init_value", None) if args is not None else None
    if isinstance(early, int) and early >= 1:
        return early, float(scale) if isinstance(scale, (int, float)) else None
    size = _named_size(width, depth, heads)
    if size is not None:
        return size["head_from_layer"], size["layer_scale_init"]
    raise BackboneError(
        f"cannot tell which block feeds the CLS head of this state dict (width {width}, depth "
        f"{depth}, heads {heads} is not a named size, and the weights do not say): export the "
        "checkpoint stage 3 wrote (it carries config['model']), or save the state dict as "
        "{'model': state_dict, 'model_config': {'head_from_layer': N}}"
    )


def config_from_state_dict(
    state: Mapping[str, torch.Tensor],
    args: Any = None,
    tap: Mapping[str, Any] | None = None,
    need_tap: bool = True,
) -> BEiTConfig:
    """Read the model shape off a ``BEiTv2``-layout state dict (ours or the reference's).

    ``args`` is the reference checkpoint's argument namespace, when it has one; ``tap`` holds
    config fields stored beside a bare state dict (e.g. ``head_from_layer``), which win.
    ``need_tap=False`` (the backbone alone is wanted: export, probe features) skips the CLS-head
    tap inference and its refusal; the config then carries the default tap.
    """
    try:
        table = state[SHARED_TABLE]  # [(2g-1)^2 + 3, heads]
        width = int(state["cls_token"].shape[-1])
        patch = int(state["patch_embed.proj.weight"].shape[-1])
        hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0])
    except KeyError as err:
        raise BackboneError(
            f"state dict has no {err.args[0]!r}: not a BEiT v2 pretraining checkpoint "
            "(expected the keys of pretrain.model.BEiTv2 or of the reference's model)"
        ) from None
    side = (round((table.shape[0] - 3) ** 0.5) + 1) // 2
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    heads = int(table.shape[1])
    head_ids = {int(k.split(".")[1]) for k in state if k.startswith("cls_pt_layers.")}
    has_scale = "blocks.0.gamma_1" in state
    tap = dict(tap or {})
    if "head_from_layer" in tap or not head_ids or not need_tap:
        layer, scale = int(tap.get("head_from_layer", 9)), None
    else:
        layer, scale = _tap_layer(width, depth, heads, args)
    values: dict[str, Any] = {
        "image_size": side * patch,
        "patch_size": patch,
        "width": width,
        "depth": depth,
        "heads": heads,
        "mlp_ratio": hidden / width,
        "use_cls_head": bool(head_ids),
        "head_layers": len(head_ids) or 2,
        "head_from_layer": layer,
        "layer_scale_init": (scale if scale else 0.1) if has_scale else 0.0,
    }
    if "lm_head.weight" in state:
        values["vocab_size"] = int(state["lm_head.weight"].shape[0])
    names = {f.name for f in fields(BEiTConfig)}
    return BEiTConfig(**{**values, **{k: v for k, v in tap.items() if k in names}})


def split_checkpoint(
    checkpoint: Mapping[str, Any], need_tap: bool = True
) -> tuple[dict[str, torch.Tensor], BEiTConfig]:
    """(state dict, model config) of a pretraining checkpoint (ours or the reference's) or of a
    bare state dict; the state dict is filtered for ``BEiTv2`` (:func:`checkpoint_filter_fn`).
    ``need_tap`` as in :func:`config_from_state_dict`."""
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise BackboneError(
            "checkpoint has no state dict: expected {'model': state_dict, 'config': {...}} "
            "or a bare state dict of tensors"
        )
    state_dict = checkpoint_filter_fn(state, None)
    config = checkpoint.get("config")
    model_config = config.get("model") if isinstance(config, Mapping) else None
    model_config = model_config if model_config is not None else checkpoint.get("model_config")
    partial = dict(model_config) if isinstance(model_config, Mapping) else {}
    if {"width", "size"} & set(partial):  # a whole config (asdict form, or a named size)
        return state_dict, config_from_dict(partial)
    cfg = config_from_state_dict(state_dict, checkpoint.get("args"), partial, need_tap)
    return state_dict, cfg


# ---- the filter -----------------------------------------------------------------------------


def per_block_tables(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """timm's layout of ``state``: the shared table copied into each of ``depth`` blocks, the
    pretraining-only parts dropped."""
    table = state[SHARED_TABLE]
    out = {k: v for k, v in state.items() if not k.startswith(PRETRAIN_ONLY)}
    for i in range(depth):
        # Separate copies: safetensors refuses shared storage, and fine-tuning may let them drift.
        out[f"blocks.{i}.attn.relative_position_bias_table"] = table.detach().clone()
    return out


def checkpoint_filter_fn(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module | None
) -> dict[str, torch.Tensor]:
    """``state_dict`` (ours, the reference's or a timm backbone's) in ``model``'s key layout.

    ``model`` is a ``BEiTv2`` (or None: the ``BEiTv2`` layout) or a timm ``Beit``. Wrapper
    prefixes and rebuilt buffers go; for a timm model with per-block tables the shared table is
    copied into every block; for any timm model the pretraining-only parts are dropped.
    """
    state = {
        k: v for k, v in _strip_wrappers(state_dict).items() if not k.endswith(REBUILT_BUFFERS)
    }
    if model is None or isinstance(model, BEiTv2):
        if SHARED_TABLE not in state and "blocks.0.attn.relative_position_bias_table" in state:
            raise BackboneError(
                "this is a backbone file (per-block position tables, no mask token or LM head), "
                "not a pretraining checkpoint; use it with stage=linprobe/finetune, or pass the "
                "checkpoint stage 3 wrote"
            )
        return state
    per_block = getattr(model, "rel_pos_bias", None) is None
    if SHARED_TABLE in state and per_block:
        return per_block_tables(state, len(model.blocks))
    keep_shared = (SHARED_TABLE,) if not per_block else ()
    return {
        k: v
        for k, v in state.items()
        if k in keep_shared or not k.startswith(PRETRAIN_ONLY + ("head.",))
    }


def load_beitv2(checkpoint: Mapping[str, Any], need_tap: bool = True) -> tuple[BEiTv2, BEiTConfig]:
    """The ``BEiTv2`` of a checkpoint (ours or the reference's), loaded strictly.

    ``need_tap=False`` when only ``forward_features`` will run (the CLS head's tap unused).
    """
    state, cfg = split_checkpoint(checkpoint, need_tap)
    model = BEiTv2(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise BackboneError(f"checkpoint does not match {cfg}: {err}") from None
    return model, cfg
