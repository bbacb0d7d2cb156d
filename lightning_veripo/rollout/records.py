"""Rollout records of one GRPO step, and failures of a rollout phase that name the problems they hit."""

from __future__ import annotations

from typing import Any

import torch

from lightning_veripo.completions import Completions
from lightning_veripo.records import Rollout, VideoQARecord


def rollout_records(
    batch: dict[str, Any],
    completions: Completions,
    components: dict[str, torch.Tensor],
    total: torch.Tensor,
    accuracy: torch.Tensor,
    advantages: torch.Tensor,
    num_generations: int,
    sampling: dict[str, Any],
    step: int,
) -> list[Rollout]:
    """One `Rollout` per completion (prompt-major, G per prompt) with its rewards, advantage and sampling."""
    G = num_generations
    group_acc = accuracy.view(-1, G).mean(1)
    out = []
    for i in range(completions.ids.shape[0]):
        p = i // G
        n = int(completions.mask[i].sum())
        out.append(Rollout(
            record=batch["records"][p],
            completion=completions.text[i],
            completion_ids=completions.ids[i, :n].tolist(),
            rewards={k: float(v[i]) for k, v in components.items()},
            reward=float(total[i]),
            advantage=float(advantages[i]),
            group_mean_accuracy=float(group_acc[p]),
            truncated=bool(completions.truncated[i]),
            step=step,
            sample_index=i % G,
            prompt=batch["prompts"][p] if "prompts" in batch else "",
            sampling={**sampling, **(batch["sampling"][p] if "sampling" in batch else {})},
        ))  # fmt: skip
    return out


class naming_failures:  # noqa: N801 (used as a `with` block, like contextlib's lower-case helpers)
    """Re-raise a failure inside generation / scoring with the problem ids of the batch (no silent skip)."""

    def __init__(self, records: list[VideoQARecord], what: str) -> None:
        self.ids, self.what = [r.problem_id for r in records], what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, Exception):  # IndexError / TypeError from a bad batch too; not KeyboardInterrupt
            raise RuntimeError(f"GRPO {self.what} failed for problem_id(s) {self.ids}: {exc}") from exc
        return False
