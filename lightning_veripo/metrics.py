"""torchmetrics for the claims VerIPO makes: accuracy by problem type, reasoning length, format, consistency;
and `update_reasoning_metrics`, which scores completions into them (evaluation, and GRPO's validation/test)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torchmetrics import Metric

from lightning_veripo.parsing import extract_answer, extract_think, is_well_formed
from lightning_veripo.records import PROBLEM_TYPES, VideoQARecord
from lightning_veripo.rewards import accuracy_reward
from lightning_veripo.verifier.protocol import Judge, JudgeItem


def metric_key(problem_type: str) -> str:
    return problem_type.replace(" ", "_").replace("-", "_").lower()


class ReasoningMetrics(Metric):
    """Accumulates, per completion: accuracy (overall and per problem type), reasoning length in tokens
    (inside <think>), well-formedness, and the answer-reasoning inconsistency rate among judged completions.

    States are sums and counts, so the metric syncs across ranks and never grows with the data.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        n = len(PROBLEM_TYPES)
        self.add_state("correct", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("think_tokens", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("well_formed", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("judged", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("inconsistent", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("correct_consistent", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        problem_types: list[str],
        accuracy: torch.Tensor,
        think_tokens: torch.Tensor,
        well_formed: torch.Tensor,
        consistent: list[bool | None],
    ) -> None:
        for i, pt in enumerate(problem_types):
            k = PROBLEM_TYPES.index(pt)
            self.correct[k] += float(accuracy[i])
            self.count[k] += 1
            c = consistent[i]
            if c is not None:
                self.judged += 1
                self.inconsistent += float(not c)
                self.correct_consistent += float(c) * float(accuracy[i])
        self.think_tokens += float(think_tokens.double().sum())
        self.well_formed += float(well_formed.double().sum())

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.count.sum().clamp(min=1)
        out = {
            "accuracy": self.correct.sum() / total,
            "reasoning_tokens": self.think_tokens / total,
            "format_rate": self.well_formed / total,
            "inconsistency_rate": self.inconsistent / self.judged.clamp(min=1),
            "acc_cons": self.correct_consistent / total,
        }
        for k, pt in enumerate(PROBLEM_TYPES):
            if self.count[k] > 0:
                out[f"accuracy/{metric_key(pt)}"] = self.correct[k] / self.count[k]
        return {k: v.float() for k, v in out.items()}


class Scored(NamedTuple):
    """What `update_reasoning_metrics` found per completion."""

    accuracy: torch.Tensor  # [len(texts)] accuracy reward
    consistent: list[bool | None]  # the judge's verdict (None: unjudged)
    rationale: list[str]  # the judge's reason


def update_reasoning_metrics(
    metrics: ReasoningMetrics, texts: list[str], records: list[VideoQARecord], tokenizer: Any, judge: Judge
) -> Scored:
    """Score completions for evaluation: accuracy, reasoning tokens, format, judged consistency.
    Returns each completion's accuracy reward and verdict."""
    accuracy = torch.tensor([accuracy_reward(t, r) for t, r in zip(texts, records, strict=True)])
    think = [extract_think(t) or "" for t in texts]
    think_tokens = torch.tensor([len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in think])
    well_formed = torch.tensor([float(is_well_formed(t)) for t in texts])
    items = [
        JudgeItem(problem_id=r.problem_id, question=r.problem, options=r.options, reasoning=extract_think(t),
                  answer=extract_answer(t), completion=t, problem_type=r.problem_type)
        for t, r in zip(texts, records, strict=True)
    ]  # fmt: skip
    verdicts = judge.judge(items)
    metrics.update(
        [r.problem_type for r in records],
        accuracy,
        think_tokens,
        well_formed,
        [v.consistent for v in verdicts],
    )
    return Scored(accuracy, [v.consistent for v in verdicts], [v.rationale for v in verdicts])
