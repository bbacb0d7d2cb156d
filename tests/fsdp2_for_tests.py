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


class ExportAdapterAndOutputs(L.Callback):
    """At the end of training: the stage's adapter exported to `out/adapter` (every rank calls it; under FSDP2
    it is gathered to full tensors and written once), and each rank's last training batch with the policy's
    log-probs of that batch's rollouts under the (sharded) model, to `out/outputs_rank{R}.pt`, so a test can
    score the same rollouts with the exported adapter in one process."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.last: tuple[dict, torch.Tensor, torch.Tensor] | None = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:  # noqa: ANN001
        rollouts = outputs["rollouts"]
        width = max(len(r.completion_ids) for r in rollouts)
        ids = torch.full((len(rollouts), width), pl_module.backbone.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rollouts):
            ids[i, : len(r.completion_ids)] = torch.tensor(r.completion_ids)
            mask[i, : len(r.completion_ids)] = 1
        self.last = (batch, ids, mask)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.last is not None
        batch, ids, mask = self.last
        pl_module.backbone.save_pretrained(self.out / "adapter")
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            logps = pl_module.backbone.sequence_logprobs(
                batch, ids, mask, num_samples=pl_module.num_generations
            )
        pl_module.train(was_training)
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        torch.save({"batch": tensors, "ids": ids, "mask": mask, "logps": logps},
                   self.out / f"outputs_rank{trainer.global_rank}.pt")  # fmt: skip


class SaveGlobalLoss(L.Callback):
    """Saves the first training step's loss averaged over the ranks (what one process would compute for the
    global batch when every rank holds the same number of samples) to `path`, from rank zero."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.saved = False

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:  # noqa: ANN001
        if self.saved:
            return
        self.saved = True
        loss = outputs["loss"].detach().float()
        mean = trainer.strategy.reduce(loss, reduce_op="mean")
        if trainer.is_global_zero:
            torch.save(mean.cpu(), self.path)
