"""A callback the guard tests name by class path (`corrupt_for_tests.CorruptAdapter`, tests/ on PYTHONPATH): it
makes a stage worse on purpose by overwriting the fit's LoRA adapter with large random weights when the fit ends,
so the adapter the loop saves is a broken policy."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class CorruptAdapter(Callback):
    def __init__(self, std: float = 3.0, seed: int = 0) -> None:
        self.std, self.seed = std, seed

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for name, p in pl_module.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * self.std)
