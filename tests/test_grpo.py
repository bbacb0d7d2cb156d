"""GRPOModule: it learns, shares the video encoding exactly, drops zero-signal groups, keeps old and reference
log-probs straight, returns complete rollouts, and names what failed.

Most tests drive the module with a real `lightning.Trainer` on CPU over the synthetic video-QA set; the reward
functions they name by dotted path live in `tests/rewards_for_tests.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import RecordSteps

from lightning_veripo import losses
from lightning_veripo.backbone import VideoLLM
from lightning_veripo.data.videoqa import FrameSampling, VideoQADataModule
from lightning_veripo.grpo import GRPOModule
from lightning_veripo.lora import LoRAConfig
from lightning_veripo.rewards import RewardSet

G = 4  # rollouts per prompt in the quick tests
MAX_NEW_TOKENS = 6


def _datamodule(synthetic_dir: Path, sampling: FrameSampling, shuffle: bool = False) -> VideoQADataModule:
    """Two prompts per batch; unshuffled, the first batch is a colour and a direction question."""
    return VideoQADataModule(
        train_path=str(synthetic_dir / "train.json"), val_path=str(synthetic_dir / "val.json"),
        sampling=sampling, batch_size=2, shuffle=shuffle,
    )  # fmt: skip


def _fit(module: GRPOModule, datamodule: VideoQADataModule, max_steps: int) -> RecordSteps:
    record = RecordSteps()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[record],
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == max_steps
    return record


def _grpo(backbone: VideoLLM, reward: str, **options: Any) -> GRPOModule:
    defaults: dict[str, Any] = {"num_generations": G, "max_new_tokens": MAX_NEW_TOKENS, "lr": 1e-2,
                                "log_rollouts_every_n_steps": 0}  # fmt: skip
    return GRPOModule(backbone, rewards=RewardSet([f"rewards_for_tests.{reward}"]), **{**defaults, **options})


def _trainable(backbone: VideoLLM) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in backbone.model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- learning


def test_grpo_raises_a_trivially_learnable_reward(tiny_model_dir: Path, synthetic_dir: Path,
                                                 frame_sampling: FrameSampling) -> None:  # fmt: skip
    """Reward 1 for emitting the `<answer>` token: a random policy does it in ~2% of 8-token completions.

    The adapter also covers lm_head, so the token's logit is directly learnable (the attention and MLP
    projections alone move a random model's logits too little). With G = 16 and lr 5e-3 at LoRA scale
    alpha/r = 8 the reward reaches ~1.0 within 36 steps for each of seeds 0-11 (tried while tuning); with
    G = 8 or lr 1e-2 some seeds collapse onto other tokens before the reward takes off.
    """
    L.seed_everything(0)
    lora = LoRAConfig(
        r=4,
        alpha=32,
        target_modules=(
            r".*(language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|lm_head)"
        ),
    )
    backbone = VideoLLM(str(tiny_model_dir), lora=lora)
    module = _grpo(backbone, "contains_answer_tag", num_generations=16, max_new_tokens=8, lr=5e-3)
    record = _fit(module, _datamodule(synthetic_dir, frame_sampling, shuffle=True), max_steps=36)

    rewards = [sum(r.reward for r in out["rollouts"]) / len(out["rollouts"]) for out in record.outputs]
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert first < 0.2, rewards
    assert last > first + 0.5, rewards


# ----------------------------------------------------------------------------- shared video encoding


def test_shared_vision_gives_the_loss_and_lora_gradients_of_reencoding_per_rollout(
    backbone: VideoLLM, video_batch: dict[str, Any]
) -> None:
    torch.manual_seed(0)
    for name, p in backbone.model.named_parameters():
        if (
            "lora_B" in name
        ):  # B = 0 would leave lora_A without gradient and the policy equal to the reference
            p.data.normal_(0.0, 0.05)
    completions = backbone.generate(video_batch, num_samples=G, max_new_tokens=MAX_NEW_TOKENS)
    advantages = torch.linspace(-1.0, 1.0, completions.ids.shape[0])

    results = []
    for share in (True, False):
        module = GRPOModule(
            backbone, num_generations=G, max_new_tokens=MAX_NEW_TOKENS, beta=0.1, share_vision=share
        )
        vision = backbone.encode_vision(video_batch, requires_grad=False) if share else None
        args = (video_batch, completions.ids, completions.mask, vision)
        ref = module._logps(*args, reference=True, grad=False)
        logps = module._logps(*args, reference=False, grad=True)
        loss, _ = losses.grpo_loss(logps, None, ref, advantages, completions.mask, beta=0.1,
                                   max_completion_length=MAX_NEW_TOKENS)  # fmt: skip
        backbone.model.zero_grad(set_to_none=True)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in backbone.model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))

    (shared_loss, shared_grads), (repeated_loss, repeated_grads) = results
    torch.testing.assert_close(shared_loss, repeated_loss, rtol=1e-5, atol=1e-6)
    assert shared_grads.keys() == repeated_grads.keys() and shared_grads
    assert any(g.abs().sum() > 0 for n, g in shared_grads.items() if "lora_A" in n)
    for name in shared_grads:
        torch.testing.assert_close(shared_grads[name], repeated_grads[name], rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- dynamic sampling


def test_dynamic_sampling_drops_a_constant_reward_group_from_the_loss_pass(
    backbone: VideoLLM, synthetic_dir: Path, frame_sampling: FrameSampling
) -> None:
    rows_with_grad: list[int] = []

    def count_rows(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if torch.is_grad_enabled():
            rows_with_grad.append(kwargs["input_ids"].shape[0])

    # the decoder below the LM head: every scoring pass runs it, chunked log-probs or not
    backbone.hf_model.model.register_forward_pre_hook(count_rows, with_kwargs=True)
    module = _grpo(backbone, "constant_for_colour_questions")
    record = _fit(module, _datamodule(synthetic_dir, frame_sampling), max_steps=1)

    rollouts = record.outputs[0]["rollouts"]
    assert [r.record.problem_id.split("-")[1] for r in rollouts] == ["colour"] * G + ["direction"] * G
    assert all(r.advantage == 0.0 for r in rollouts[:G])
    assert record.metrics[0]["train/groups_dropped"] == 0.5
    # one loss pass, over the direction question's rollouts only: its prompt once, then its G completions
    assert rows_with_grad == [1, G]


def test_all_groups_dropped_leaves_the_weights_unchanged_and_still_counts_the_step(
    backbone: VideoLLM, synthetic_dir: Path, frame_sampling: FrameSampling
) -> None:
    before = _trainable(backbone)
    module = _grpo(backbone, "constant")
    record = _fit(module, _datamodule(synthetic_dir, frame_sampling), max_steps=2)  # asserts global_step == 2

    assert [m["train/groups_dropped"] for m in record.metrics] == [1.0, 1.0]
    assert [float(out["loss"]) for out in record.outputs] == [0.0, 0.0]
    after = _trainable(backbone)
    for name in before:
        assert torch.equal(before[name], after[name]), name


# ----------------------------------------------------------------------------- old and reference log-probs


class RecordingGRPO(GRPOModule):
    """GRPOModule that keeps every log-prob pass it makes: (reference, grad, per-token log-probs, mask)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.passes: list[tuple[bool, bool, torch.Tensor, torch.Tensor]] = []

    def _logps(self, batch: dict[str, Any], ids: torch.Tensor, mask: torch.Tensor, vision: dict[str, Any] | None,
               reference: bool, grad: bool) -> torch.Tensor:  # fmt: skip
        out = super()._logps(batch, ids, mask, vision, reference, grad)
        self.passes.append((reference, grad, out.detach().clone(), mask.clone()))
        return out


