"""Data-parallel process facts under ``torchrun`` (rank, world size), and the collectives used.

A process started by ``torchrun --nproc_per_node N`` finds ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``
in its environment; :meth:`Distributed.setup` joins the process group (NCCL on GPUs, gloo on the
CPU) and :meth:`Distributed.close` leaves it. A plain process is rank 0 of 1 and every collective
is the identity, so the stages run the same code either way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owned: bool = False  # this object initialised the process group (and destroys it)

    @classmethod
    def setup(cls, device: torch.device) -> Distributed:
        """Read the torchrun environment; join the process group when ``WORLD_SIZE > 1``."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        owned = False
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            owned = True
        rank = dist.get_rank() if world > 1 else 0
        return cls(rank, world, int(os.environ.get("LOCAL_RANK", "0")), owned)

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0

    @property
    def all_reduce(self) -> Callable[[torch.Tensor], Any] | None:
        """An in-place sum over ranks for modules that sync statistics, or None alone."""
        return dist.all_reduce if self.world_size > 1 else None

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (identity alone); returns it."""
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar metrics over ranks (float64 on the CPU: exact for a few ranks)."""
        if self.world_size == 1 or not values:
            return dict(values)
        t = torch.tensor(list(values.values()), dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(values, t.tolist(), strict=True)}

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def wrap(self, model: torch.nn.Module, device: torch.device, **kwargs: Any) -> torch.nn.Module:
        """``model`` under DistributedDataParallel when there are several ranks."""
        if self.world_size == 1:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, **kwargs)

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
            self.owned = False
