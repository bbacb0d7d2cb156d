"""SFTModule: a supervised warm start on reasoning-format targets (so RL from a tiny model has signal).

VerIPO starts from an instruction-tuned Video-LLM that already answers in `<think>…</think><answer>…</answer>`
form some of the time. The tiny random model of the embedded demo does not, so the demo first fits it on a
target completion per record (`reference_completion`): the record's chain of thought (`process`, as Video-R1's
CoT data has it) and its solution. `answer_noise` makes a share of the targets answer something other than
what their reasoning concludes, so the warm-started policy is sometimes inconsistent: the failure the
Rollout-Aware Verifier is there to find.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from lightning_veripo.backbone import VideoLLM
from lightning_veripo.module import VideoLLMModule
from lightning_veripo.records import VideoQARecord
from lightning_veripo.rewards import choice_letters, ground_truth


def reference_completion(record: VideoQARecord, answer: str | None = None) -> str:
    """A well-formed completion: `<think>{process}</think><answer>{answer}</answer>`.

    The reasoning is the record's `process` when it has one (Video-R1's chain-of-thought field); otherwise a
    sentence stating the ground truth, e.g. `In the video I see blue, so the answer is C.`. `answer` replaces
    the solution's answer (the reasoning is kept), to write a target whose answer contradicts its reasoning."""
    truth = ground_truth(record)
    if record.process:
        reasoning = record.process.strip()
    else:
        option = next((o for o in record.options if o.split(".")[0].strip() == truth), None)
        if option is not None:
            reasoning = f"In the video I see {option.split('.', 1)[1].strip()}, so the answer is {truth}."
        else:
            reasoning = f"Looking at the video, the answer is {truth}."
    return f"<think>{reasoning}</think><answer>{truth if answer is None else answer}</answer>"


def other_answer(record: VideoQARecord, rng: random.Random) -> str | None:
    """A wrong answer of the record's kind: another option's letter, or another integer near a numerical
    solution; None when the record has no such alternative (free-form text, a single option)."""
    truth = ground_truth(record)
    if record.options:
        others = [x for x in choice_letters(record.options) if x != truth]
        return rng.choice(others) if others else None
    try:
        value = float(truth)
    except ValueError:
        return None
    if value != int(value):
        return None
    return str(int(value) + rng.choice([d for d in (-1, 1) if int(value) + d >= 0]))


class SFTModule(VideoLLMModule):
    """Supervised fine-tuning on `reference_completion(record)` (token-mean NLL of the completion).

    Args:
        answer_noise: share of targets (drawn afresh at every step, seeded by `seed` and the step) whose answer
            is replaced by a wrong one of the same kind while the reasoning is kept, e.g. `<think>... so the
            answer is C.</think><answer>B</answer>`. 0 trains on consistent targets only.
    """

    def __init__(
        self,
        backbone: VideoLLM,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        answer_noise: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(backbone, lr, weight_decay, warmup_steps)
        if not 0.0 <= answer_noise <= 1.0:
            raise ValueError(f"SFTModule: answer_noise={answer_noise} must lie in [0, 1]")
        self.answer_noise = answer_noise
        self.seed = seed

    def targets(self, records: list[VideoQARecord], step: int) -> list[str]:
        """The target completions of one step's records (the same for the same seed and step)."""
        rng = random.Random(self.seed * 1_000_003 + step)
        out = []
        for record in records:
            noisy = rng.random() < self.answer_noise
            out.append(reference_completion(record, other_answer(record, rng) if noisy else None))
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        targets = self.backbone.tokenize_completions(self.targets(batch["records"], self.global_step))
        ids, mask = targets.ids.to(self.device), targets.mask.to(self.device)
        logps = self.backbone.sequence_logprobs(batch, ids, mask)
        loss = -(logps.sum() / mask.sum().clamp(min=1))
        self.log("train/sft_loss", loss, prog_bar=True, batch_size=ids.shape[0])
        return loss
