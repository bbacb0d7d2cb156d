"""SFTModule: a short supervised warm start on reasoning-format targets (so RL from a tiny model has signal).

VerIPO starts from an instruction-tuned Video-LLM that already answers in `<think>…</think><answer>…</answer>`
form some of the time. The tiny random model of the embedded demo does not, so the demo first fits it for a few
hundred steps on a target completion per record (`reference_completion`), stopping at partial accuracy so that
GRPO and DPO have room to show their effect.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_veripo.backbone import VideoLLM
from lightning_veripo.module import VideoLLMModule
from lightning_veripo.parsing import extract_answer
from lightning_veripo.records import VideoQARecord


def reference_completion(record: VideoQARecord) -> str:
    """A well-formed completion whose reasoning states the ground truth, e.g.
    `<think>The moving square is blue, so the answer is C.</think><answer>C</answer>`."""
    answer = extract_answer(record.solution) or record.solution.strip()
    option = next((o for o in record.options if o.split(".")[0].strip() == answer), None)
    if option is not None:
        seen = option.split(".", 1)[1].strip()
        reasoning = f"In the video I see {seen}, so the answer is {answer}."
    else:
        reasoning = f"Looking at the video, the answer is {answer}."
    return f"<think>{reasoning}</think><answer>{answer}</answer>"


class SFTModule(VideoLLMModule):
    """Supervised fine-tuning on `reference_completion(record)` (token-mean NLL of the completion)."""

    def __init__(self, backbone: VideoLLM, lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 0) -> None:
        super().__init__(backbone, lr, weight_decay, warmup_steps)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        targets = self.backbone.tokenize_completions([reference_completion(r) for r in batch["records"]])
        ids, mask = targets.ids.to(self.device), targets.mask.to(self.device)
        logps = self.backbone.sequence_logprobs(batch, ids, mask)
        loss = -(logps.sum() / mask.sum().clamp(min=1))
        self.log("train/sft_loss", loss, prog_bar=True, batch_size=ids.shape[0])
        return loss
