"""The rollout engine interface, and `hf`: Hugging Face `generate` in the trainer's own process.

An engine samples G completions per prompt of a trainer batch and keeps whatever serves them in step with the
policy: `start` at the beginning of a fit, `sync` after each optimiser step, `stop` at its end. `hf` needs no sync
(it samples from the trained module itself): the vision tower runs once per prompt and, with
`VideoLLM(shared_prefill=True)`, the prompt's language-model pass too, its cache repeated to the G rows.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import lightning as L
import torch

from lightning_veripo import sharding
from lightning_veripo.completions import Completions


class Sampling(NamedTuple):
    """How rollouts are sampled (the GRPO module's settings)."""

    num_generations: int
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int


class Sampled(NamedTuple):
    """G completions per prompt and, where the engine reports them, its per-token log-probs [N*G, T]."""

    completions: Completions
    logprobs: torch.Tensor | None


class RolloutEngine:
    """Base class: `sample` is required; `start`, `sync` and `stop` do nothing unless an engine needs them."""

    name = "base"

    def start(self, module: Any) -> None:
        """Called at the start of a fit (a resumed one too) with the GRPO module."""

    def sync(self, module: Any) -> float:
        """Called after each optimiser step; returns the seconds it took."""
        return 0.0

    def stop(self) -> None:
        """Called at the end of a fit (or when it fails)."""

    def sample(
        self, module: Any, batch: dict[str, Any], vision: dict[str, Any] | None, sampling: Sampling
    ) -> Sampled:
        raise NotImplementedError(f"{type(self).__name__} must implement sample()")


class StopEngineOnException(L.Callback):
    """Stops the module's rollout engine when a fit fails or is stopped (SIGTERM, Ctrl+C): Lightning calls
    `on_exception` on callbacks, never on the LightningModule, and a started server would outlive the fit."""

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        engine = getattr(pl_module, "engine", None)
        if isinstance(engine, RolloutEngine):
            engine.stop()


class HFRollouts(RolloutEngine):
    """Today's path: `VideoLLM.generate` with the shared vision features (and shared prefill)."""

    name = "hf"

    def sample(
        self, module: Any, batch: dict[str, Any], vision: dict[str, Any] | None, sampling: Sampling
    ) -> Sampled:
        completions = module.backbone.generate(
            batch,
            num_samples=sampling.num_generations,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            vision=vision,
            synced_gpus=sharded(module),
        )
        return Sampled(completions, None)


def sharded(module: Any) -> bool:
    """FSDP(2) / DeepSpeed ZeRO-3 need every rank to keep stepping generate until all ranks finish."""
    if module._trainer is None:
        return False
    name = type(module.trainer.strategy).__name__.lower()
    sharded_strategy = "fsdp" in name or "deepspeed" in name or sharding.uses_fsdp2(module.trainer.strategy)
    return module.trainer.world_size > 1 and sharded_strategy
