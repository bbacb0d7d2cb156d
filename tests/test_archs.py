"""Qwen2.5-VL, Qwen2-VL, Qwen3-VL and Qwen3.5 (dense and MoE) through the library's real path: build the tiny model of each, load it
back through the Auto classes, and check rollouts, log-probs, the shared vision encoding, the reference policy
and GRPO training on each architecture.

Qwen3-VL differs most: patch 16 instead of 14, frame timestamps written into the prompt, and "deepstack"
vision features (one set per chosen vision layer) that are added to the first decoder layers' hidden states,
so a shared vision encoding must carry them along with the features that replace the placeholder tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import transformers
from helpers import RecordSteps, hand_logprobs, perturb_lora
from transformers import AutoModelForImageTextToText, AutoProcessor

from lightning_veripo.backbone import VideoLLM
from lightning_veripo.batching import select_vision_items
from lightning_veripo.completions import FORBIDDEN_GENERATION_TOKENS, Completions
from lightning_veripo.data.preference import PreferenceCollator, PreferenceDataModule, PreferenceDataset
from lightning_veripo.data.videoqa import FrameSampling, VideoQACollator, VideoQADataModule, VideoQADataset
from lightning_veripo.dpo import DPOModule
from lightning_veripo.grpo import GRPOModule
from lightning_veripo.lora import LoRAConfig
from lightning_veripo.records import VideoQARecord
from lightning_veripo.rewards import RewardSet
from lightning_veripo.tiny import ARCHS, make_tiny_model
from lightning_veripo.verifier.pairs import PreferencePair

# arch -> (model class, processor class, video processor class) that the Auto classes must give back
EXPECTED = {
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
    "qwen3_5": ("Qwen3_5ForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
    "qwen3_5_moe": ("Qwen3_5MoeForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
}
LORA = LoRAConfig(r=4, alpha=8)
G = 4


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(arch, directory) of a tiny random model of each architecture; Qwen2.5-VL is the shared session one."""
    arch = request.param
    if arch == "qwen2_5_vl":
        return arch, request.getfixturevalue("tiny_model_dir")
    return arch, make_tiny_model(tmp_path_factory.mktemp(f"tiny_{arch}"), seed=0, arch=arch)


@pytest.fixture
def arch_backbone(arch_model: tuple[str, Path]) -> VideoLLM:
    return VideoLLM(str(arch_model[1]), lora=LORA).load()


def _sampling(backbone: VideoLLM) -> FrameSampling:
    """4 frames of 2x2 merged cells each: 56x56 pixels for patch 14, 64x64 for Qwen3-VL's patch 16."""
    video = backbone.processor.video_processor
    side = 2 * video.patch_size * video.merge_size
    return FrameSampling(num_frames=4, min_pixels=side * side, max_pixels=side * side)


def _arch_batch(backbone: VideoLLM, synthetic_dir: Path) -> dict[str, Any]:
    sampling = _sampling(backbone)
    dataset = VideoQADataset(synthetic_dir / "train.json", sampling=sampling)
    return VideoQACollator(backbone.processor, sampling)([dataset[0], dataset[1]])


@pytest.fixture
def arch_batch(arch_backbone: VideoLLM, synthetic_dir: Path) -> dict[str, Any]:
    """A colour and a direction question collated by the architecture's own processor."""
    return _arch_batch(arch_backbone, synthetic_dir)


def _sample(backbone: VideoLLM, batch: dict, num_samples: int = G, max_new_tokens: int = 8) -> Completions:
    torch.manual_seed(0)
    return backbone.generate(batch, num_samples=num_samples, max_new_tokens=max_new_tokens)


# ---------------------------------------------------------------------- building and loading


def test_tiny_arch_loads_back_through_the_auto_classes_as_the_real_classes(arch_model):
    arch, path = arch_model
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    vocab = processor.tokenizer.get_vocab()
    model_class, processor_class, video_processor_class = EXPECTED[arch]

    assert json.loads((path / "config.json").read_text())["model_type"] == arch
    assert type(model) is getattr(transformers, model_class)
    assert type(processor) is getattr(transformers, processor_class)
    assert type(processor.video_processor) is getattr(transformers, video_processor_class)
    assert model.config.video_token_id == vocab["<|video_pad|>"]
    assert model.config.image_token_id == vocab["<|image_pad|>"]
    assert model.config.get_text_config().eos_token_id == vocab["<|im_end|>"]
    assert model.config.get_text_config().vocab_size == len(vocab)


