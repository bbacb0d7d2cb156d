"""The rollout engines' correctness pieces that need no server: the importance-sampling correction of the rollout
engine's sampler against a float64 derivation, the log-prob mismatch metric, and the engine choice's checks."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_veripo import losses
from lightning_veripo.backbone import VideoLLM
from lightning_veripo.grpo import GRPOModule
from lightning_veripo.lora import MERGER_TARGETS, LoRAConfig
from lightning_veripo.rollout import HFRollouts, VLLMRollouts, logprob_mismatch
from lightning_veripo.rollout.vllm import vision_lora_modules


def _logps(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    rollout = old + (torch.rand(3, 5, generator=g, dtype=torch.float64) - 0.5) * 0.8
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    return old, rollout, mask


@pytest.mark.parametrize("clip", [1.1, 2.0, 100.0])
def test_token_level_correction_matches_a_float64_derivation(clip):
    old, rollout, mask = _logps(0)
    weights = losses.rollout_correction(old.float(), rollout.float(), mask, "token", clip)
    for b in range(3):
        for t in range(5):
            want = min(math.exp(float(old[b, t]) - float(rollout[b, t])), clip) if mask[b, t] else 0.0
            assert float(weights[b, t]) == pytest.approx(want, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("clip", [1.05, 3.0])
def test_sequence_level_correction_is_one_clipped_ratio_per_sequence(clip):
    old, rollout, mask = _logps(1)
    weights = losses.rollout_correction(old.float(), rollout.float(), mask, "sequence", clip)
    for b in range(3):
        log_ratio = sum(float(old[b, t] - rollout[b, t]) for t in range(5) if mask[b, t])
        want = min(math.exp(log_ratio), clip)
        for t in range(5):
            assert float(weights[b, t]) == pytest.approx(want if mask[b, t] else 0.0, rel=1e-5, abs=1e-7)


def test_correction_none_and_unknown_level():
    old, rollout, mask = _logps(2)
    assert losses.rollout_correction(old, rollout, mask, "none", 2.0) is None
    with pytest.raises(ValueError, match="unknown rollout correction 'tok'"):
        losses.rollout_correction(old, rollout, mask, "tok", 2.0)


def test_rollout_weights_scale_the_per_token_surrogate():
    """With one update per generation the surrogate's gradient is A * grad logp; weights multiply it per token."""
    old, rollout, mask = _logps(3)
    adv = torch.tensor([1.0, -0.5, 2.0])
    logps = old.float().clone().requires_grad_(True)
    weights = losses.rollout_correction(old.float(), rollout.float(), mask, "token", 2.0)
    loss, _ = losses.grpo_loss(logps, None, None, adv, mask, loss_type="bnpo", rollout_weights=weights)
    loss.backward()
    want = -(adv[:, None] * weights) / mask.sum()
    torch.testing.assert_close(logps.grad, want.float(), rtol=1e-5, atol=1e-7)


def test_mismatch_metric_against_numpy_style_reference():
    old, rollout, mask = _logps(4)
    m = mask.bool()
    a, b = old[m], rollout[m]
    stats = logprob_mismatch(old, rollout, mask)
    assert float(stats["mean"]) == pytest.approx(float((a - b).abs().mean()), rel=1e-6)
    assert float(stats["max"]) == pytest.approx(float((a - b).abs().max()), rel=1e-6)
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert float(stats["corr"]) == pytest.approx(corr, rel=1e-6)
    same = logprob_mismatch(old, old, mask)
    assert float(same["max"]) == 0.0 and float(same["corr"]) == pytest.approx(1.0)


def test_engine_choice_and_its_checks(backbone):
    assert isinstance(GRPOModule(backbone).engine, HFRollouts)
    assert isinstance(GRPOModule(backbone, rollout_engine="vllm").engine, VLLMRollouts)
    with pytest.raises(ValueError, match="rollout_engine='sglang' not in"):
        GRPOModule(backbone, rollout_engine="sglang")
    with pytest.raises(ValueError, match="hf samples from pi_old itself"):
        GRPOModule(backbone, rollout_correction="token")
    with pytest.raises(ValueError, match="only rollout_engine='hf' can"):
        GRPOModule(backbone, rollout_engine="vllm", temporal=True)


@pytest.mark.parametrize(
    "targets",
    [
        MERGER_TARGETS,
        r".*visual\.merger\.mlp\.0",
        r".*(language_model.*\.q_proj|visual\.blocks\.0\.attn\.qkv)",
    ],
)
def test_vllm_refuses_an_adapter_on_the_vision_side_before_it_starts_a_server(tiny_model_dir, targets):
    """The check reads the adapted modules, not the preset's name: any LoRA layer in the tower or its merger
    stops the fit at start (no server is started), unless the server serves tower-connector LoRA."""
    backbone = VideoLLM(str(tiny_model_dir), lora=LoRAConfig(r=4, alpha=8, target_modules=targets),
                        freeze_vision=False).load()  # fmt: skip
    adapted = vision_lora_modules(backbone.model)
    assert adapted and all("visual" in name for name in adapted)
    module = GRPOModule(backbone, rollout_engine="vllm")
    with pytest.raises(ValueError, match=r"vision module\(s\).*tower_connector_lora=True"):
        module.engine.start(module)
    assert module.engine.server is None


def test_a_language_model_adapter_has_no_vision_lora_modules(backbone):
    assert vision_lora_modules(backbone.model) == []
