"""One prefill per prompt (`VideoLLM(shared_prefill=True)`, `lightning_veripo.prefill`) samples exactly what one
prefill per rollout row samples: the same next-token logits at every decoding step and the same tokens under
the same seed, on the three tiny architectures (Qwen2.5-VL, Qwen2-VL, Qwen3-VL and its deepstack features), with
and without LoRA, on a batch of two left-padded prompts of different lengths.

The logits are read where generation reads them: a hook on the LM head records its output at every forward.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_veripo.backbone import LoRAConfig, VideoLLM
from lightning_veripo.data.videoqa import FrameSampling, VideoQACollator, VideoQADataset
from lightning_veripo.tiny import ARCHS, make_tiny_model

G = 3
SAMPLING = {"temperature": 2.0, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.2}  # every processor on


@pytest.fixture(scope="module", params=ARCHS)
def arch_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if request.param == "qwen2_5_vl":
        return request.getfixturevalue("tiny_model_dir")
    return make_tiny_model(tmp_path_factory.mktemp(f"tiny_{request.param}"), seed=0, arch=request.param)


def _load(path: Path, lora: bool) -> VideoLLM:
    """The tiny model under LoRA with random (non-zero) adapter weights, or fully trainable."""
    if not lora:
        return VideoLLM(str(path), reference_copy=False).load()
    backbone = VideoLLM(str(path), lora=LoRAConfig(r=4, alpha=8)).load()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in backbone.model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return backbone


def _batch(backbone: VideoLLM, synthetic_dir: Path) -> dict[str, Any]:
    """A colour and a count question: prompts of different lengths, so the shorter one is left-padded."""
    video = backbone.processor.video_processor
    side = 2 * video.patch_size * video.merge_size
    sampling = FrameSampling(num_frames=4, min_pixels=side * side, max_pixels=side * side)
    dataset = VideoQADataset(synthetic_dir / "train.json", sampling=sampling)
    batch = VideoQACollator(backbone.processor, sampling)([dataset[0], dataset[2]])
    lengths = batch["attention_mask"].sum(-1).tolist()
    assert lengths[0] != lengths[1] and batch["attention_mask"][:, 0].tolist().count(0) == 1
    return batch


def _rollouts(backbone: VideoLLM, batch: dict[str, Any], shared: bool, **sampling: Any):
    """(token ids [N*G, T], the LM head's logits [N*G, V] at each decoding step) of one seeded generate."""
    backbone.shared_prefill = shared
    steps: list[torch.Tensor] = []
    rows = batch["input_ids"].shape[0] * G

    def record(module: torch.nn.Module, args: Any, logits: torch.Tensor) -> None:
        if logits.shape[0] == rows:  # the shared prefill's own call (N rows) predicts no rollout token
            steps.append(logits[:, -1].detach().clone())

    hook = backbone.hf_model.get_output_embeddings().register_forward_hook(record)
    try:
        torch.manual_seed(0)
        out = backbone.generate(batch, num_samples=G, max_new_tokens=10, **sampling)
    finally:
        hook.remove()
    return out.ids, steps


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_shared_prefill_gives_the_per_row_logits_and_tokens_at_every_step(
    arch_dir, synthetic_dir, lora, do_sample
):
    backbone = _load(arch_dir, lora)
    batch = _batch(backbone, synthetic_dir)
    sampling = SAMPLING if do_sample else {}

    per_row_ids, per_row_logits = _rollouts(backbone, batch, shared=False, do_sample=do_sample, **sampling)
    shared_ids, shared_logits = _rollouts(backbone, batch, shared=True, do_sample=do_sample, **sampling)

    assert torch.equal(shared_ids, per_row_ids)
    assert len(shared_logits) == len(per_row_logits) == per_row_ids.shape[1]
    for step, (ours, reference) in enumerate(zip(shared_logits, per_row_logits, strict=True)):
        torch.testing.assert_close(
            ours, reference, rtol=1e-5, atol=1e-5, msg=lambda m, s=step: f"step {s}: {m}"
        )
    if do_sample:  # the G rows of a prompt are distinct samples, not one sample copied
        assert len({tuple(row) for row in per_row_ids[:G].tolist()}) > 1


def _language_model_inputs(
    backbone: VideoLLM, batch: dict[str, Any], num_samples: int
) -> list[tuple[int, ...]]:
    """Shapes of the token ids the language model embeds, forward by forward, in one generate."""
    shapes: list[tuple[int, ...]] = []
    embed = backbone.hf_model.get_input_embeddings()
    hook = embed.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    try:
        backbone.generate(batch, num_samples=num_samples, max_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    return shapes


def test_each_prompt_runs_through_the_language_model_once(backbone, video_batch):
    n, length = video_batch["input_ids"].shape

    shared = _language_model_inputs(backbone, video_batch, num_samples=4)
    backbone.shared_prefill = False
    per_row = _language_model_inputs(backbone, video_batch, num_samples=4)

    assert shared[:2] == [(n, length - 1), (n * 4, 1)]  # the prompt once, then its last token on every row
    assert per_row[0] == (n * 4, length)  # the prompt on every row
    assert all(shape == (n * 4, 1) for shape in shared[2:] + per_row[1:])


def test_one_sample_per_prompt_has_nothing_to_share_and_prefills_as_before(backbone, video_batch):
    assert _language_model_inputs(backbone, video_batch, num_samples=1)[0] == tuple(
        video_batch["input_ids"].shape
    )


def test_synced_gpus_prefills_per_row_and_logs_the_reason_once(backbone, video_batch, caplog):
    with caplog.at_level(logging.WARNING, logger="lightning_veripo.backbone"):
        decisions = [backbone._uses_shared_prefill(video_batch, 4, synced_gpus=True) for _ in range(3)]

    assert decisions == [False, False, False]
    assert backbone._uses_shared_prefill(video_batch, 4, synced_gpus=False)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "synced_gpus" in messages[0] and "FSDP" in messages[0]
