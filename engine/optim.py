"""Parameter groups and the AdamW every training stage builds (fp32 master weights and state).

Weight decay follows timm's ``param_groups_weight_decay`` (the reference's optimiser factory):
no decay for 1-D parameters (norms, layer-scale gammas), biases, and the names a model lists in
``no_weight_decay()`` (``cls_token``, ``pos_embed``...). The optimiser keeps its state in the
parameters' dtype, fp32: mixed precision only changes the forward (``engine.precision``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from timm.optim import param_groups_weight_decay


def param_groups(
    model: torch.nn.Module, weight_decay: float, no_weight_decay: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """AdamW groups: decayed weights and the undecayed rest (see the module docstring)."""
    skip = set(no_weight_decay)
    listed = getattr(model, "no_weight_decay", None)
    if callable(listed):
        skip |= set(listed())
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=sorted(skip))


def adamw(
    groups: list[dict[str, Any]] | Iterable[torch.nn.Parameter],
    *,
    lr: float,
    betas: tuple[float, ...] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    device: torch.device | str = "cpu",
) -> torch.optim.AdamW:
    """AdamW with the fastest update the device has: fused kernels on CUDA, foreach on CPU."""
    kind = torch.device(device).type
    fast = {"fused": True} if kind == "cuda" else {"foreach": True}
    return torch.optim.AdamW(
        groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **fast
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's rate to ``lr`` times its ``lr_scale`` (layer-wise decay, 1 elsewhere)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
