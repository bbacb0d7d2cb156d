"""GRPO on the video-dependent synthetic task, long enough to see what it does (slow; numbers in RESULTS.md).

The tiny model first gets the demo's supervised warm start (format learned, answers near chance), then GRPO
trains on the colour task with the default rewards (accuracy 1.0 + format 0.5). The test prints the greedy
validation metrics and the sampled (T = 1) training accuracy before and after, and writes them as JSON beside the
test's temporary files (`LIGHTNING_VERIPO_RESULTS` names a file to copy them to). The accuracy itself is not
asserted: whether 40 steps on a 240k-parameter model beat chance is what we measure, not what we require.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import RecordSteps

from lightning_veripo.backbone import VideoLLM
from lightning_veripo.data.synthetic import make_synthetic_data
from lightning_veripo.data.videoqa import FrameSampling, VideoQADataModule
from lightning_veripo.evaluate import EvalSettings, evaluate
from lightning_veripo.grpo import GRPOModule
from lightning_veripo.lora import LoRAConfig
from lightning_veripo.sft import SFTModule

SFT_STEPS, GRPO_STEPS, G = 100, 40, 8
LM_AND_HEAD = r".*(language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|lm_head)"


def _trainer(steps: int, callbacks: list[L.Callback] | None = None) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks or [])  # fmt: skip


@pytest.mark.slow
def test_grpo_on_the_synthetic_colour_task_reports_accuracy_before_and_after(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = make_synthetic_data(tmp_path / "data", num_train=32, num_val=16, seed=0, tasks=["colour"])
    sampling = FrameSampling(num_frames=4, min_pixels=3136, max_pixels=3136)
    val = str(data / "val.json")
    L.seed_everything(0)
    backbone = VideoLLM(str(tiny_model_dir), lora=LoRAConfig(r=16, alpha=32, target_modules=LM_AND_HEAD))
    train = VideoQADataModule(train_path=str(data / "train.json"), sampling=sampling, batch_size=4)
    _trainer(SFT_STEPS).fit(SFTModule(backbone, lr=3e-3), datamodule=train)
    before = evaluate(backbone, val, EvalSettings(sampling, max_new_tokens=40, batch_size=16))

    backbone.merge_and_reset()  # GRPO's fresh adapter starts from the warm-started policy
    record = RecordSteps()
    grpo = GRPOModule(backbone, num_generations=G, max_new_tokens=40, lr=3e-3, log_rollouts_every_n_steps=0)
    train = VideoQADataModule(train_path=str(data / "train.json"), sampling=sampling, batch_size=2)
    start = {n: p.detach().clone() for n, p in backbone.model.named_parameters() if p.requires_grad}
    _trainer(GRPO_STEPS, [record]).fit(grpo, datamodule=train)
    after = evaluate(backbone, val, EvalSettings(sampling, max_new_tokens=40, batch_size=16))

    accuracy = [sum(r.accuracy for r in out["rollouts"]) / len(out["rollouts"]) for out in record.outputs]
    reward = [sum(r.reward for r in out["rollouts"]) / len(out["rollouts"]) for out in record.outputs]
    k = 10
    result = {
        "sft_steps": SFT_STEPS, "grpo_steps": GRPO_STEPS, "num_generations": G, "val_records": 16,
        "greedy_val_before": before, "greedy_val_after": after,
        f"train_sampled_accuracy_first_{k}_steps": sum(accuracy[:k]) / k,
        f"train_sampled_accuracy_last_{k}_steps": sum(accuracy[-k:]) / k,
        f"train_reward_first_{k}_steps": sum(reward[:k]) / k,
        f"train_reward_last_{k}_steps": sum(reward[-k:]) / k,
        "train_sampled_accuracy_per_step": accuracy,
    }  # fmt: skip
    text = json.dumps(result, indent=1)
    (tmp_path / "grpo_learning.json").write_text(text)
    if os.environ.get("LIGHTNING_VERIPO_RESULTS"):
        Path(os.environ["LIGHTNING_VERIPO_RESULTS"]).write_text(text)
    print(
        "\n" + "\n".join(f"{key}: {value}" for key, value in result.items() if not key.endswith("per_step"))
    )

    assert len(accuracy) == GRPO_STEPS
    for metrics in (before, after):
        assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["format_rate"] <= 1.0
    assert before["format_rate"] > 0.5, "the warm start must teach the answer format"
    moved = [
        n for n, p in backbone.model.named_parameters() if p.requires_grad and not torch.equal(p, start[n])
    ]
    assert moved, "GRPO must update the adapter"
