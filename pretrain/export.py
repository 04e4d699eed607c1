"""Export a pretraining checkpoint as a backbone file that timm loads (docs/method.md §4, way (b)).

timm's registered ``beitv2_*`` models give every block its own relative position table, while
pretraining shares one; the export copies the shared table into each block's
``attn.relative_position_bias_table`` (what the reference fine-tuning does) and drops the
pretraining-only parts: ``mask_token``, ``lm_head.*``, ``cls_pt_layers.*`` (and the
``relative_position_index`` buffers, which timm rebuilds). The final ``norm.*`` is kept.

Loading it (``timm_kwargs(cfg, file)`` returns these arguments)::

    timm.create_model(
        "beitv2_base_patch16_224", pretrained=True,
        pretrained_cfg_overlay=dict(file=<file>, num_classes=0),
        num_classes=0, global_pool="token", use_fc_norm=False,
        img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
        init_values=0.1,
    )

- ``num_classes=0`` in the overlay *and* the kwargs: the file has no classifier, and when the two
  agree timm loads strictly (a missing or extra key is an error, not a silent random init).
- ``use_fc_norm=False`` keeps timm's ``norm`` (the pretrained final norm over all tokens); timm's
  default for ``beitv2_*`` (average pooling + a fresh ``fc_norm``) would leave it unused.
  ``global_pool="token"`` pools the CLS token, which the CLS head trains (BEiT v2 §3.2);
  ``"avg"`` (with ``use_fc_norm=False``) averages the normed patch tokens instead.
- The shape kwargs make the same call build tiny/small/large or any test size; for ViT-B/16 at
  224 px they equal timm's defaults.

"Same features" means: ``timm_model.forward_features(x)`` (normed tokens [B, 1+N, D]) equals
``BEiTv2.forward_features(x)`` with max abs difference <= 1e-5 (fp32, eval mode).

A sidecar ``<file>.json`` records the timm model name and kwargs, so ``timm_backbone(file)``
rebuilds the timm model from the file alone.

Checkpoint format read (written by ``pretrain.train``): a dict with ``"model"`` (our state dict,
``module.``/``_orig_mod.`` prefixes tolerated) and the model config as ``config["model"]``
(``asdict(BEiTConfig)``, optionally with a ``size`` name from ``BEIT_SIZES``) or as a top-level
``"model_config"``. Without a config the shapes are read off the state dict.
"""

from __future__ import annotations

import json
import logging
import pickle
import sys
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from pretrain.model import BEIT_SIZES, BEiTConfig, BEiTv2

logger = logging.getLogger(__name__)

# Parameters only pretraining uses; timm's backbone has no place for them.
PRETRAIN_ONLY = ("mask_token", "lm_head.", "cls_pt_layers.", "rel_pos_bias.")
SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

USAGE = "usage: pipeline export <pretrain checkpoint> [out=<file .safetensors or .pth>]"


def timm_model_name(cfg: BEiTConfig) -> str:
    """The registered timm model the backbone loads into (kwargs set the exact shape)."""
    return "beitv2_large_patch16_224" if cfg.width >= 1024 else "beitv2_base_patch16_224"


def timm_kwargs(cfg: BEiTConfig, file: str | Path | None = None) -> dict[str, Any]:
    """``timm.create_model`` kwargs building the backbone of ``cfg``; with ``file``, loading it.

    Use as ``timm.create_model(timm_model_name(cfg), **timm_kwargs(cfg, file))``.
    """
    kwargs: dict[str, Any] = {
        "img_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "embed_dim": cfg.width,
        "depth": cfg.depth,
        "num_heads": cfg.heads,
        "mlp_ratio": cfg.mlp_ratio,
        # 0.0, not None: timm.create_model drops None kwargs and would keep beitv2's 1e-5.
        "init_values": float(cfg.layer_scale_init),
        "num_classes": 0,
        "global_pool": "token",
        "use_fc_norm": False,
    }
    if file is not None:
        kwargs["pretrained"] = True
        # num_classes=0 here too: timm then sees no classifier mismatch and loads strictly.
        kwargs["pretrained_cfg_overlay"] = {
            "file": str(file),
            "num_classes": 0,
            "input_size": (3, cfg.image_size, cfg.image_size),
        }
    return kwargs


