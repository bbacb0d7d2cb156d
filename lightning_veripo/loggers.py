"""A TensorBoard logger whose step axis can start where an earlier fit stopped.

The VerIPO loop runs several fits (SFT, GRPO, DPO, ...), each a fresh `Trainer` whose `global_step` starts at
0. Written into one TensorBoard directory as they are, every stage's curve would start at x = 0. The loop gives
each stage's logger the number of optimizer steps of the stages before it as `step_offset`, so the curves of
the whole run follow each other on one axis.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard import SummaryWriter


class LoopTensorBoardLogger(TensorBoardLogger):
    """`TensorBoardLogger` that adds `step_offset` to every step it writes (scalars through `log_metrics`;
    modules and callbacks that write to `experiment` directly use `logged_step`)."""

    def __init__(self, *args: Any, step_offset: int = 0, **kwargs: Any) -> None:
        if step_offset < 0:
            raise ValueError(f"step_offset must be >= 0, got {step_offset}")
        super().__init__(*args, **kwargs)
        self.step_offset = step_offset

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, None if step is None else step + self.step_offset)


def logged_step(logger: Any, step: int) -> int:
    """The x value a logger shows for the trainer's `step` (the step plus its `step_offset`, if it has one)."""
    return step + int(getattr(logger, "step_offset", 0))


def log_scalars(log_dir: Path, scalars: Mapping[str, float], step: int) -> None:
    """Scalars outside a fit (the loop's evaluations and judge audits), at `step` of the loop's axis."""
    with SummaryWriter(str(log_dir)) as writer:
        for key, value in scalars.items():
            writer.add_scalar(key, value, step)