def test_second_iteration_clips_the_ratio_to_the_old_policy_asymmetrically(
    backbone: VideoLLM, synthetic_dir: Path, frame_sampling: FrameSampling
) -> None:
    module = RecordingGRPO(
        backbone, rewards=RewardSet(["rewards_for_tests.completion_chars"]), num_generations=G,
        max_new_tokens=MAX_NEW_TOKENS, lr=5e-2, num_iterations=2, epsilon_low=0.2, epsilon_high=0.28,
        log_rollouts_every_n_steps=0,
    )  # fmt: skip
    record = _fit(
        module, _datamodule(synthetic_dir, frame_sampling), max_steps=2
    )  # one optimiser step per pass

    assert [(ref, grad) for ref, grad, _, _ in module.passes] == [
        (False, False),
        (False, True),
        (False, True),
    ]
    (_, _, old, mask), (_, _, first, _), (_, _, second, _) = module.passes
    torch.testing.assert_close(first, old)  # the first pass is the old policy: ratio 1
    assert (second - old).abs().max() > 1e-4  # after one update the ratio moves away from 1
    advantages = torch.tensor([r.advantage for r in record.outputs[0]["rollouts"]])
    assert record.metrics[0]["train/groups_dropped"] == 0.0
    loss, stats = losses.grpo_loss(second, old, None, advantages, mask, epsilon_low=0.2, epsilon_high=0.28,
                                   max_completion_length=MAX_NEW_TOKENS)  # fmt: skip
    torch.testing.assert_close(record.outputs[0]["loss"], loss)
    for name in ("clip_ratio_low", "clip_ratio_high", "kl"):
        assert record.metrics[0][f"train/{name}"] == pytest.approx(float(stats[name]), abs=1e-7), name


