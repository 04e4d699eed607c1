"""Stops a training loop on a non-finite loss, with an error that says where and what to try."""

from __future__ import annotations

import math

from engine.errors import NonFiniteLoss


def check_finite(loss: float, step: int, epoch: int | None = None, hint: str = "") -> None:
    """Raise :class:`NonFiniteLoss` naming the step when ``loss`` is NaN or infinite.

    ``loss`` is the already-synchronised Python float the loop logs anyway, so the check costs
    nothing extra. ``step`` is the 1-based optimiser step whose forward produced it.
    """
    if math.isfinite(loss):
        return
    where = f"step {step}" + (f" (epoch {epoch})" if epoch is not None else "")
    raise NonFiniteLoss(
        f"the training loss is {loss} at {where}; the weights are no longer usable. Lower the "
        "learning rate (train.blr), raise train.warmup_epochs, or try train.precision=fp32"
        + (f"; {hint}" if hint else "")
    )
