"""Rewards of one generation batch: the configured reward functions, then GRPO's optional shaping (DAPO's
overlong punishment, Video-R1's length bonus and T-GRPO's temporal bonus, which samples on shuffled frames).

`module` is the `GRPOModule` whose settings (num_generations, overlong_buffer, length_bonus, temporal...) apply.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from lightning_veripo.batching import shuffle_video_features
from lightning_veripo.completions import Completions
from lightning_veripo.records import VideoQARecord
from lightning_veripo.rewards import accuracy_reward
from lightning_veripo.rollout.records import naming_failures


class Scores(NamedTuple):
    """Rewards of one generation batch, prompt-major like the completions."""

    components: dict[str, torch.Tensor]  # name -> [N*G] unweighted values
    total: torch.Tensor  # [N*G] weighted sum + bonuses
    accuracy: torch.Tensor  # [N*G] accuracy reward (0 when not configured)


def score_rollouts(
    module: Any,
    completions: Completions,
    records: list[VideoQARecord],
    batch: dict[str, Any] | None = None,
    vision: dict[str, Any] | None = None,
) -> Scores:
    """Rewards for N*G completions: configured functions, then the optional bonuses and penalties."""
    G = module.num_generations
    expanded = [r for r in records for _ in range(G)]
    components, total = module.rewards.score(completions.text, expanded)
    device = completions.ids.device
    components = {k: v.to(device) for k, v in components.items()}
    total = total.to(device)
    accuracy = components.get("accuracy")
    if accuracy is None:
        accuracy = torch.tensor(
            [accuracy_reward(t, r) for t, r in zip(completions.text, expanded, strict=True)],
            device=device,
        )
    lengths = completions.mask.sum(-1).float()
    if module.overlong_buffer > 0:
        start = module.max_new_tokens - module.overlong_buffer
        overlong = ((start - lengths) / module.overlong_buffer).clamp(max=0.0) * module.overlong_penalty
        components["overlong"] = overlong
        total = total + overlong
    if module.length_bonus > 0:
        correct = (accuracy > 0).float().view(-1, G)
        enough = (correct.mean(1, keepdim=True) >= module.length_min_correct_fraction).float()
        lo, hi = module.length_window
        in_window = ((lengths >= lo) & (lengths <= hi)).float().view(-1, G)
        bonus = (module.length_bonus * correct * in_window * enough).flatten()
        components["length_bonus"] = bonus
        total = total + bonus
    if module.temporal and batch is not None and batch.get("video_grid_thw") is not None:
        bonus = temporal_bonus(module, batch, vision, records, accuracy)
        components["temporal"] = bonus
        total = total + bonus
    return Scores(components, total, accuracy.float())


def temporal_bonus(
    module: Any,
    batch: dict[str, Any],
    vision: dict[str, Any] | None,
    records: list[VideoQARecord],
    accuracy: torch.Tensor,
) -> torch.Tensor:
    """T-GRPO: sample on frames in shuffled order; reward correct ordered rollouts when order helped."""
    G = module.num_generations
    if vision is None:
        vision = module.backbone.encode_vision(batch, requires_grad=False)
    shuffled = {
        **vision,
        "video": shuffle_video_features(vision["video"], batch["video_grid_thw"], module.global_step),
    }
    with naming_failures(records, "temporal (shuffled-frame) generation"):
        completions = module._sample(batch, shuffled)
    expanded = [r for r in records for _ in range(G)]
    shuffled_acc = (
        torch.tensor(
            [accuracy_reward(t, r) for t, r in zip(completions.text, expanded, strict=True)],
            device=accuracy.device,
        )
        .view(-1, G)
        .mean(1, keepdim=True)
    )
    ordered = accuracy.view(-1, G)
    helped = (ordered.mean(1, keepdim=True) >= module.temporal_mu * shuffled_acc).float()
    return (module.temporal_alpha * (ordered > 0).float() * helped).flatten()
