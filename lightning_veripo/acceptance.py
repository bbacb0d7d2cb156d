"""The loop's guards: a stage is kept only if it does not make the policy worse, DPO only behind an audited judge.

`Guards` is `iterate`'s `guards:` section:

    guards:
      accept: no_worse          # or always (every stage kept, the loop as it was)
      dev_path: DIR/dev.json    # the development slice; never the split the table reports (val_path)
      margin_se: 1.0
      min_judge_accuracy: 0.8   # below it a DPO stage is skipped, saying why
      judge_audit: null         # a labelled JSONL of the target task; null: the shipped set's slice of it
      dpo_from: grpo            # or before_grpo

The acceptance rule (`decide`). After a GRPO or DPO stage of an iteration the new policy's greedy accuracy p1 on
the `dev_path` questions (n of them) is compared with p0, that of the policy the stage would replace (the kept
policy; with `dpo_from: before_grpo` a DPO stage starts from an earlier one but replaces the kept policy). With
`accept: no_worse` the stage is kept when

    p1 >= p0 - margin,   margin = max(margin_se * sqrt(p0 * (1 - p0) / n), 1 / n)

that is, when it is not worse by more than `margin_se` binomial standard errors of p0 on n questions (at least
one question, so that p0 = 0 or 1 does not make any single changed answer a rejection). A rejected stage keeps its
adapter on disk and its row in the table (marked rejected); the next stage starts from the kept policy.
Each decision is written to state.json with its numbers, so a resumed run never makes it again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class Guards:
    """What keeps the loop from making the model worse (see the module's docstring for the rule).

    Args:
        accept: `always` keeps every stage; `no_worse` keeps a GRPO or DPO stage only if its policy is not
            worse on `dev_path` than the kept policy it would replace, by more than the margin.
        dev_path: the development slice (a Video-R1-format file) the acceptance scores on; needed with
            `no_worse`, and never `iterate`'s `val_path` (the split its table reports).
        margin_se: the margin in binomial standard errors of the kept policy's accuracy on `dev_path`.
        min_judge_accuracy: a DPO stage runs only if the verifier's judge agrees with the labels of the audit
            slice at least this often (accuracy over the items it decided); 0 never skips.
        judge_audit: the labelled JSONL to audit the judge on (fields in lightning_veripo.verifier.audit); None:
            the rows of the shipped set (LABELLED_ROLLOUTS) that ask one of `val_path`'s questions, and when none
            does, a warning that the judge is unaudited.
        dpo_from: a DPO stage's starting policy and reference: `grpo` (the iteration's GRPO policy) or
            `before_grpo` (the policy that GRPO stage started from; the pairs still come from GRPO's rollouts).
    """

    accept: Literal["always", "no_worse"] = "always"
    dev_path: str | None = None
    margin_se: float = 1.0
    min_judge_accuracy: float = 0.0
    judge_audit: str | None = None
    dpo_from: Literal["grpo", "before_grpo"] = "grpo"

    def __post_init__(self) -> None:
        problems = []
        if self.accept not in ("always", "no_worse"):
            problems.append(f"accept={self.accept!r} must be always or no_worse")
        if self.dpo_from not in ("grpo", "before_grpo"):
            problems.append(f"dpo_from={self.dpo_from!r} must be grpo or before_grpo")
        if self.accept == "no_worse" and not self.dev_path:
            problems.append("accept=no_worse needs dev_path: a development split to score each stage on")
        if self.margin_se < 0:
            problems.append(f"margin_se={self.margin_se} must be >= 0")
        if not 0.0 <= self.min_judge_accuracy <= 1.0:
            problems.append(f"min_judge_accuracy={self.min_judge_accuracy} must be in [0, 1]")
        if problems:
            raise ValueError("guards: " + "; ".join(problems))

    def check_dev_path(self, val_path: str) -> None:
        """Refuse a development slice that is the reported split itself."""
        if self.dev_path and Path(self.dev_path).resolve() == Path(val_path).resolve():
            raise ValueError(
                f"guards.dev_path={self.dev_path!r} is val_path, the split the table reports: give another split "
                "(e.g. the synthetic data's test.json, or a held-apart slice of your data)"
            )


@dataclass(frozen=True)
class Decision:
    accepted: bool
    start: float
    new: float
    n: int
    margin: float

    def reason(self) -> str:
        word = "kept" if self.accepted else "rejected"
        return (f"{word}: dev accuracy {self.new:.3f} vs {self.start:.3f} of the policy it would replace, "
                f"margin {self.margin:.3f} on {self.n} questions")  # fmt: skip


def margin(p0: float, n: int, margin_se: float) -> float:
    """`margin_se` binomial standard errors of accuracy p0 on n questions, and at least one question."""
    return max(margin_se * math.sqrt(p0 * (1.0 - p0) / n), 1.0 / n)


def decide(guards: Guards, start: float, new: float, n: int) -> Decision:
    """Keep the stage? `always`: yes; `no_worse`: when new >= start - margin (the module's rule)."""
    m = margin(start, n, guards.margin_se)
    accepted = guards.accept == "always" or new >= start - m - 1e-12
    return Decision(accepted, start, new, n, round(m, 4))
