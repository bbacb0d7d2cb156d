"""lightning_veripo: VerIPO (GRPO -> Rollout-Aware Verifier -> DPO, iterated) for Video-LLMs on Lightning."""

from lightning_veripo.backbone import LoRAConfig, VideoLLM
from lightning_veripo.grpo import GRPOModule
from lightning_veripo.rewards import RewardSet

__all__ = ["GRPOModule", "LoRAConfig", "RewardSet", "VideoLLM"]
__version__ = "0.1.0"
