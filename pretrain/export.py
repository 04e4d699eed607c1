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

A sidecar ``<file>.json`` records the backbone's own name (real size and resolution, e.g.
``beitv2_tiny_patch8_96``), the timm architecture and kwargs, and ``command``: the Python that
loads the file with timm (:func:`timm_command`).

Checkpoints are read by ``pretrain.checkpoints`` (the one checkpoint filter): ours (``"model"``
plus ``config["model"]`` or ``"model_config"``), a bare state dict (shapes read off the
tensors), or a reference (unilm) pretraining checkpoint.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from engine.atomic import write_bytes_atomic
from engine.checkpoint import save_atomic
from engine.errors import CheckpointNotFound, UserError
from pretrain.backbones import backbone_state_dict
from pretrain.checkpoints import (
    read_checkpoint,
    split_checkpoint,
)
from pretrain.model import BEIT_SIZES, BEiTConfig

logger = logging.getLogger(__name__)

USAGE = "usage: pipeline export <pretrain checkpoint> [out=<file .safetensors or .pth>]"


def timm_model_name(cfg: BEiTConfig) -> str:
    """The registered timm architecture ``timm.create_model`` builds (kwargs set the exact shape).

    timm registers only base and large ``beitv2_*`` names; the file's own name is
    :func:`export_name`.
    """
    return "beitv2_large_patch16_224" if cfg.width >= 1024 else "beitv2_base_patch16_224"


def export_name(cfg: BEiTConfig) -> str:
    """The backbone's real size and resolution, e.g. ``beitv2_tiny_patch8_96``.

    A named size (``BEIT_SIZES``) by its name; any other shape as ``w<width>d<depth>h<heads>``.
    """
    size = next(
        (
            name
            for name, v in BEIT_SIZES.items()
            if (v["width"], v["depth"], v["heads"]) == (cfg.width, cfg.depth, cfg.heads)
        ),
        f"w{cfg.width}d{cfg.depth}h{cfg.heads}",
    )
    return f"beitv2_{size}_patch{cfg.patch_size}_{cfg.image_size}"


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
    """Python code that loads the exported backbone with timm (absolute path: run it anywhere)."""
    absolute = Path(file).expanduser().resolve() if "://" not in str(file) else file
    args = ", ".join(f"{k}={v!r}" for k, v in timm_kwargs(cfg, absolute).items())
    return (
        f"import timm\n# {export_name(cfg)}: timm's {timm_model_name(cfg)} architecture at this "
        f"shape\nmodel = timm.create_model({timm_model_name(cfg)!r}, {args})"
    )


def _save(state_dict: dict[str, torch.Tensor], out: Path) -> None:
    # Atomic and shareable (mode per umask): a reader never sees half a file.
    if out.suffix == ".safetensors":
        write_bytes_atomic(out, save(state_dict, metadata={"format": "pt"}))
    else:
        save_atomic(state_dict, out)


def _load_checkpoint(path: str | Path) -> Any:
    try:
        return read_checkpoint(path)
    except CheckpointNotFound:
        raise CheckpointNotFound(
            f"checkpoint not found at {path}; pass the checkpoint.pth a pretrain run wrote"
        ) from None


def export_backbone(
    checkpoint: str | Path | Mapping[str, Any], out_path: str | Path
) -> dict[str, Any]:
    """Write the timm-loadable backbone of ``checkpoint`` (a path, a checkpoint dict or a bare
    state dict; ours or a reference pretraining checkpoint) to ``out_path`` (``.safetensors``,
    else ``torch.save``) plus ``<out_path>.json``.

    Returns a summary: ``name`` (real size and resolution, :func:`export_name`), ``path``
    (absolute), ``model_name`` (the timm architecture), ``timm_kwargs`` (without the file),
    ``command`` (Python that loads it) and ``config`` (the ``BEiTConfig`` as a dict).
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = _load_checkpoint(checkpoint)
    state_dict, cfg = split_checkpoint(checkpoint, need_tap=False)  # the backbone alone
    out = Path(out_path).expanduser().absolute()
    _save(backbone_state_dict(state_dict, cfg), out)
    summary = {
        "name": export_name(cfg),
        "path": str(out),
        "model_name": timm_model_name(cfg),
        "timm_kwargs": timm_kwargs(cfg),
        "command": timm_command(cfg, out),
        "config": asdict(cfg),
    }
    sidecar = out.with_name(out.name + ".json")
    write_bytes_atomic(sidecar, (json.dumps(summary, indent=2) + "\n").encode())
    logger.info("exported %s to %s (timm %s)", summary["name"], out, summary["model_name"])
    return summary


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
    except UserError as err:  # a wrong path or a file that is not a checkpoint: exit 2
        print(f"export of {checkpoint} failed: {err}", file=sys.stderr)
        return 2
    print(f"wrote {summary['path']}\nload it with:\n{summary['command']}")
    return 0