def test_arch_batch_has_one_placeholder_per_merged_video_cell(arch_backbone, arch_batch):
    video_token = arch_backbone.hf_model.config.video_token_id
    per_video = (arch_batch["video_grid_thw"].prod(-1) // 4).tolist()

    assert per_video == [8, 8]  # 2 frame pairs x 2x2 merged cells
    assert (arch_batch["input_ids"] == video_token).sum(-1).tolist() == per_video
    assert arch_backbone.vision_items_per_row(arch_batch, "video") == [[0], [1]]


def test_unknown_arch_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"arch='llava'.*qwen2_5_vl"):
        make_tiny_model(tmp_path / "x", arch="llava")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------- rollouts and log-probs


def test_arch_generates_completions_without_vision_placeholders(arch_backbone, arch_batch):
    forbidden = torch.tensor(arch_backbone.token_ids(FORBIDDEN_GENERATION_TOKENS))
    assert len(forbidden) == len(FORBIDDEN_GENERATION_TOKENS)

    for seed in range(2):
        torch.manual_seed(seed)
        out = arch_backbone.generate(arch_batch, num_samples=G, max_new_tokens=16, temperature=3.0)
        assert out.ids.shape[0] == 2 * G and 1 <= out.ids.shape[1] <= 16 and len(out.text) == 2 * G
        assert not torch.isin(out.ids, forbidden).any(), f"seed {seed}: {out.text}"


def test_arch_greedy_generation_from_shared_vision_equals_hf_generate_from_pixels(arch_backbone, arch_batch):
    vision = arch_backbone.encode_vision(arch_batch)
    ours = arch_backbone.generate(
        arch_batch, num_samples=1, max_new_tokens=12, do_sample=False, vision=vision
    )

    inputs = {k: v for k, v in arch_batch.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        out = arch_backbone.hf_model.generate(
            **inputs, max_new_tokens=12, do_sample=False,
            suppress_tokens=arch_backbone.token_ids(FORBIDDEN_GENERATION_TOKENS),
            eos_token_id=arch_backbone.end_token_ids, pad_token_id=arch_backbone.pad_token_id,
        )  # fmt: skip
    theirs = arch_backbone.completions_from_ids(out[:, inputs["input_ids"].shape[1] :], 12)

    assert torch.equal(ours.ids, theirs.ids)


def test_arch_sequence_logprobs_equal_a_hand_computation_from_the_model_logits(arch_backbone, arch_batch):
    perturb_lora(arch_backbone)
    completions = _sample(arch_backbone, arch_batch, num_samples=3)

    with torch.no_grad():
        ours = arch_backbone.sequence_logprobs(arch_batch, completions.ids, completions.mask, num_samples=3)
    expected = hand_logprobs(arch_backbone, arch_batch, completions, num_samples=3)

    assert (ours[completions.mask == 0] == 0).all()
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_arch_shared_vision_equals_reencoding_in_values_and_lora_gradients(arch_backbone, arch_batch):
    perturb_lora(arch_backbone)
    completions = _sample(arch_backbone, arch_batch)
    results = []
    for share in (True, False):
        arch_backbone.model.zero_grad(set_to_none=True)
        logps = arch_backbone.sequence_logprobs(
            arch_batch, completions.ids, completions.mask, num_samples=G, share_vision=share
        )
        logps.sum().backward()
        grads = {n: p.grad.clone() for n, p in arch_backbone.model.named_parameters() if "lora_" in n}
        results.append((logps.detach(), grads))

    (shared, shared_grads), (reencoded, reencoded_grads) = results
    torch.testing.assert_close(shared, reencoded, atol=1e-5, rtol=0)
    assert shared_grads.keys() == reencoded_grads.keys() and shared_grads
    for name in shared_grads:
        torch.testing.assert_close(shared_grads[name], reencoded_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_arch_vision_item_selection_keeps_every_per_video_feature_of_the_encoder(arch_model, arch_backbone,
                                                                                 arch_batch):  # fmt: skip
    """Qwen3-VL's deepstack features are split per video like the main ones: a repeat must carry them too."""
    vision = arch_backbone.encode_vision(arch_batch)["video"]
    repeated = select_vision_items(vision, [1, 0, 0])

    def ptrs(items: Any) -> list[int]:
        return [x.data_ptr() for x in items]

    assert type(repeated) is type(vision)
    assert ptrs(repeated.pooler_output) == ptrs([vision.pooler_output[i] for i in (1, 0, 0)])
    deepstack = getattr(vision, "deepstack_features", None)
    assert (deepstack is not None) == (arch_model[0] == "qwen3_vl")
    for layer, repeated_layer in zip(
        deepstack or [], getattr(repeated, "deepstack_features", []), strict=True
    ):
        assert ptrs(repeated_layer) == ptrs([layer[i] for i in (1, 0, 0)])


def test_arch_reference_with_the_adapter_disabled_is_the_base_model(arch_model, arch_backbone, arch_batch):
    perturb_lora(arch_backbone)
    completions = _sample(arch_backbone, arch_batch, num_samples=2)
    base = VideoLLM(str(arch_model[1]), lora=None).load()
    args = (arch_batch, completions.ids, completions.mask, 2)

    reference = arch_backbone.sequence_logprobs(*args, reference=True)
    with torch.no_grad():
        expected = base.sequence_logprobs(*args)
        policy = arch_backbone.sequence_logprobs(*args)

    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=0)
    assert (policy - reference).abs().max() > 1e-3


# ---------------------------------------------------------------------- GRPO training


def _fit_grpo(
    backbone: VideoLLM, synthetic_dir: Path, reward: str, steps: int, **options: Any
) -> RecordSteps:
    module = GRPOModule(
        backbone, rewards=RewardSet([f"rewards_for_tests.{reward}"]), num_generations=G, max_new_tokens=6,
        lr=1e-2, log_rollouts_every_n_steps=0, **options,
    )  # fmt: skip
    data = VideoQADataModule(
        train_path=str(synthetic_dir / "train.json"),
        sampling=_sampling(backbone),
        batch_size=2,
        shuffle=False,
    )
    record = RecordSteps()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[record],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == steps
    return record


def _trainable(backbone: VideoLLM) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in backbone.model.named_parameters() if p.requires_grad}


