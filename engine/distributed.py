"""Data-parallel process facts (rank, world size) under ``torchrun`` or ``srun``, and the collectives.

A process started by ``torchrun --nproc_per_node N`` or as one of the tasks of ``srun -n N`` learns
its place from its environment (``engine.launch``: torchrun's variables win, a SLURM step task
with more than one task is the other distributed launch, anything else is one process).
:meth:`Distributed.setup` writes that place as torchrun's variables, joins the process group with
``init_method="env://"`` (NCCL on GPUs, gloo on the CPU) and :meth:`Distributed.close` leaves
it. A plain process is rank 0 of 1 and every collective is the identity, so the stages run the
same code either way. On GPUs each rank uses ``cuda:<local rank>`` (``engine.device``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from engine.launch import launch_from_env


@dataclass
class Distributed:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owned: bool = False  # this object initialised the process group (and destroys it)

    @classmethod
    def setup(cls, device: torch.device) -> Distributed:
        """Read the torchrun or srun environment; join the process group when there are
        several ranks."""
        launch = launch_from_env()
        owned = False
        if launch.world_size > 1 and not dist.is_initialized():
            launch.export()
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method="env://")
            owned = True
        rank = dist.get_rank() if launch.world_size > 1 else 0
        return cls(rank, launch.world_size, launch.local_rank, owned)

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
