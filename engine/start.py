"""The start every training entry point shares (stages 1 and 3, the linear probe, fine-tuning).

``with start_run(cfg) as run:`` does, in this order:

1. resolve ``train.device`` (``engine.device``: this rank's GPU, else the CPU) and
   ``train.precision`` for that device (``engine.precision``); the resolved precision replaces
   ``auto`` in the frozen config, so ``config.yaml``, checkpoints and summaries record what ran;
2. join the ranks of a ``torchrun`` or ``srun`` launch (``engine.distributed``), or refuse one
   for a stage that runs in one process;
3. hold ``out_dir`` for the whole run (``engine.lock``: the main rank holds it, and when another
   run does, every rank is refused), create it and write the resolved ``config.yaml`` there;
4. seed torch's global generator with ``train.seed`` (the same initial weights on every rank).

Leaving the ``with`` block leaves the process group and lets go of ``out_dir``.
:meth:`Run.metrics` opens the run's metrics writer, the same way for every stage (only the main
rank writes).

A stage config qualifies when it has ``out_dir``, ``log`` (an ``engine.metrics.LogSpec``) and a
``train`` section with ``device``, ``precision`` and ``seed``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from engine.config import StageConfig, save_config, to_dict
from engine.device import resolve_device
from engine.distributed import Distributed
from engine.errors import UserError
from engine.launch import launch_from_env
from engine.lock import check_output, hold
from engine.metrics import MetricsWriter
from engine.precision import resolve_precision

CONFIG = "config.yaml"

C = TypeVar("C", bound=StageConfig)


@dataclass(frozen=True)
class Run(Generic[C]):
    """A started run: its config (precision resolved), device, place among the ranks, folder."""

    cfg: C
    device: torch.device
    precision: str  # the resolved train.precision: fp32, bf16 or fp16
    ddp: Distributed
    out: Path
    held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    def metrics(
        self, keep: Callable[[dict[str, Any]], bool] | None = None, resume_step: int = 0
    ) -> MetricsWriter:
        """The run's ``metrics.jsonl`` (+ TensorBoard, W&B), written by the main rank only.
        ``keep``/``resume_step``: what a resumed run keeps of the interrupted one's records."""
        return MetricsWriter(
            self.out,
            self.cfg.log,  # type: ignore[attr-defined]
            enabled=self.ddp.main,
            keep=keep,
            resume_step=resume_step,
            config=to_dict(self.cfg),
        )

    def __enter__(self) -> Run[C]:
        return self

    def __exit__(self, *_exc: object) -> None:
        try:
            self.ddp.close()
        finally:
            self.held.close()


def check_run_settings(cfg: StageConfig) -> None:
    """The settings every training stage shares, checked before anything is written: an
    ``out_dir`` that can be a folder (numbers were checked against their ranges when the config
    was built, see ``engine.config.Range``)."""
    check_output(str(cfg.out_dir), "this run's outputs")  # type: ignore[attr-defined]


def start_run(cfg: C, *, data_parallel: bool = True) -> Run[C]:
    """Start a run of ``cfg`` (see the module docstring). ``data_parallel=False``: the stage runs
    in one process, and a launch of several ranks is refused before any work."""
    train = cfg.train  # type: ignore[attr-defined]
    check_run_settings(cfg)
    device = resolve_device(train.device)
    precision = resolve_precision(train.precision, device)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(train, precision=precision))
    launch = launch_from_env()
    if not data_parallel and launch.world_size > 1:
        raise UserError(
            f"this stage runs in one process, but {launch.launcher} started it as rank "
            f"{launch.rank} of {launch.world_size}; run it without torchrun, or with srun -n 1"
        )
    ddp = Distributed.setup(device)
    held = contextlib.ExitStack()
    try:
        out = Path(cfg.out_dir)  # type: ignore[attr-defined]
        _hold(out, ddp, held)
        if ddp.main:
            save_config(cfg, out / CONFIG)
        torch.manual_seed(train.seed)
    except BaseException:
        held.close()
        ddp.close()
        raise
    return Run(cfg, device, precision, ddp, out, held)


def _hold(out: Path, ddp: Distributed, held: contextlib.ExitStack) -> None:
    """The main rank holds ``out`` (creating it) in ``held``. Only it writes there, so only it
    locks; its refusal is every rank's, so no rank is left waiting for it in a collective."""
    refusal: UserError | None = None
    if ddp.main:
        try:
            held.enter_context(hold(str(out)))
        except UserError as err:
            refusal = err
    message = ddp.gather_objects(None if refusal is None else str(refusal))[0]
    if refusal is not None:
        raise refusal
    if message is not None:
        raise UserError(message)
