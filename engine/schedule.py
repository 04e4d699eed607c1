"""The learning-rate schedule every training stage uses: linear warmup, then cosine to a floor.

One rule, the reference's (docs/method.md §3): over the first ``W`` steps the rate rises linearly
from ``start`` to ``peak`` *inclusive*, so step ``W - 1`` already runs at the peak (the warmup is
``linspace(start, peak, W)``); steps ``W .. T - 1`` follow a half cosine from ``peak`` at step
``W`` down towards ``floor`` (reached after the last step). A one-step warmup therefore runs
step 0 at ``start``, as ``numpy.linspace(start, peak, 1)`` does.

Stages call :func:`lr_at` once per optimiser step with the global step count, so the value is a
pure function of (step, schedule): resuming from a checkpoint needs no scheduler state.

The peak is :func:`scaled_lr` of a stage's ``train.blr``, the rule every config's ``lr`` property
applies. No torch here: the configs import this module, and the CLI imports them for ``--help``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """A warmup + cosine schedule over ``total_steps`` optimiser steps."""

    peak: float
    total_steps: int
    warmup_steps: int = 0
    floor: float = 0.0
    start: float = 0.0

    def __call__(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.peak, self.floor, self.start)


def lr_at(
    step: int, total_steps: int, warmup_steps: int, peak: float, floor: float, start: float = 0.0
) -> float:
    """Learning rate of optimiser step ``step`` (0-based); see the module docstring."""
    if step < warmup_steps:
        if warmup_steps == 1:
            return start
        return start + (peak - start) * step / (warmup_steps - 1)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def scaled_lr(blr: float, batch_size: int, reference_batch: int) -> float:
    """The linear scaling rule: ``blr`` is the rate at ``reference_batch`` images per step."""
    return blr * batch_size / reference_batch
