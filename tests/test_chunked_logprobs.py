"""Chunked completion log-probs (`VideoLLM(logprob_chunk_tokens=...)`) equal the unchunked pass
(`logprob_chunk_tokens=None`, the model's own forward with `logits_to_keep`) in values and gradients, on the
three tiny architectures, and never run the LM head on more than one chunk of tokens at a time.

Both sides are the real code path: the same backbone scores the same completions twice, switching only the
knob. Completions are forced (random text tokens) with rows of different lengths, one of them empty, so the
padding the chunked path skips is exercised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_veripo.backbone import FORBIDDEN_GENERATION_TOKENS, LoRAConfig, VideoLLM
from lightning_veripo.data.videoqa import FrameSampling, VideoQACollator, VideoQADataset
from lightning_veripo.tiny import ARCHS, make_tiny_model

G = 3  # completions per prompt: 2 prompts -> 6 rows
T = 9  # completion tokens
CHUNK = 4  # divides neither the 6 x 9 positions nor the unmasked count
LENGTHS = [9, 4, 0, 7, 1, 9]  # tokens per row; row 2 is all padding


@pytest.fixture(scope="module", params=ARCHS)
def arch_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if request.param == "qwen2_5_vl":
        return request.getfixturevalue("tiny_model_dir")
    return make_tiny_model(tmp_path_factory.mktemp(f"tiny_{request.param}"), seed=0, arch=request.param)


def _load(model_dir: Path, lora: LoRAConfig | None, **options: Any) -> VideoLLM:
    backbone = VideoLLM(str(model_dir), lora=lora, **options).load()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-zero adapter, so policy and reference differ
        for name, param in backbone.model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return backbone


def _batch(backbone: VideoLLM, synthetic_dir: Path) -> dict[str, Any]:
    video = backbone.processor.video_processor
    side = 2 * video.patch_size * video.merge_size
    sampling = FrameSampling(num_frames=4, min_pixels=side * side, max_pixels=side * side)
    dataset = VideoQADataset(synthetic_dir / "train.json", sampling=sampling)
    return VideoQACollator(backbone.processor, sampling)([dataset[0], dataset[1]])


def _completions(backbone: VideoLLM) -> tuple[torch.Tensor, torch.Tensor]:
    """Random text tokens [6, T] (no vision placeholders), right-padded to LENGTHS."""
    forbidden = set(backbone.token_ids(FORBIDDEN_GENERATION_TOKENS))
    allowed = torch.tensor([i for i in range(len(backbone.tokenizer)) if i not in forbidden])
    gen = torch.Generator().manual_seed(1)
    ids = allowed[torch.randint(len(allowed), (len(LENGTHS), T), generator=gen)]
    mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    return ids.masked_fill(mask == 0, backbone.pad_token_id), mask


def _score(
    backbone: VideoLLM, batch: dict, chunk: int | None, reference: bool = False, temperature: float = 1.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Log-probs with `logprob_chunk_tokens=chunk`, and the trainable weights' gradients of a weighted sum."""
    backbone.logprob_chunk_tokens = chunk
    backbone.model.zero_grad(set_to_none=True)
    ids, mask = _completions(backbone)
    logps = backbone.sequence_logprobs(batch, ids, mask, G, reference=reference, temperature=temperature)
    if reference:
        return logps, {}
    weights = torch.linspace(-1.0, 2.0, logps.numel()).view_as(logps)  # every token's gradient differs
    (logps * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in backbone.model.named_parameters() if p.grad is not None}
    return logps.detach(), grads


def _assert_same(chunked: tuple, unchunked: tuple) -> None:
    (values, grads), (expected, expected_grads) = chunked, unchunked
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=0)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_equal_unchunked_values_and_lora_gradients(arch_dir, synthetic_dir, temperature):
    backbone = _load(arch_dir, LoRAConfig(r=4, alpha=8))
    batch = _batch(backbone, synthetic_dir)

    chunked = _score(backbone, batch, CHUNK, temperature=temperature)
    unchunked = _score(backbone, batch, None, temperature=temperature)

    _assert_same(chunked, unchunked)
    assert chunked[1] and all("lora_" in name for name in chunked[1])
    ids, mask = _completions(backbone)
    assert (chunked[0][mask == 0] == 0).all() and (chunked[0][mask == 1] < 0).all()


def test_chunked_logprobs_equal_unchunked_under_full_finetuning_with_head_gradients(arch_dir, synthetic_dir):
    backbone = _load(arch_dir, None, gradient_checkpointing=True)
    batch = _batch(backbone, synthetic_dir)

    chunked = _score(backbone, batch, CHUNK, temperature=0.7)
    unchunked = _score(backbone, batch, None, temperature=0.7)

    _assert_same(chunked, unchunked)
    assert any("lm_head" in name for name in chunked[1]) and any(
        "embed_tokens" in name for name in chunked[1]
    )


@pytest.mark.parametrize("lora", [True, False], ids=["adapter-disabled", "frozen-copy"])
def test_chunked_reference_logprobs_equal_unchunked(arch_dir, synthetic_dir, lora):
    backbone = _load(arch_dir, LoRAConfig(r=4, alpha=8) if lora else None)
    batch = _batch(backbone, synthetic_dir)

    chunked, _ = _score(backbone, batch, CHUNK, reference=True, temperature=0.7)
    unchunked, _ = _score(backbone, batch, None, reference=True, temperature=0.7)
    policy, _ = _score(backbone, batch, CHUNK, temperature=0.7)

    assert not chunked.requires_grad
    torch.testing.assert_close(chunked, unchunked, atol=1e-5, rtol=0)
    if lora:
        assert (policy - chunked).abs().max() > 1e-3


def test_lora_on_the_lm_head_gets_the_unchunked_gradients(tiny_model_dir, synthetic_dir):
    targets = r".*language_model.*\.(q_proj|v_proj)|.*lm_head"
    backbone = _load(tiny_model_dir, LoRAConfig(r=4, alpha=8, target_modules=targets))
    batch = _batch(backbone, synthetic_dir)

    chunked = _score(backbone, batch, CHUNK)
    unchunked = _score(backbone, batch, None)

    _assert_same(chunked, unchunked)
    assert any("lm_head.lora_A" in name for name in chunked[1])


def test_the_lm_head_sees_at_most_one_chunk_of_tokens_forward_and_backward(tiny_model_dir, synthetic_dir):
    backbone = _load(tiny_model_dir, LoRAConfig(r=4, alpha=8))
    batch = _batch(backbone, synthetic_dir)
    rows_seen: list[int] = []
    head = backbone.hf_model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda module, args: rows_seen.append(args[0].shape[0]))
    try:
        _score(backbone, batch, CHUNK)
    finally:
        handle.remove()

    scored = sum(LENGTHS)  # padding is never scored
    full, rest = divmod(scored, CHUNK)
    one_pass = [CHUNK] * full + ([rest] if rest else [])
    assert sorted(rows_seen) == sorted(one_pass * 2)  # the forward, then the backward's recomputation


def test_all_padding_scores_zero_and_still_backpropagates(tiny_model_dir, synthetic_dir):
    backbone = _load(tiny_model_dir, LoRAConfig(r=4, alpha=8))
    batch = _batch(backbone, synthetic_dir)
    ids, mask = _completions(backbone)

    logps = backbone.sequence_logprobs(batch, ids, torch.zeros_like(mask), G)
    logps.sum().backward()

    assert logps.shape == ids.shape and (logps == 0).all()


def test_a_chunk_size_below_one_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="logprob_chunk_tokens=0"):
        VideoLLM(str(tiny_model_dir), logprob_chunk_tokens=0)
