"""Callbacks the FSDP2 tests name by dotted path (`fsdp2_for_tests.SaveFullGradients`), as a config would."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.distributed.tensor import DTensor


class SaveFullGradients(L.Callback):
    """Saves the trainable weights' gradients of the first optimiser step to `path`, as full tensors.

    Under FSDP2 a gradient is a `DTensor` sharded over the ranks, already reduce-scattered (averaged) when
    `on_before_optimizer_step` runs: every rank gathers each one (`full_tensor`, a collective), rank zero writes.
    Without sharding the gradients are plain tensors and are written as they are."""

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
