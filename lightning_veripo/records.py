"""The records that flow through VerIPO: a video-QA question, one rollout of the policy on it, a preference pair.

`VideoQARecord` is one entry of a Video-R1-format JSON file. `Rollout` is one sampled completion with
everything the Rollout-Aware Verifier needs to judge it and build preference pairs (written as one line of
`rollouts.jsonl`). `PreferencePair` is one chosen/rejected pair the verifier builds for DPO (one line of
`pairs.jsonl`).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")
DATA_TYPES = ("video", "image")


@dataclass(frozen=True)
class VideoQARecord:
    """One Video-R1-format question. `solution` keeps its `<answer>…</answer>` wrapper as in the files."""

    problem_id: str
    problem: str
    data_type: str
    problem_type: str
    solution: str
    path: str | None = None
    options: tuple[str, ...] = ()
    process: str | None = None  # Video-R1's chain of thought for SFT (its CoT data has it); None elsewhere

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["options"] = list(self.options)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VideoQARecord:
        return cls(
            problem_id=str(d["problem_id"]),
            problem=d["problem"],
            data_type=d["data_type"],
            problem_type=d["problem_type"],
            solution=d["solution"],
            path=d.get("path"),
            options=tuple(d.get("options") or ()),
            process=d.get("process") or None,
        )


@dataclass
class Rollout:
    """One sampled completion of the policy for one question, with its scores (one line of rollouts.jsonl)."""

    record: VideoQARecord
    completion: str
    completion_ids: list[int]
    rewards: dict[str, float]  # component name -> unweighted value
    reward: float  # weighted total
    advantage: float
    group_mean_accuracy: float  # mean accuracy reward over the question's G rollouts
    truncated: bool  # hit max_new_tokens before end of sequence
    step: int  # global step that generated it
    sample_index: int  # 0..G-1 within the group
    prompt: str = ""  # the rendered prompt text given to the model
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, frames, fps, ...

    @property
    def accuracy(self) -> float:
        return float(self.rewards.get("accuracy", 0.0))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (nothing shared with the rollout but immutable values). Written out field by field:
        `dataclasses.asdict` copies `completion_ids` element by element, and the verifier's checkpoint state
        converts every rollout of a fit."""
        return {
            "record": self.record.to_dict(),
            "completion": self.completion,
            "completion_ids": list(self.completion_ids),
            "rewards": dict(self.rewards),
            "reward": self.reward,
            "advantage": self.advantage,
            "group_mean_accuracy": self.group_mean_accuracy,
            "truncated": self.truncated,
            "step": self.step,
            "sample_index": self.sample_index,
            "prompt": self.prompt,
            "sampling": copy.deepcopy(self.sampling),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Rollout:
        d = dict(d)
        d["record"] = VideoQARecord.from_dict(d["record"])
        return cls(**d)


@dataclass
class PreferencePair:
    """One chosen/rejected pair for DPO (one line of pairs.jsonl), with where both completions came from."""

    problem_id: str
    record: VideoQARecord
    prompt: str  # the rendered prompt both completions answered
    video: str | None  # the record's media path
    sampling: dict[str, Any]  # frames/fps/... the rollouts were generated with
    chosen: str
    rejected: str
    chosen_step: int
    chosen_sample_index: int
    rejected_step: int
    rejected_sample_index: int
    reason: str  # one of lightning_veripo.verifier.pairs.REASONS

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["record"] = self.record.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreferencePair:
        d = dict(d)
        d["record"] = VideoQARecord.from_dict(d["record"])
        return cls(**d)