def test_kl_to_the_adapter_disabled_reference_is_zero_before_the_first_update(
    backbone: VideoLLM, synthetic_dir: Path, frame_sampling: FrameSampling
) -> None:
    module = _grpo(backbone, "completion_chars", beta=0.04, epsilon_high=0.28)
    record = _fit(module, _datamodule(synthetic_dir, frame_sampling), max_steps=3)

    kl = [m["train/kl"] for m in record.metrics]
    assert kl[0] == 0.0  # a fresh adapter (B = 0) is the reference policy exactly
    assert kl[-1] > 0.0  # the updated adapter drifts from it; the reference stays the base model


# ----------------------------------------------------------------------------- rollouts and failures


def test_training_step_returns_rollouts_with_what_the_verifier_needs(
    backbone: VideoLLM, synthetic_dir: Path, frame_sampling: FrameSampling
) -> None:
    module = GRPOModule(backbone, num_generations=G, max_new_tokens=MAX_NEW_TOKENS, temperature=0.9, top_p=0.95,
                        log_rollouts_every_n_steps=0)  # fmt: skip
    record = _fit(module, _datamodule(synthetic_dir, frame_sampling), max_steps=1)

    rollouts = record.outputs[0]["rollouts"]
    assert [r.record.problem_id for r in rollouts] == ["train-colour-00000"] * G + [
        "train-direction-00001"
    ] * G
    assert [r.sample_index for r in rollouts] == list(range(G)) * 2
    for r in rollouts:
        assert r.step == 0
        assert r.record.problem in r.prompt and r.prompt.endswith("<|im_start|>assistant\n")
        assert 1 <= len(r.completion_ids) <= MAX_NEW_TOKENS
        decoded = backbone.tokenizer.decode(r.completion_ids, skip_special_tokens=False)
        ended = any(decoded == r.completion + end for end in ("<|im_end|>", "<|endoftext|>"))
        assert ended or decoded == r.completion
        assert r.truncated == (not ended)
        assert set(r.rewards) == {"accuracy", "format"}
        assert r.reward == pytest.approx(r.rewards["accuracy"] + 0.5 * r.rewards["format"])
        assert isinstance(r.advantage, float)
        assert r.sampling["temperature"] == 0.9 and r.sampling["top_p"] == 0.95 and r.sampling["top_k"] == 0
        assert r.sampling["max_new_tokens"] == MAX_NEW_TOKENS
        assert len(r.sampling["frames_indices"]) == frame_sampling.num_frames and r.sampling["fps"] > 0
    for group in (rollouts[:G], rollouts[G:]):
        mean_accuracy = sum(r.rewards["accuracy"] for r in group) / G
        assert all(r.group_mean_accuracy == pytest.approx(mean_accuracy) for r in group)


@pytest.mark.parametrize("corruption", ["video_grid_thw", "pixel_values_videos"])
def test_a_failing_forward_names_the_problem_ids(backbone: VideoLLM, video_batch: dict[str, Any],
                                                 corruption: str) -> None:  # fmt: skip
    if corruption == "video_grid_thw":
        video_batch["video_grid_thw"][0] = torch.tensor([2, 4, 8])  # more patches than the pixels hold
    else:
        video_batch["pixel_values_videos"] = video_batch["pixel_values_videos"][:-3]
    module = GRPOModule(backbone, num_generations=2, max_new_tokens=2)

    with pytest.raises(RuntimeError, match="train-colour-00000.*train-direction-00001"):
        module.training_step(video_batch, 0)


# ----------------------------------------------------------------------------- configuration


def test_constructor_lists_every_invalid_setting() -> None:
    backbone = VideoLLM("never-loaded")
    with pytest.raises(ValueError) as err:
        GRPOModule(backbone, num_generations=1, loss_type="nope", num_iterations=2, accumulate_grad_batches=2)
    message = str(err.value)
    assert "num_generations=1" in message
    assert "loss_type='nope'" in message
    assert "accumulate_grad_batches=1" in message


@pytest.mark.parametrize(
    ("options", "component"),
    [
        ({"temporal": True}, "temporal"),
        ({"length_bonus": 0.5, "length_min_tokens": 1, "length_max_tokens": MAX_NEW_TOKENS}, "length_bonus"),
    ],
)
def test_optional_bonus_is_logged_as_a_reward_component(
    backbone: VideoLLM,
    synthetic_dir: Path,
    frame_sampling: FrameSampling,
    options: dict[str, Any],
    component: str,
) -> None:
    module = GRPOModule(backbone, num_generations=G, max_new_tokens=MAX_NEW_TOKENS, log_rollouts_every_n_steps=0,
                        **options)  # fmt: skip
    record = _fit(module, _datamodule(synthetic_dir, frame_sampling), max_steps=1)

    assert f"train/rewards/{component}" in record.metrics[0]
    assert all(component in r.rewards for r in record.outputs[0]["rollouts"])