def test_arch_grpo_takes_training_steps_that_move_the_adapter(arch_backbone, synthetic_dir):
    """GRPO.training_step end to end: shared-vision rollouts, scoring, reference KL, loss, optimiser step."""
    before = _trainable(arch_backbone)
    record = _fit_grpo(arch_backbone, synthetic_dir, "completion_chars", steps=2, beta=0.04)

    assert [m["train/groups_dropped"] for m in record.metrics] == [0.0, 0.0]
    assert all(torch.isfinite(out["loss"]) for out in record.outputs)
    after = _trainable(arch_backbone)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)


def test_arch_grpo_dynamic_sampling_drops_a_group_and_trains_on_the_rest(arch_backbone, synthetic_dir):
    record = _fit_grpo(arch_backbone, synthetic_dir, "constant_for_colour_questions", steps=1)

    assert record.metrics[0]["train/groups_dropped"] == 0.5


def test_arch_grpo_temporal_bonus_runs_on_shuffled_frame_features(arch_backbone, synthetic_dir):
    record = _fit_grpo(arch_backbone, synthetic_dir, "completion_chars", steps=1, temporal=True)

    assert "train/rewards/temporal" in record.metrics[0]


def test_the_merger_lora_preset_adapts_the_language_model_and_the_merger_and_no_other_vision_layer(
    arch_model: tuple[str, Path], arch_batch: dict[str, Any]
) -> None:
    lora = LoRAConfig(r=4, alpha=8, target_modules="language_model+merger")
    backbone = VideoLLM(str(arch_model[1]), lora=lora, freeze_vision=False).load()
    adapted = {n.removesuffix(".lora_A") for n, _ in backbone.model.named_modules() if n.endswith(".lora_A")}
    vision = {n for n in adapted if ".visual." in n}
    merger = ("linear_fc1", "linear_fc2") if arch_model[0].startswith("qwen3") else ("mlp.0", "mlp.2")
    assert {n.split(".visual.")[1] for n in vision} == {f"merger.{m}" for m in merger}
    plain = {
        n.removesuffix(".lora_A")
        for n, _ in VideoLLM(str(arch_model[1]), lora=LoRAConfig(r=4, alpha=8)).load().model.named_modules()
        if n.endswith(".lora_A")
    }
    assert adapted - vision == plain and plain  # the language model's adapters are the default's
    # the merger's adapter learns: the log-probs of a completion give its LoRA weights a gradient
    completions = _sample(backbone, arch_batch, num_samples=1)
    per_token = backbone.sequence_logprobs(arch_batch, completions.ids, completions.mask)
    (per_token * completions.mask).sum().backward()
    grads = [p.grad for n, p in backbone.model.named_parameters() if ".visual.merger." in n and "lora_B" in n]
    assert len(grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="set freeze_vision=false"):
        VideoLLM(str(arch_model[1]), lora=lora)  # the tower frozen: the merger's adapter would never learn


