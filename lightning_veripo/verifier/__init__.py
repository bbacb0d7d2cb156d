"""The Rollout-Aware Verifier: judge GRPO rollouts, build VerIPO's preference pairs, write them for DPO."""

from typing import Any

from lightning_veripo.verifier.judges import Judge, JudgeItem, JudgeUnavailableError, RuleJudge, Verdict
from lightning_veripo.verifier.llm_judges import HybridJudge, OpenAIJudge, TransformersJudge
from lightning_veripo.verifier.pairs import (
    REASONS,
    SKIP_REASONS,
    PairConfig,
    PairStats,
    PreferencePair,
    build_pairs,
)

# The run module loads on first use, so `python -m lightning_veripo.verifier.run` starts cleanly.
_RUN_NAMES = (
    "PAIRS_FILE",
    "ROLLOUTS_FILE",
    "STATS_FILE",
    "VERDICTS_FILE",
    "judge_rollouts",
    "read_pairs",
    "read_rollouts",
    "read_verdicts",
    "run_verifier",
    "run_verifier_from_files",
)


def __getattr__(name: str) -> Any:
    if name in _RUN_NAMES:
        from lightning_veripo.verifier import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PAIRS_FILE",
    "REASONS",
    "ROLLOUTS_FILE",
    "SKIP_REASONS",
    "STATS_FILE",
    "VERDICTS_FILE",
    "Judge",
    "JudgeItem",
    "JudgeUnavailableError",
    "HybridJudge",
    "OpenAIJudge",
    "PairConfig",
    "PairStats",
    "PreferencePair",
    "RuleJudge",
    "TransformersJudge",
    "Verdict",
    "build_pairs",
    "judge_rollouts",
    "read_pairs",
    "read_rollouts",
    "read_verdicts",
    "run_verifier",
    "run_verifier_from_files",
]
