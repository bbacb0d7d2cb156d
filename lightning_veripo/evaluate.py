"""Evaluate a policy on a Video-R1-format file: accuracy (overall, per type), reasoning length, format rate,
inconsistency rate (judged), Acc-Cons. Greedy decoding by default, as the paper evaluates."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from lightning_veripo.backbone import VideoLLM
from lightning_veripo.data.videoqa import FrameSampling, VideoQACollator, VideoQADataset
from lightning_veripo.grpo import update_reasoning_metrics
from lightning_veripo.metrics import ReasoningMetrics
from lightning_veripo.verifier.judges import Judge, RuleJudge


@torch.no_grad()
def evaluate(
    backbone: VideoLLM,
    path: str,
    sampling: FrameSampling,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    judge: Judge | None = None,
    root: str | None = None,
) -> dict[str, float]:
    """Metrics of `backbone` (loaded) on the records of `path`, as plain floats."""
    dataset = VideoQADataset(path, root, sampling)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=VideoQACollator(backbone.processor, sampling))
    metrics = ReasoningMetrics()
    judge = judge or RuleJudge()
    device = next(backbone.hf_model.parameters()).device
    for batch in loader:
        batch: dict[str, Any] = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        completions = backbone.generate(batch, num_samples=1, max_new_tokens=max_new_tokens, do_sample=False)
        update_reasoning_metrics(metrics, completions.text, batch["records"], backbone.tokenizer, judge)
    return {k: float(v) for k, v in metrics.compute().items()}
