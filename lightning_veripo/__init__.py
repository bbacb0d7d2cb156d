"""lightning_veripo: VerIPO (GRPO -> Rollout-Aware Verifier -> DPO, iterated) for Video-LLMs on Lightning.

What a notebook reaches for: the backbone, the three stage modules, the verifier callback and its judges, the
loop driver.
"""

from lightning_veripo.backbone import VideoLLM
from lightning_veripo.callbacks import VerifierCallback
from lightning_veripo.dpo import DPOModule
from lightning_veripo.grpo import GRPOModule
from lightning_veripo.loop import iterate
from lightning_veripo.lora import LoRAConfig
from lightning_veripo.rewards import RewardSet
from lightning_veripo.sft import SFTModule
from lightning_veripo.verifier import HybridJudge, Judge, OpenAIJudge, RuleJudge, TransformersJudge

__all__ = [
    "DPOModule",
    "GRPOModule",
    "HybridJudge",
    "Judge",
    "LoRAConfig",
    "OpenAIJudge",
    "RewardSet",
    "RuleJudge",
    "SFTModule",
    "TransformersJudge",
    "VerifierCallback",
    "VideoLLM",
    "iterate",
]
__version__ = "0.1.0"
