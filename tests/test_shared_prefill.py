"""One prefill per prompt (`VideoLLM(shared_prefill=True)`, `lightning_veripo.prefill`) gives exactly what one
prefill per rollout row gives, on the tiny architectures (Qwen2.5-VL, Qwen2-VL, Qwen3-VL and its deepstack
features, Qwen3.5 dense and MoE with their linear-attention layers' conv and recurrent states), with and without
LoRA, on a batch of two left-padded prompts of different lengths:

- sampling: the same next-token logits at every decoding step and the same tokens under the same seed (the
  logits are read where generation reads them: a hook on the LM head records its output at every forward);
- scoring (`sequence_logprobs`): the same per-token log-probs, policy and reference, and the same loss gradients
  of the trainable weights, on right-padded completions of different lengths.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import perturb_lora
from transformers import DynamicCache
from transformers.cache_utils import LinearAttentionLayer, StaticLayer

from lightning_veripo.backbone import VideoLLM
from lightning_veripo.data.videoqa import FrameSampling, VideoQACollator, VideoQADataset
from lightning_veripo.lora import LoRAConfig
from lightning_veripo.prefill import cache_repeat_blocker, repeat_cache_rows
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
        return VideoLLM(str(path)).load()  # with its frozen reference copy
    backbone = VideoLLM(str(path), lora=LoRAConfig(r=4, alpha=8)).load()
    perturb_lora(backbone)
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


# ---------------------------------------------------------------------- scoring: the loss pass shares the prompt


def _ragged(backbone: VideoLLM, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """G sampled completions per prompt, cut to different lengths (right-padded) as finished rollouts are."""
    torch.manual_seed(0)
    out = backbone.generate(batch, num_samples=G, max_new_tokens=10, temperature=2.0)
    lengths = torch.tensor([10, 3, 7, 1, 9, 5])[: out.ids.shape[0]]
    mask = (torch.arange(out.ids.shape[1])[None, :] < lengths[:, None]).long() * out.mask
    return out.ids.masked_fill(mask == 0, backbone.pad_token_id), mask


def _score(backbone: VideoLLM, batch: dict[str, Any], ids: torch.Tensor, mask: torch.Tensor, shared: bool):
    """(policy log-probs, reference log-probs, gradients of a masked-mean loss) in training mode."""
    backbone.shared_prefill = shared
    backbone.model.train()
    backbone.model.zero_grad(set_to_none=True)
    vision = backbone.encode_vision(batch)
    policy = backbone.sequence_logprobs(batch, ids, mask, num_samples=G, vision=vision, temperature=0.7)
    reference = backbone.sequence_logprobs(batch, ids, mask, num_samples=G, vision=vision, reference=True)
    (-(policy * mask).sum() / mask.sum()).backward()
    grads = {n: p.grad.clone() for n, p in backbone.model.named_parameters() if p.grad is not None}
    return policy.detach(), reference, grads


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_shared_prompt_scoring_gives_the_per_row_logprobs_and_gradients(arch_dir, synthetic_dir, lora):
    backbone = _load(arch_dir, lora)
    batch = _batch(backbone, synthetic_dir)
    ids, mask = _ragged(backbone, batch)

    per_row = _score(backbone, batch, ids, mask, shared=False)
    shared = _score(backbone, batch, ids, mask, shared=True)

    torch.testing.assert_close(shared[0], per_row[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[1], per_row[1], rtol=1e-5, atol=1e-5)
    assert (shared[0][mask == 0] == 0).all() and shared[2].keys() == per_row[2].keys()
    assert any(g.abs().sum() > 0 for g in per_row[2].values())
    for name, grad in per_row[2].items():
        torch.testing.assert_close(shared[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_scoring_runs_each_prompt_through_the_decoder_once(backbone, video_batch):
    n, length = video_batch["input_ids"].shape
    ids, mask = _ragged(backbone, video_batch)
    shapes: list[tuple[int, ...]] = []
    embed = backbone.hf_model.get_input_embeddings()
    hook = embed.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    try:
        backbone.sequence_logprobs(video_batch, ids, mask, num_samples=G)
        backbone.shared_prefill = False
        backbone.sequence_logprobs(video_batch, ids, mask, num_samples=G)
    finally:
        hook.remove()

    assert shapes == [(n, length), (n * G, ids.shape[1]), (n * G, length + ids.shape[1])]


def test_gradient_checkpointing_scores_the_loss_pass_per_row_and_logs_why_once(
    tiny_model_dir, video_batch, caplog
):
    backbone = VideoLLM(
        str(tiny_model_dir), lora=LoRAConfig(r=4, alpha=8), gradient_checkpointing=True
    ).load()
    backbone.model.train()
    with caplog.at_level(logging.WARNING, logger="lightning_veripo.backbone"):
        with_grad = [backbone._scores_prompt_once(video_batch, G) for _ in range(2)]
        with torch.no_grad():  # the old-policy and reference passes: nothing to recompute, the cache is kept
            without_grad = backbone._scores_prompt_once(video_batch, G)

    assert with_grad == [False, False] and without_grad
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "gradient checkpointing" in messages[0]


def test_active_dropout_scores_per_row_in_training_mode_only(tiny_model_dir, video_batch):
    backbone = VideoLLM(str(tiny_model_dir), lora=LoRAConfig(r=4, alpha=8, dropout=0.1)).load()

    backbone.model.train()
    assert not backbone._scores_prompt_once(video_batch, G)  # one dropout mask per row, as the per-row pass
    backbone.model.eval()
    assert backbone._scores_prompt_once(video_batch, G)


# ---------------------------------------------------------------------- hybrid caches (Qwen3.5's linear attention)


@pytest.fixture(scope="module")
def qwen3_5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen3_5"), seed=0, arch="qwen3_5")


def test_repeated_linear_attention_states_equal_the_states_of_the_repeated_prompts(qwen3_5_dir):
    model = VideoLLM(str(qwen3_5_dir)).load().hf_model
    ids = torch.randint(30, 400, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row

    def prefill(rows: torch.Tensor, rows_mask: torch.Tensor) -> DynamicCache:
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        with torch.no_grad():
            model(input_ids=rows, attention_mask=rows_mask, cache=cache, use_cache=True)
        return cache

    shared = prefill(ids, mask)
    repeat_cache_rows(shared, 3)
    per_row = prefill(ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0))

    kinds = [type(layer) for layer in shared.layers]
    assert LinearAttentionLayer in kinds and len(set(kinds)) == 2  # linear and full attention
    for ours, theirs in zip(shared.layers, per_row.layers, strict=True):
        if isinstance(ours, LinearAttentionLayer):
            assert ours.conv_states[0].shape[0] == ours.recurrent_states[0].shape[0] == 6
            torch.testing.assert_close(ours.conv_states[0], theirs.conv_states[0])
            torch.testing.assert_close(ours.recurrent_states[0], theirs.recurrent_states[0])
        else:
            torch.testing.assert_close(ours.keys, theirs.keys)
            torch.testing.assert_close(ours.values, theirs.values)


def test_qwen3_5_generates_and_scores_with_each_prompt_through_the_decoder_once(qwen3_5_dir, synthetic_dir):
    backbone = _load(qwen3_5_dir, lora=True)
    batch = _batch(backbone, synthetic_dir)
    n, length = batch["input_ids"].shape
    assert backbone._uses_shared_prefill(batch, G, synced_gpus=False) and backbone._scores_prompt_once(
        batch, G
    )

    generated = _language_model_inputs(backbone, batch, num_samples=G)
    ids, mask = _ragged(backbone, batch)
    scored: list[tuple[int, ...]] = []
    embed = backbone.hf_model.get_input_embeddings()
    hook = embed.register_forward_hook(lambda module, args, out: scored.append(tuple(args[0].shape)))
    try:
        backbone.sequence_logprobs(batch, ids, mask, num_samples=G)
    finally:
        hook.remove()

    assert generated[:2] == [(n, length - 1), (n * G, 1)]
    assert scored == [(n, length), (n * G, ids.shape[1])]
    assert not backbone._prefill_fallbacks


def test_a_cache_layer_kind_the_library_cannot_repeat_is_named_instead_of_failing_inside_transformers(
    qwen3_5_dir,
):
    config = VideoLLM(str(qwen3_5_dir)).load().hf_model.config.get_text_config(decoder=True)
    cache = DynamicCache(config=config)
    assert cache_repeat_blocker(cache) is None
    cache.layers[1] = StaticLayer(max_cache_len=16)  # transformers' static key/value layer: no batch repeat

    reason = cache_repeat_blocker(cache)
    assert reason is not None and "layer 1 is a StaticLayer" in reason and "cannot repeat" in reason
