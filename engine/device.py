"""Which device a training or evaluation process runs on (``train.device=auto|cpu|cuda``)."""

from __future__ import annotations

import torch

from engine.errors import UserError
from engine.launch import launch_from_env

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: this process's GPU when CUDA is visible, else the CPU. ``cuda`` without a
    visible GPU is a user error, not a silent fallback.

    This process's GPU is ``cuda:<local rank>`` (``LOCAL_RANK`` under torchrun,
    ``SLURM_LOCALID`` under srun; ``engine.launch``), modulo the visible devices: a task that
    SLURM bound to one GPU (``--gpus-per-task=1``) sees only that one, as ``cuda:0``."""
    if name not in DEVICES:
        raise UserError(f"train.device={name!r}: choose one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        index = launch_from_env().local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")
