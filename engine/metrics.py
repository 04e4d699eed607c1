"""Where a run's numbers go: ``metrics.jsonl`` (the source of truth), TensorBoard, and W&B.

Every record is one JSON line with at least ``kind`` (``step`` or ``epoch``) and ``step``; the
numeric fields of a record are also written as TensorBoard scalars ``<kind>/<key>`` at that step
(``out_dir/tensorboard``; ``log.tensorboard=false`` turns it off) and, when ``log.wandb=<project>``
is set and ``wandb`` is installed, to Weights & Biases. W&B is never required: a missing package
or a failed login is a warning, and without credentials it runs offline (files under
``out_dir/wandb``, uploadable later with ``wandb sync``).

A resumed run first drops the records past its checkpoint (:meth:`MetricsWriter.open` with
``keep``) so the JSONL reads as one uninterrupted run; TensorBoard is told to purge the same
steps.

Importing this module is cheap (no torch): the :class:`LogSpec` config section lives here.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


@dataclass(frozen=True)
class LogSpec:
    """Where metrics go besides out_dir/metrics.jsonl."""

    tensorboard: bool = True  # also write TensorBoard event files to out_dir/tensorboard
    # a Weights & Biases project name (needs `pip install wandb`; offline without a login)
    wandb: str | None = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (blank lines skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    """Appends records to ``out_dir/metrics.jsonl`` and mirrors them to TensorBoard/W&B.

    Only the main rank writes: on other ranks (``enabled=False``) every method is a no-op.
    """

    def __init__(
        self,
        out_dir: str | Path,
        spec: LogSpec | None = None,
        *,
        enabled: bool = True,
        keep: Callable[[dict[str, Any]], bool] | None = None,
        resume_step: int = 0,
        config: dict[str, Any] | None = None,
    ) -> None:
        """Open the run's metrics. ``keep``: records to keep from an earlier, interrupted run
        (None = start afresh); ``resume_step``: the step the run continues from."""
        self.path = Path(out_dir) / METRICS
        self.enabled = enabled
        self._tb: Any = None
        self._wandb: Any = None
        if not enabled:
            return
        spec = spec or LogSpec()
        kept = [r for r in read_metrics(self.path) if keep(r)] if keep is not None else []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if spec.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # torch: --help imports LogSpec

            # purge_step: events a killed run wrote past its checkpoint are dropped on read.
            self._tb = SummaryWriter(
                str(Path(out_dir) / TENSORBOARD), purge_step=resume_step or None
            )
        if spec.wandb:
            self._wandb = _start_wandb(spec.wandb, Path(out_dir), config or {})

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (needs ``kind`` and ``step``) and mirror its numbers."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = int(record["step"])
        numbers = {
            f"{record['kind']}/{k}": float(v)
            for k, v in record.items()
            if k not in ("kind", "step")
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
            and math.isfinite(float(v))
        }
        if self._tb is not None:
            for tag, value in numbers.items():
                self._tb.add_scalar(tag, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _start_wandb(project: str, out_dir: Path, config: dict[str, Any]) -> Any:
    """A W&B run, or None (with a warning) when wandb is missing or cannot start."""
    try:
        import wandb  # optional: not a dependency of the project
    except ImportError:
        log.warning(
            "log.wandb=%s but wandb is not installed (pip install wandb); skipping", project
        )
        return None
    online = bool(os.environ.get("WANDB_API_KEY")) or os.environ.get("WANDB_MODE") == "online"
    mode = os.environ.get("WANDB_MODE") or ("online" if online else "offline")
    try:
        return wandb.init(project=project, dir=str(out_dir), config=config, mode=mode)
    except Exception as err:  # noqa: BLE001 - W&B is optional; a network or login failure
        log.warning("W&B did not start (%s); metrics stay in %s", err, out_dir / METRICS)
        return None
