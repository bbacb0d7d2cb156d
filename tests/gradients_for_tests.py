"""A callback the DDP and FSDP2 tests name by dotted path (`gradients_for_tests.SaveGradients`), as a config would."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.distributed.tensor import DTensor


class SaveGradients(L.Callback):
    """Saves the trainable weights' gradients of the first optimiser step to `path`, as full tensors (rank zero
    writes).

    `on_before_optimizer_step` runs after DDP's all-reduce and FSDP2's reduce-scatter, so the saved gradients are
    the ones the optimiser applies: comparing them with one process's is linear in the gradient, unlike
    comparing weights after Adam, whose normalised first step turns float noise in a near-zero gradient into a
    full `lr` step. Under FSDP2 a gradient is a `DTensor` sharded over the ranks: every rank gathers each one
    (`full_tensor`, a collective); under DDP or on one process it is a plain tensor, written as it is."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.saved = False

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.saved:
            return
        self.saved = True
        grads = {}
        for name, p in pl_module.named_parameters():
            if p.requires_grad and p.grad is not None:
                grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                grads[name] = grad.detach().clone()
        if trainer.is_global_zero:
            torch.save(grads, self.path)
