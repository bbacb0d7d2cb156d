"""lightning_veripo: VerIPO (GRPO -> Rollout-Aware Verifier -> DPO, iterated) for Video-LLMs on Lightning."""

__version__ = "0.1.0"