# ---------------------------------------------------------------------- Qwen3.5: LoRA on the linear-attention layers


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe"])
def test_qwen3_5_lora_presets_reach_attention_linear_attention_mlp_and_merger_and_no_vision_block(
    arch: str, tmp_path: Path, synthetic_dir: Path
) -> None:
    lora = LoRAConfig(r=4, alpha=8, target_modules="language_model+merger")
    backbone = VideoLLM(str(make_tiny_model(tmp_path, arch=arch)), lora=lora, freeze_vision=False).load()
    perturb_lora(backbone)  # lora_B non-zero, so every lora_A gets a gradient too
    batch = _arch_batch(backbone, synthetic_dir)
    completions = _sample(backbone, batch, num_samples=1)
    per_token = backbone.sequence_logprobs(batch, completions.ids, completions.mask)
    (per_token * completions.mask).sum().backward()
    grads = {n.split(".lora_A")[0]: p.grad for n, p in backbone.model.named_parameters() if ".lora_A." in n}

    mlp = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj")
    if arch == "qwen3_5":
        mlp = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    linear = ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj")
    expected = {f"language_model.layers.0.linear_attn.{m}" for m in linear}
    expected |= {f"language_model.layers.1.self_attn.{m}_proj" for m in "qkvo"}
    expected |= {f"language_model.layers.{i}.{m}" for i in (0, 1) for m in mlp}
    expected |= {"visual.merger.linear_fc1", "visual.merger.linear_fc2"}
    assert {n.split(".model.model.", 1)[1] for n in grads} == expected  # no vision block, no other layer
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reaches {name}"


# ---------------------------------------------------------------------- Qwen3.5: a DPO fit (the loop test's pairs vary)


def test_qwen3_5_dpo_fit_moves_the_policy_and_not_the_reference(tmp_path: Path, synthetic_dir: Path) -> None:
    backbone = VideoLLM(str(make_tiny_model(tmp_path / "model", arch="qwen3_5")), lora=LORA)
    module = DPOModule(backbone, lr=1e-2)
    module.configure_model()
    sampling = _sampling(module.backbone)
    raws = json.loads((synthetic_dir / "train.json").read_text())
    completions = [("<think>red</think><answer>A</answer>", "<answer>C</answer>"),
                   ("<think>it goes left</think><answer>A</answer>", "<think>up</think><answer>C")]  # fmt: skip
    lines = []
    for raw, (chosen, rejected) in zip(raws, completions, strict=False):
        record = VideoQARecord.from_dict(dict(raw, path=str(synthetic_dir / raw["path"])))
        pair = PreferencePair(record.problem_id, record, "", record.path, {}, chosen, rejected, 1, 0, 1, 1,
                              "consistency:wrong_answer")  # fmt: skip
        lines.append(json.dumps(pair.to_dict()))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    data = PreferenceDataModule(str(tmp_path / "pairs.jsonl"), sampling=sampling, batch_size=2)
    batch = PreferenceCollator(module.backbone.processor, sampling)(
        [PreferenceDataset(str(tmp_path / "pairs.jsonl"), sampling=sampling)[i] for i in (0, 1)]
    )

    def logps() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            out = module.dpo_step(batch)
        return out.policy.stacked(), out.reference.stacked()

    before = logps()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, data)
    after = logps()

    assert trainer.global_step == 3
    assert (after[0] - before[0]).abs().max() > 1e-2
    torch.testing.assert_close(after[1], before[1], atol=1e-6, rtol=0)
