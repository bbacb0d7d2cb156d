"""What one GRPO step logs: rewards and their components, lengths, clipping, times (generation, scoring,
optimisation, weight sync), the rollout engine's log-prob mismatch, and a text panel of a few rollouts."""

from __future__ import annotations

from typing import Any

import torch

from lightning_veripo.completions import Completions
from lightning_veripo.loggers import logged_step
from lightning_veripo.records import Rollout
from lightning_veripo.rollout.scores import Scores


def log_step(
    module: Any,
    completions: Completions,
    scores: Scores,
    advantages: torch.Tensor,
    keep: torch.Tensor,
    stats: dict[str, torch.Tensor],
    loss: torch.Tensor,
    times: tuple[float, float, float],
) -> None:
    lengths = completions.mask.sum(-1).float()
    n = len(lengths)
    log = {
        "train/loss": loss.detach(),
        "train/reward": scores.total.mean(),
        "train/reward_std": scores.total.std() if n > 1 else scores.total.new_zeros(()),
        "train/advantage_std": advantages.std() if n > 1 else advantages.new_zeros(()),
        "train/completion_length": lengths.mean(),
        "train/completion_length_min": lengths.min(),
        "train/completion_length_max": lengths.max(),
        "train/truncated_fraction": completions.truncated.float().mean(),
        "train/groups_dropped": 1.0 - keep.float().mean(),
        "train/gen_tokens_per_s": lengths.sum() / max(times[0], 1e-9),
        "train/time_generate_s": times[0],
        "train/time_score_s": times[1],
        "train/time_optimise_s": times[2],
        "train/time_sync_s": module._sync_s,
        **{f"train/{k}": v for k, v in stats.items()},
    }
    for name, values in scores.components.items():
        log[f"train/rewards/{name}"] = values.mean()
        log[f"train/rewards/{name}_std"] = values.std() if n > 1 else values.new_zeros(())
    bs = n // module.num_generations
    module.log_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in log.items()}, batch_size=bs)
    module.log("reward", scores.total.mean(), prog_bar=True, logger=False, batch_size=bs)
    module.log("acc", scores.accuracy.mean(), prog_bar=True, logger=False, batch_size=bs)
    module.log("train/accuracy", scores.accuracy.mean(), batch_size=bs)


def log_rollout_panel(module: Any, rollouts: list[Rollout], step: int) -> None:
    every = module.log_rollouts_every_n_steps
    writer = getattr(module.logger, "experiment", None) if module.logger is not None else None
    if not every or writer is None or not hasattr(writer, "add_text") or step % every:
        return
    rows = ["| problem | reward | advantage | completion |", "|---|---|---|---|"]
    for r in rollouts[: min(4, len(rollouts))]:
        text = r.completion.replace("|", "\\|").replace("\n", " ")[:300]
        rows.append(f"| {r.record.problem_id} | {r.reward:.2f} | {r.advantage:+.2f} | {text} |")
    writer.add_text("train/rollouts", "\n".join(rows), logged_step(module.logger, step))
