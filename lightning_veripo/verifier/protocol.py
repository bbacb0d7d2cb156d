"""What every judge of the Rollout-Aware Verifier shares: the item it reads, the verdict it returns, the protocol.

VerIPO (arXiv 2505.19000, Fig. 2) checks each rollout for length, consistency, repetition and accuracy; only
consistency needs a judge. Every judge (rules, a local transformers model, an OpenAI-compatible server) returns
the same `Verdict`, and `RolloutJudge` gives them the same skeleton: repetition, truncation and missing tags are
rule checks recorded the same way; a judge that fails or answers garbage gives an *unjudged* verdict
(`consistent=None`, the error or raw output kept), never a crash and never a silent "consistent"; only a judge
that cannot start at all raises `JudgeUnavailableError`. A rollout that addresses its judge (writes its verdict
syntax, instructs it: lightning_veripo.verifier.addressing) is judged inconsistent and marked
`addresses_judge` without being put to the judge.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from lightning_veripo.parsing import extract_answer, extract_think
from lightning_veripo.records import Rollout
from lightning_veripo.verifier.addressing import addresses_judge


class JudgeUnavailableError(RuntimeError):
    """The judge cannot run at all (server unreachable, model directory missing): a configuration error."""


@dataclass(frozen=True)
class JudgeItem:
    """What a judge sees of one rollout: the question, the reasoning and the answer parsed out of it."""

    problem_id: str
    question: str
    options: tuple[str, ...]
    reasoning: str | None  # the <think> text; None when the tag is missing
    answer: str | None  # the <answer> text; None when the tag is missing
    completion: str
    problem_type: str = ""
    truncated: bool = False

    @classmethod
    def from_rollout(cls, rollout: Rollout) -> JudgeItem:
        return cls(
            problem_id=rollout.record.problem_id,
            question=rollout.record.problem,
            options=rollout.record.options,
            reasoning=extract_think(rollout.completion),
            answer=extract_answer(rollout.completion),
            completion=rollout.completion,
            problem_type=rollout.record.problem_type,
            truncated=rollout.truncated,
        )


@dataclass
class Verdict:
    """A judge's decision on one rollout and why. `consistent=None` means unjudged: never used as a good rollout."""

    consistent: bool | None
    repetitive: bool = False
    truncated: bool = False
    missing_tags: list[str] = field(default_factory=list)  # subset of ["think", "answer"]
    repeated_fraction: float = 0.0  # fraction of repeated word n-grams in the completion
    rationale: str = ""
    raw: str = ""  # the judge's raw output (LLM text, HTTP body), "" for the rule judge
    judge: str = ""
    latency_s: float = 0.0
    probability: float | None = None  # P(consistent), where the judge gives one (LLM, mode="likelihood")
    addresses_judge: bool = False  # the rollout writes to its judge: a defect, never a chosen rollout

    @property
    def judged(self) -> bool:
        return self.consistent is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Verdict:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@runtime_checkable
class Judge(Protocol):
    """Anything that judges a batch of rollouts, one `Verdict` per item, in order."""

    def judge(self, items: list[JudgeItem]) -> list[Verdict]: ...


def repeated_ngram_fraction(text: str, n: int) -> float:
    """1 - unique/total over the word n-grams of `text`: ~0 for prose, near 1 for a model stuck in a loop."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


class Decision(NamedTuple):
    consistent: bool | None
    rationale: str
    raw: str
    latency_s: float
    probability: float | None = None


class RolloutJudge:
    """Shared skeleton: rule checks for every item, the consistency decision only for items that have both
    tags and do not address the judge, and any exception inside a batch turned into unjudged verdicts for that
    batch."""

    name = "judge"
    batch_size: int | None = None  # items per `_decide` call; None = all at once

    def __init__(self, repetition_ngram: int, repetition_threshold: float) -> None:
        if repetition_ngram < 1 or not 0.0 <= repetition_threshold <= 1.0:
            raise ValueError(
                f"{type(self).__name__}: repetition_ngram must be >= 1 and repetition_threshold in [0, 1], "
                f"got {repetition_ngram} and {repetition_threshold}"
            )
        self.repetition_ngram = repetition_ngram
        self.repetition_threshold = repetition_threshold

    def judge(self, items: list[JudgeItem]) -> list[Verdict]:
        verdicts = [self._rule_checks(item) for item in items]
        todo = [i for i, v in enumerate(verdicts) if not v.missing_tags and not v.addresses_judge]
        step = self.batch_size or max(len(todo), 1)
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            t0 = time.perf_counter()
            try:
                decisions = self._decide([items[i] for i in chunk])
                if len(decisions) != len(chunk):
                    raise RuntimeError(f"judge returned {len(decisions)} decisions for {len(chunk)} items")
            except JudgeUnavailableError:
                raise
            except Exception as err:  # a failing batch is recorded, never fatal (see module docstring)
                failed = Decision(
                    None, f"judge error: {type(err).__name__}: {err}", "", time.perf_counter() - t0
                )
                decisions = [failed] * len(chunk)
            for i, d in zip(chunk, decisions, strict=True):
                v = verdicts[i]
                v.consistent, v.rationale, v.raw, v.latency_s = d.consistent, d.rationale, d.raw, d.latency_s
                v.probability = d.probability
        return verdicts

    def _rule_checks(self, item: JudgeItem) -> Verdict:
        missing = [tag for tag, text in (("think", item.reasoning), ("answer", item.answer)) if text is None]
        fraction = repeated_ngram_fraction(item.completion, self.repetition_ngram)
        writes_to_judge = addresses_judge(item.reasoning, item.answer)
        verdict = Verdict(
            consistent=None,
            repetitive=fraction > self.repetition_threshold,
            truncated=item.truncated,
            missing_tags=missing,
            repeated_fraction=round(fraction, 6),
            rationale="missing " + " and ".join(f"<{t}>" for t in missing) if missing else "",
            judge=self.name,
        )
        if writes_to_judge:
            verdict.consistent, verdict.addresses_judge = False, True
            verdict.rationale = "; ".join(
                [
                    f"inconsistent: {writes_to_judge}, never put to the judge",
                    *filter(None, [verdict.rationale]),
                ]
            )
        return verdict

    def _decide(self, items: list[JudgeItem]) -> list[Decision]:
        raise NotImplementedError