def timm_command(cfg: BEiTConfig, file: str | Path) -> str:
    """Python code that loads the exported backbone with timm."""
    args = ", ".join(f"{k}={v!r}" for k, v in timm_kwargs(cfg, file).items())
    return f'import timm\nmodel = timm.create_model("{timm_model_name(cfg)}", {args})'


def _strip_wrappers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DDP and torch.compile wrap parameter names; the weights are the same.
    out = {}
    for key, value in state_dict.items():
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def config_from_dict(model_config: Mapping[str, Any]) -> BEiTConfig:
    """Rebuild a ``BEiTConfig`` from its stored dict (``asdict`` form; ``size`` picks a preset)."""
    names = {f.name for f in fields(BEiTConfig)}
    values = dict(BEIT_SIZES.get(str(model_config.get("size", "")), {}))
    unknown = sorted(set(model_config) - names - {"size"})
    if unknown:
        logger.warning("ignoring model config keys %s (not BEiTConfig fields)", unknown)
    values.update({k: v for k, v in model_config.items() if k in names})
    return BEiTConfig(**values)


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> BEiTConfig:
    """Read the model shape off a state dict (for checkpoints stored without their config)."""
    try:
        table = state_dict[SHARED_TABLE]  # [(2g-1)^2 + 3, heads]
        width = state_dict["cls_token"].shape[-1]
        patch = state_dict["patch_embed.proj.weight"].shape[-1]
        hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise ValueError(
            f"state dict has no {err.args[0]!r}: not a BEiT v2 pretraining checkpoint "
            "(expected the keys of pretrain.model.BEiTv2)"
        ) from None
    side = (round((table.shape[0] - 3) ** 0.5) + 1) // 2
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    head_ids = {int(k.split(".")[1]) for k in state_dict if k.startswith("cls_pt_layers.")}
    values: dict[str, Any] = {
        "image_size": side * patch,
        "patch_size": patch,
        "width": width,
        "depth": depth,
        "heads": table.shape[1],
        "mlp_ratio": hidden / width,
        "use_cls_head": bool(head_ids),
        "head_layers": len(head_ids) or 2,
        "layer_scale_init": 0.1 if "blocks.0.gamma_1" in state_dict else 0.0,
    }
    if "lm_head.weight" in state_dict:
        values["vocab_size"] = state_dict["lm_head.weight"].shape[0]
    return BEiTConfig(**values)


def _load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint not found at {path}; pass the .pt file a pretrain run wrote"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Our own checkpoints may hold non-tensor training state (e.g. numpy RNG states).
        logger.warning("%s holds non-tensor objects; loading it with weights_only=False", path)
        return torch.load(path, map_location="cpu", weights_only=False)


def split_checkpoint(
    checkpoint: Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], BEiTConfig]:
    """(state dict, model config) of a pretraining checkpoint dict or of a bare state dict."""
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(
            "checkpoint has no state dict: expected {'model': state_dict, 'config': {...}} "
            "or a bare state dict of tensors"
        )
    state_dict = _strip_wrappers(state)
    config = checkpoint.get("config")
    model_config = config.get("model") if isinstance(config, Mapping) else None
    model_config = model_config if model_config is not None else checkpoint.get("model_config")
    if isinstance(model_config, Mapping):
        cfg = config_from_dict(model_config)
    else:
        cfg = config_from_state_dict(state_dict)
    return state_dict, cfg


