"""A callback the DDP tests name by dotted path (`gradients_for_tests.SaveGradients`), as a config would."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class SaveGradients(L.Callback):
    """Saves the trainable weights' gradients of the first optimiser step to `path` (rank zero only).

    Under DDP `on_before_optimizer_step` runs after the all-reduce, so the saved gradients are the ones the
    optimiser applies: comparing them with one process's is linear in the gradient, unlike comparing weights
    after Adam, whose normalised first step turns float noise in a near-zero gradient into a full `lr` step."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.saved = False

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.saved:
            return
        self.saved = True
        if trainer.is_global_zero:
            grads = {
                name: p.grad.detach().clone()
                for name, p in pl_module.named_parameters()
                if p.requires_grad and p.grad is not None
            }
            torch.save(grads, self.path)
