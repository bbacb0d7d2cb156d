"""The judge audit: how often the verifier's judge agrees with human consistency labels on the target task.

A DPO stage learns from the verifier's pairs, so it is only as good as the judge that picked them: with an
inaccurate judge the policy regresses while the DPO loss keeps falling. Before each DPO stage the loop scores its
judge on a labelled slice (`audit_judge`) and skips the stage when the judge's accuracy is below a threshold.

The slice is a JSONL of rollouts, one a line: `question`, `options`, `reasoning`, `answer`, `problem_type`, `label`
(`true`: the reasoning leads to the answer, `false`: it does not, `null`: the reasoning states no conclusion, a
judge should abstain), and an `id`. The package ships 244 hand-labelled ones (`LABELLED_ROLLOUTS`, written by
tests/data/make_labelled_rollouts.py) covering the synthetic task's questions (colour, direction, count) among
others; `labelled_slice` keeps the rows whose question is one of the target task's.

The numbers (as benchmarks/judge_accuracy.py defines them):
    accuracy           right among the items the judge decided (deciding an item labelled null is wrong): the
                       share of its verdicts the verifier could trust; 0.0 when it decided none
    accuracy_strict    right among all items, an abstention counting as wrong unless the label is null
    false_alarm_rate   items labelled consistent that it calls inconsistent
    abstention_rate    items it left unjudged
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lightning_veripo.files import write_text_atomic
from lightning_veripo.verifier.protocol import Judge, JudgeItem

LABELLED_ROLLOUTS = Path(__file__).with_name("data") / "labelled_rollouts.jsonl"
FIELDS = ("question", "options", "reasoning", "answer", "label")


@dataclass(frozen=True)
class JudgeAudit:
    """One audit of a judge on a labelled slice (`stats.json`'s `judge_audit`, TensorBoard's `audit/*`)."""

    path: str
    n: int
    accuracy: float
    accuracy_strict: float
    false_alarm_rate: float
    abstention_rate: float
    min_judge_accuracy: float

    @property
    def passed(self) -> bool:
        return self.accuracy >= self.min_judge_accuracy

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def line(self) -> str:
        """The console line."""
        verdict = "passed" if self.passed else "FAILED"
        return (f"judge audit on {self.n} labelled rollouts ({self.path}): accuracy {self.accuracy:.3f} "
                f"(min_judge_accuracy {self.min_judge_accuracy}: {verdict}), strict {self.accuracy_strict:.3f}, "
                f"false alarms {self.false_alarm_rate:.3f}, abstentions {self.abstention_rate:.3f}")  # fmt: skip


def read_labelled(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a labelled JSONL; a row missing a field raises ValueError naming the line and the field."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [f for f in FIELDS if f not in row]
        if missing:
            raise ValueError(
                f"{path}:{number}: a labelled rollout needs the fields {', '.join(FIELDS)}; missing "
                f"{', '.join(missing)} (label: true, false or null)"
            )
        rows.append(row)
    return rows


def labelled_slice(rows: list[dict[str, Any]], questions: set[str]) -> list[dict[str, Any]]:
    """The rows asking one of `questions` (the target task's), compared without case and outer spaces."""
    wanted = {q.strip().lower() for q in questions}
    return [r for r in rows if str(r["question"]).strip().lower() in wanted]


def judge_item(row: dict[str, Any], index: int = 0) -> JudgeItem:
    """The judge's input for one labelled row: a well-formed completion of its reasoning and answer."""
    return JudgeItem(
        problem_id=str(row.get("id", index)),
        question=row["question"],
        options=tuple(row["options"]),
        reasoning=row["reasoning"],
        answer=row["answer"],
        completion=f"<think>{row['reasoning']}</think><answer>{row['answer']}</answer>",
        problem_type=row.get("problem_type", ""),
    )


def audit_judge(judge: Judge, rows: list[dict[str, Any]], path: str, min_judge_accuracy: float) -> JudgeAudit:
    """Judge every row once and score the verdicts against the labels. Raises ValueError on an empty slice."""
    if not rows:
        raise ValueError(f"{path}: no labelled rollouts to audit the judge on")
    verdicts = [v.consistent for v in judge.judge([judge_item(r, i) for i, r in enumerate(rows)])]
    labels = [r["label"] for r in rows]
    pairs = list(zip(labels, verdicts, strict=True))
    decided = [(lab, v) for lab, v in pairs if v is not None]
    consistent = [v for lab, v in pairs if lab is True]
    n = len(rows)
    return JudgeAudit(
        path=str(path),
        n=n,
        accuracy=round(sum(lab == v for lab, v in decided) / len(decided), 4) if decided else 0.0,
        accuracy_strict=round(sum(lab == v for lab, v in pairs) / n, 4),
        false_alarm_rate=round(sum(v is False for v in consistent) / len(consistent), 4)
        if consistent
        else 0.0,
        abstention_rate=round((n - len(decided)) / n, 4),
        min_judge_accuracy=min_judge_accuracy,
    )


def target_slice(labelled_path: str | None, val_path: str) -> tuple[list[dict[str, Any]], str]:
    """The rows to audit on and where they come from: all of `labelled_path`'s, or (None) the shipped set's rows
    that ask one of `val_path`'s questions (empty when the target task is not the synthetic one)."""
    if labelled_path is not None:
        return read_labelled(labelled_path), labelled_path
    questions = {str(r.get("problem", "")) for r in json.loads(Path(val_path).read_text())}
    return labelled_slice(read_labelled(LABELLED_ROLLOUTS), questions), str(LABELLED_ROLLOUTS)


def record_audit(audit: JudgeAudit, stats_path: Path) -> None:
    """Add the audit to the verifier's stats.json (as `judge_audit`)."""
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    stats["judge_audit"] = audit.as_dict()
    write_text_atomic(stats_path, json.dumps(stats, indent=1))