def backbone_state_dict(
    state_dict: Mapping[str, torch.Tensor], cfg: BEiTConfig
) -> dict[str, torch.Tensor]:
    """timm ``beitv2_*`` state dict: shared table copied into every block, pretraining parts dropped.

    Checks ``state_dict`` against ``BEiTv2(cfg)`` first, so a checkpoint that does not match its
    config fails here, naming the keys, rather than later inside timm.
    """
    with torch.device("meta"):
        reference = BEiTv2(cfg)
    try:
        result = reference.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"checkpoint does not match its model config ({cfg}): {err}") from None
    problems = [f"missing {k}" for k in result.missing_keys]
    problems += [
        f"unexpected {k}" for k in result.unexpected_keys if "relative_position_index" not in k
    ]
    if problems:
        raise ValueError(
            "checkpoint does not match its model config "
            f"({cfg}): {', '.join(problems[:8])}{' ...' if len(problems) > 8 else ''}"
        )
    table = state_dict[SHARED_TABLE]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(PRETRAIN_ONLY) or "relative_position_index" in key:
            continue
        out[key] = value.detach().cpu().contiguous()
    for i in range(cfg.depth):
        # Separate copies: safetensors refuses shared storage, and fine-tuning may let them drift.
        out[f"blocks.{i}.attn.relative_position_bias_table"] = table.detach().cpu().clone()
    return out


def _save(state_dict: dict[str, torch.Tensor], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, str(tmp), metadata={"format": "pt"})
    else:
        torch.save(state_dict, tmp)
    tmp.replace(out)  # atomic: a reader never sees half a file


def export_backbone(
    checkpoint: str | Path | Mapping[str, Any], out_path: str | Path
) -> dict[str, Any]:
    """Write the timm-loadable backbone of ``checkpoint`` (a path, a checkpoint dict or a bare
    state dict) to ``out_path`` (``.safetensors``, else ``torch.save``) plus ``<out_path>.json``.

    Returns a summary: ``path``, ``model_name``, ``timm_kwargs`` (without the file),
    ``command`` (Python that loads it) and ``config`` (the ``BEiTConfig`` as a dict).
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = _load_checkpoint(checkpoint)
    state_dict, cfg = split_checkpoint(checkpoint)
    out = Path(out_path)
    _save(backbone_state_dict(state_dict, cfg), out)
    summary = {
        "path": str(out),
        "model_name": timm_model_name(cfg),
        "timm_kwargs": timm_kwargs(cfg),
        "command": timm_command(cfg, out),
        "config": asdict(cfg),
    }
    sidecar = out.with_name(out.name + ".json")
    sidecar.write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("exported backbone to %s (timm %s)", out, summary["model_name"])
    return summary


def timm_backbone(file: str | Path) -> torch.nn.Module:
    """Build the timm model of an exported backbone from the file and its ``.json`` sidecar."""
    import timm

    file = Path(file)
    sidecar = file.with_name(file.name + ".json")
    if not sidecar.is_file():
        raise FileNotFoundError(
            f"no {sidecar} beside the backbone; re-export it with `pipeline export <checkpoint>`"
        )
    cfg = BEiTConfig(**json.loads(sidecar.read_text())["config"])
    return timm.create_model(timm_model_name(cfg), **timm_kwargs(cfg, file))


def main(argv: list[str]) -> int:
    """``pipeline export <checkpoint> [out=<file>]``: export and print how to load it."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    positional = [a for a in argv if "=" not in a]
    options = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = sorted(set(options) - {"out"})
    if len(positional) != 1 or unknown:
        print(
            f"expected one checkpoint and optionally out=<file>; got {argv}\n{USAGE}",
            file=sys.stderr,
        )
        return 2
    checkpoint = Path(positional[0])
    out = options.get("out") or str(checkpoint.with_suffix(".timm.safetensors"))
    try:
        summary = export_backbone(checkpoint, out)
    except (FileNotFoundError, ValueError) as err:
        print(f"export failed: {err}", file=sys.stderr)
        return 1
    print(f"wrote {summary['path']}\nload it with:\n{summary['command']}")
    return 0
