"""Rollout engines for GRPO: `hf` (generate in the trainer's process) and `vllm` (a vLLM server, weight-synced)."""

from lightning_veripo.rollout.engine import (
    HFRollouts,
    RolloutEngine,
    Sampled,
    Sampling,
    StopEngineOnException,
    sharded,
)
from lightning_veripo.rollout.mismatch import logprob_mismatch
from lightning_veripo.rollout.records import naming_failures, rollout_records
from lightning_veripo.rollout.scores import Scores, score_rollouts
from lightning_veripo.rollout.step_log import log_rollout_panel, log_step
from lightning_veripo.rollout.vllm import VLLMRollouts
from lightning_veripo.rollout.vllm_server import VLLMServer, VLLMServerError, VLLMSettings

__all__ = [
    "HFRollouts",
    "RolloutEngine",
    "Sampled",
    "Sampling",
    "Scores",
    "StopEngineOnException",
    "VLLMRollouts",
    "VLLMServer",
    "VLLMServerError",
    "VLLMSettings",
    "log_rollout_panel",
    "log_step",
    "logprob_mismatch",
    "naming_failures",
    "rollout_records",
    "score_rollouts",
    "sharded",
]
