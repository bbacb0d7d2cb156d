"""The Rollout-Aware Verifier: judge GRPO rollouts, build VerIPO's preference pairs, write them for DPO."""

from lightning_veripo.verifier.judges import RuleJudge
from lightning_veripo.verifier.llm_judges import HybridJudge, OpenAIJudge, TransformersJudge
from lightning_veripo.verifier.pairs import (
    REASONS,
    SKIP_REASONS,
    PairConfig,
    PairStats,
    PreferencePair,
    build_pairs,
)
from lightning_veripo.verifier.protocol import Judge, JudgeItem, JudgeUnavailableError, Verdict
from lightning_veripo.verifier.run import (
    PAIRS_FILE,
    ROLLOUTS_FILE,
    STATS_FILE,
    VERDICTS_FILE,
    judge_rollouts,
    read_pairs,
    read_rollouts,
    read_verdicts,
    run_verifier,
    run_verifier_from_files,
)

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
