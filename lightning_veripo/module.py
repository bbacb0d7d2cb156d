"""What GRPOModule and DPOModule share: the backbone's lifecycle, trainable-only checkpoints, the optimizer."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_veripo import sharding
from lightning_veripo.backbone import VideoLLM
from lightning_veripo.policy import POLICY_KEY, check_policy
from lightning_veripo.random_state import RandomStateCallback


class VideoLLMModule(L.LightningModule):
    """A LightningModule around a `VideoLLM`.

    The backbone's weights are loaded in `configure_model` (where sharded strategies want them built).
    Checkpoints hold only the trainable weights (the adapter under LoRA) and the optimizer state; the frozen
    base comes back from `model_name_or_path` on resume. So a checkpoint also records the policy those weights
    belong to (`VideoLLM.policy_identity`: base model + merged adapters, in order), and loading it into a
    backbone built otherwise raises `PolicyMismatchError` naming the settings that rebuild it: a loop stage's
    checkpoint under a stand-alone config would otherwise evaluate another policy without a word.
    """

    strict_loading = False

    def __init__(self, backbone: VideoLLM, lr: float, weight_decay: float, warmup_steps: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps

    def configure_callbacks(self) -> list[L.Callback]:
        """Every fit's checkpoints carry the random states, so a resumed fit is the uninterrupted one."""
        return [RandomStateCallback()]

    def configure_model(self) -> None:
        self.backbone.load()
        if self._trainer is not None and sharding.uses_fsdp2(self.trainer.strategy):
            sharding.shard_backbone(self.backbone, self.device_mesh["data_parallel"], self.trainer.strategy)

    def _trainable_names(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        keep = {prefix + n for n in self._trainable_names()}
        return type(full)((k, v) for k, v in full.items() if k in keep)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # FSDP bypasses the state_dict override above; filter here too.
        keep = self._trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[POLICY_KEY] = self.backbone.policy_identity()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()
        saved = checkpoint.get(POLICY_KEY)
        if saved is None:
            rank_zero_warn(
                "the checkpoint records no policy (it predates lightning_veripo recording one): nothing checks "
                "that the base model and merged adapters built here are the ones its weights were trained on"
            )
            return
        check_policy(saved, self.backbone.policy_identity())

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Move the tensors of a batch; records, prompts and sampling settings stay as they are."""
        return _to_device(batch, device)

    def configure_optimizers(self) -> dict[str, Any]:
        params = list(self.backbone.trainable_parameters())
        if not params:
            raise ValueError("the backbone has no trainable parameters: enable LoRA or unfreeze weights")
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        warmup = max(self.warmup_steps, 0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuples such as Completions
        return type(value)(*(_to_device(v, device) for v in value))
    return value
