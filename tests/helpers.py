"""Helpers shared by several test modules (imported by name: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_veripo.backbone import VideoLLM
from lightning_veripo.completions import Completions


class RecordSteps(L.Callback):
    """Keeps what every training step returned and the metrics it logged."""

    def __init__(self) -> None:
        self.outputs: list[dict[str, Any]] = []
        self.metrics: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        self.outputs.append(outputs)
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def hand_logprobs(
    backbone: VideoLLM, batch: dict, completions: Completions, num_samples: int
) -> torch.Tensor:
    """Per-token log-probs [N*G, T] by hand: one unpadded forward per completion with its own video's pixels
    (the model encodes them itself), the completion's tokens picked from the log-softmax and masked."""
    model = backbone.hf_model
    pixels = torch.split(batch["pixel_values_videos"], batch["video_grid_thw"].prod(-1).tolist())
    rows = []
    for r in range(completions.ids.shape[0]):
        g = r // num_samples
        keep = batch["attention_mask"][g].bool()
        prompt, mm_types = batch["input_ids"][g][keep], batch["mm_token_type_ids"][g][keep]
        ids, mask = completions.ids[r], completions.mask[r]
        extra = {}
        if batch.get("second_per_grid_ts") is not None:  # Qwen2.5-VL only
            extra["second_per_grid_ts"] = batch["second_per_grid_ts"][g : g + 1]
        with torch.no_grad():
            logits = model(
                input_ids=torch.cat([prompt, ids])[None],
                attention_mask=torch.cat([torch.ones_like(prompt), mask])[None],
                mm_token_type_ids=torch.cat([mm_types, torch.zeros_like(ids)])[None],
                pixel_values_videos=pixels[g],
                video_grid_thw=batch["video_grid_thw"][g : g + 1],
                **extra,
            ).logits[0]
        # Position p predicts token p + 1: the completion's logits start at the prompt's last position.
        logp = logits[len(prompt) - 1 : len(prompt) - 1 + len(ids)].float().log_softmax(-1)
        rows.append(logp.gather(-1, ids[:, None]).squeeze(-1) * mask)
    return torch.stack(rows)


# What the demo-driven tests add after `veripo iterate --config configs/demo.yaml`: see tests/data/demo_tiny.yaml.
DEMO_LOOP_TEST_ARGS = ["--config", str(Path(__file__).resolve().parent / "data" / "demo_tiny.yaml")]
# ... and to the SFT stage's arguments: the small data set and learning rate the tests were sized for.
DEMO_SFT_TEST_ARGS = ["--model.init_args.lr=0.003", "--data.init_args.synthetic.num_train=32",
                      "--data.init_args.synthetic.num_val=16"]  # fmt: skip
# ... and to a stand-alone `veripo fit --config configs/demo_grpo.yaml`.
DEMO_FIT_TEST_ARGS = ["--model.init_args.backbone.init_args.model_name_or_path=work/demo/tiny-model",
                      "--model.init_args.backbone.init_args.tiny_size=tiny",
                      "--data.init_args.synthetic.num_train=16", "--data.init_args.synthetic.num_val=8"]  # fmt: skip


def perturb_lora(backbone: VideoLLM, seed: int = 0, std: float = 0.1) -> None:
    """Move the adapter away from its init (B = 0) to random weights, so the policy (adapter on) differs from
    the reference (adapter off)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in backbone.model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
