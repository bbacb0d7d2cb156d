"""Preference pairs from judged rollouts, by the rules of VerIPO's Rollout-Aware Verifier (arXiv 2505.19000).

Rollouts are grouped by question. A *chosen* rollout is correct, judged consistent, not repetitive, not
truncated, not degenerate (too short) and does not address its judge. A *rejected* rollout has a defect, named
by the pair's `reason`:
- `penalty:addresses_judge` (the rollout writes to its judge: lightning_veripo.verifier.addressing),
  `penalty:truncated`, `penalty:repetitive`, `penalty:degenerate` (penalty pairs, checked first);
- `reflection`: wrong and commits to its attempt, paired with a chosen rollout that corrects itself ("wait, …");
- `consistency:wrong_answer`: any other wrong rollout;
- `consistency:inconsistent_correct`: right answer, but the judge found the reasoning does not support it.
A correct rollout the judge could not judge is neither: unjudged is never evidence of good or bad. Questions
with no correct rollout (`all_wrong`), no chosen candidate (`no_chosen`) or no defect (`no_rejected`) give no
pairs. Among chosen candidates reflective and longer reasoning goes first; exact ties break by a seeded draw per
question, so the output depends only on the rollouts, the verdicts and the config.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_veripo.parsing import extract_think
from lightning_veripo.records import PreferencePair, Rollout
from lightning_veripo.verifier.protocol import Verdict

# Order in which rejected rollouts take the capped pair slots of a question (round-robin across reasons).
REASONS = (
    "penalty:addresses_judge",  # first: writing to the judge is the defect DPO must most surely push down
    "consistency:inconsistent_correct",
    "reflection",
    "consistency:wrong_answer",
    "penalty:repetitive",
    "penalty:truncated",
    "penalty:degenerate",
)
SKIP_REASONS = ("all_wrong", "no_chosen", "no_rejected")


@dataclass
class PairConfig:
    """Every threshold of pair building (VerIPO leaves them open; these are the library's defaults)."""

    max_pairs_per_question: int = 4
    correct_threshold: float = 1.0  # accuracy reward >= this counts as correct
    correct_threshold_by_type: dict[str, float] = field(default_factory=dict)  # e.g. {"regression": 0.5}
    min_reasoning_tokens: int = 8  # shorter <think> (or none) is degenerate
    prefer_longer: bool = True
    prefer_reflective: bool = True
    reflection_markers: list[str] = field(
        default_factory=lambda: [
            "wait",
            "let me re-check",
            "let me recheck",
            "however",
            "actually",
            "double-check",
        ]
    )
    penalize_repetitive: bool = True  # repetitive rollouts are never chosen; this makes them rejected too
    consistency_pairs: bool = True
    penalty_pairs: bool = True
    reflection_pairs: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_pairs_per_question < 1:
            raise ValueError(
                f"PairConfig.max_pairs_per_question must be >= 1, got {self.max_pairs_per_question}"
            )


@dataclass
class PairStats:
    """What `build_pairs` decided, per reason; `always_solved` feeds the next GRPO fit's data filter."""

    num_questions: int = 0
    num_pairs: int = 0
    pairs_by_reason: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    questions_with_pairs: int = 0
    questions_skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    skipped_problem_ids: dict[str, list[str]] = field(default_factory=lambda: {r: [] for r in SKIP_REASONS})
    always_solved: list[str] = field(
        default_factory=list
    )  # every rollout of the question was correct (mean 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_correct(rollout: Rollout, config: PairConfig) -> bool:
    threshold = config.correct_threshold_by_type.get(rollout.record.problem_type, config.correct_threshold)
    return rollout.accuracy >= threshold


def reasoning_tokens(rollout: Rollout) -> int:
    """Token length of the <think> text: its character share of `completion_ids` (the policy's tokenizer),
    or its word count when the rollout carries no ids; 0 when the tag is missing."""
    think = extract_think(rollout.completion)
    if not think:
        return 0
    if rollout.completion_ids and rollout.completion:
        return max(1, round(len(rollout.completion_ids) * len(think) / len(rollout.completion)))
    return len(think.split())


def is_reflective(rollout: Rollout, markers: Sequence[str]) -> bool:
    """The reasoning contains a self-correction marker as whole words ("wait", not "waiter")."""
    text = (extract_think(rollout.completion) or "").lower()
    return any(re.search(rf"(?<!\w){re.escape(m.lower())}(?!\w)", text) for m in markers)


def _defect(rollout: Rollout, verdict: Verdict, config: PairConfig) -> str | None:
    """Why this rollout is a rejected candidate ("wrong" is resolved at pairing time), or None."""
    if config.penalty_pairs:
        if verdict.addresses_judge:
            return "penalty:addresses_judge"
        if verdict.truncated or rollout.truncated:
            return "penalty:truncated"
        if verdict.repetitive and config.penalize_repetitive:
            return "penalty:repetitive"
        if reasoning_tokens(rollout) < config.min_reasoning_tokens:
            return "penalty:degenerate"
    if not is_correct(rollout, config):
        return "wrong" if config.consistency_pairs or config.reflection_pairs else None
    if verdict.consistent is False and config.consistency_pairs:
        return "consistency:inconsistent_correct"
    return None


def _is_chosen(rollout: Rollout, verdict: Verdict, config: PairConfig) -> bool:
    return (
        is_correct(rollout, config)
        and verdict.consistent is True
        and not verdict.addresses_judge
        and not verdict.repetitive
        and not (verdict.truncated or rollout.truncated)
        and reasoning_tokens(rollout) >= config.min_reasoning_tokens
    )


def _question_pairs(
    group: list[tuple[Rollout, Verdict]], config: PairConfig
) -> tuple[list[PreferencePair], str | None]:
    """Pairs for one question, or the reason it gives none."""
    if not any(is_correct(r, config) for r, _ in group):
        return [], "all_wrong"
    rng = random.Random(f"{config.seed}:{group[0][0].record.problem_id}")
    markers = config.reflection_markers

    chosen = [r for r, v in group if _is_chosen(r, v, config)]
    rng.shuffle(chosen)  # ties stay in this seeded order under the stable sort below
    chosen.sort(
        key=lambda r: (
            config.prefer_reflective and not is_reflective(r, markers),  # False (reflective) sorts first
            -reasoning_tokens(r) if config.prefer_longer else 0,
        )
    )
    if not chosen:
        return [], "no_chosen"
    reflective = [r for r in chosen if is_reflective(r, markers)]

    by_reason: dict[str, list[Rollout]] = defaultdict(list)
    for r, v in group:
        defect = _defect(r, v, config)
        if defect == "wrong":
            commits = not is_reflective(r, markers)
            if config.reflection_pairs and reflective and commits:
                defect = "reflection"
            else:
                defect = "consistency:wrong_answer" if config.consistency_pairs else None
        if defect is not None:
            by_reason[defect].append(r)
    if not by_reason:
        return [], "no_rejected"
    queues = []
    for reason in REASONS:
        rollouts = by_reason.get(reason, [])
        rng.shuffle(rollouts)
        queues.append([(reason, r) for r in rollouts])
    order = [item for round_ in _round_robin(queues) for item in round_]

    pairs, used = [], {"all": 0, "reflective": 0}
    for reason, rejected in order[: config.max_pairs_per_question]:
        pool_name = "reflective" if reason == "reflection" else "all"
        pool = reflective if pool_name == "reflective" else chosen
        winner = pool[used[pool_name] % len(pool)]  # spread pairs over the best chosen rollouts
        used[pool_name] += 1
        pairs.append(_pair(winner, rejected, reason))
    return pairs, None


def _round_robin(queues: list[list[Any]]) -> list[list[Any]]:
    return [[q[i] for q in queues if i < len(q)] for i in range(max(map(len, queues), default=0))]


def _pair(chosen: Rollout, rejected: Rollout, reason: str) -> PreferencePair:
    return PreferencePair(
        problem_id=chosen.record.problem_id,
        record=chosen.record,
        prompt=chosen.prompt,
        video=chosen.record.path,
        sampling=dict(chosen.sampling),
        chosen=chosen.completion,
        rejected=rejected.completion,
        chosen_step=chosen.step,
        chosen_sample_index=chosen.sample_index,
        rejected_step=rejected.step,
        rejected_sample_index=rejected.sample_index,
        reason=reason,
    )


def build_pairs(
    rollouts: Sequence[Rollout], verdicts: Sequence[Verdict], config: PairConfig | None = None
) -> tuple[list[PreferencePair], PairStats]:
    """Chosen/rejected pairs from judged rollouts (rules in the module docstring), and what was decided.

    Questions come out sorted by problem_id and rollouts by (step, sample_index), so the result does not
    depend on the order the ranks of a distributed fit delivered them in.
    """
    if len(rollouts) != len(verdicts):
        raise ValueError(
            f"build_pairs needs one verdict per rollout, got {len(rollouts)} and {len(verdicts)}"
        )
    config = config or PairConfig()
    groups: dict[str, list[tuple[Rollout, Verdict]]] = defaultdict(list)
    for r, v in zip(rollouts, verdicts, strict=True):
        groups[r.record.problem_id].append((r, v))

    pairs: list[PreferencePair] = []
    stats = PairStats(num_questions=len(groups))
    for problem_id in sorted(groups):
        group = sorted(groups[problem_id], key=lambda rv: (rv[0].step, rv[0].sample_index))
        if sum(r.accuracy for r, _ in group) / len(group) >= 1.0:
            stats.always_solved.append(problem_id)
        found, skipped = _question_pairs(group, config)
        if skipped:
            stats.questions_skipped[skipped] += 1
            stats.skipped_problem_ids[skipped].append(problem_id)
            continue
        stats.questions_with_pairs += 1
        for p in found:
            stats.pairs_by_reason[p.reason] += 1
        pairs.extend(found)
    stats.num_pairs = len(pairs)
    return pairs, stats
