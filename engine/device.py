"""Which device a training or evaluation process runs on (``train.device=auto|cpu|cuda``)."""

from __future__ import annotations

import os

import torch

from engine.errors import UserError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK`` under torchrun) when CUDA is visible, else
    the CPU. ``cuda`` without a visible GPU is a user error, not a silent fallback."""
    if name not in DEVICES:
        raise UserError(f"train.device={name!r}: choose one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")
