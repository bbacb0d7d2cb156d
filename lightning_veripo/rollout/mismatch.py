"""How far the rollout engine's per-token log-probs lie from the trainer's for the same tokens."""

from __future__ import annotations

import torch


def logprob_mismatch(
    trainer: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Over the unmasked tokens of [B, T] log-probs: mean and max |trainer - rollout|, and their Pearson
    correlation (1 when fewer than two tokens or no spread, where it is undefined)."""
    m = mask.bool()
    a, b = trainer.detach().double()[m], rollout.detach().double()[m]
    if a.numel() == 0:
        zero = trainer.new_zeros((), dtype=torch.float32)
        return {"mean": zero, "max": zero, "corr": zero + 1.0}
    diff = (a - b).abs()
    da, db = a - a.mean(), b - b.mean()
    denom = (da.square().sum() * db.square().sum()).sqrt()
    corr = (da * db).sum() / denom if a.numel() > 1 and denom > 0 else torch.ones((), dtype=torch.float64)
    return {"mean": diff.mean().float(), "max": diff.max().float(), "corr": corr.float()}
