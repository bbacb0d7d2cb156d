"""Left padding is exact: a prompt batched with a longer one (so left-padded) gets the same log-probs and the same
greedy tokens as the same prompt alone, on every tiny architecture, per row and with the shared prefill.

For attention layers the mask hides the pads. Qwen3.5's Gated-DeltaNet layers have no mask inside their
recurrence: transformers zeroes the pads' hidden states before the layer (`apply_mask_to_padding_states`), so
their projections (no bias) are zero, the causal convolution sees the zeros its own left padding would give, and
a zero key and value leave the zero initial recurrent state unchanged (the decay multiplies zero). This pins that
nothing of the pads leaks into the conv or recurrent state.

A randomly initialised embedding has a zero row at the pad token (`padding_idx`), which would hide any leak; a
real checkpoint's pad token (`<|endoftext|>`) has a trained, non-zero row. So the tests give it one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import LinearAttentionLayer

from lightning_veripo.backbone import VideoLLM
from lightning_veripo.data.videoqa import FrameSampling, VideoQACollator, VideoQADataset
from lightning_veripo.tiny import ARCHS, make_tiny_model

G = 2


def _give_the_pad_token_an_embedding(model: torch.nn.Module) -> None:
    pad = model.config.get_text_config().pad_token_id
    embed = model.get_input_embeddings().weight
    with torch.no_grad():
        embed[pad] = torch.randn(embed.shape[1], generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=ARCHS)
def padded_pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path
):
    """(backbone, the two prompts batched, the shorter prompt alone, the shorter prompt's row in the pair)."""
    path = make_tiny_model(tmp_path_factory.mktemp(f"tiny_{request.param}"), seed=0, arch=request.param)
    backbone = VideoLLM(str(path)).load()
    _give_the_pad_token_an_embedding(backbone.hf_model)
    video = backbone.processor.video_processor
    side = 2 * video.patch_size * video.merge_size
    sampling = FrameSampling(num_frames=4, min_pixels=side * side, max_pixels=side * side)
    dataset = VideoQADataset(synthetic_dir / "train.json", sampling=sampling)
    collate = VideoQACollator(backbone.processor, sampling)
    pair = collate([dataset[0], dataset[2]])
    lengths = pair["attention_mask"].sum(-1).tolist()
    row = lengths.index(min(lengths))
    assert pair["attention_mask"][row, : max(lengths) - min(lengths)].sum() == 0  # really left-padded
    alone = collate([dataset[[0, 2][row]]])
    return backbone, pair, alone, row


@pytest.mark.parametrize("shared", [False, True], ids=["per_row", "shared_prefill"])
def test_left_padded_prompt_gives_the_logprobs_and_greedy_tokens_of_the_prompt_alone(padded_pair, shared):
    backbone, pair, alone, row = padded_pair
    backbone.shared_prefill = shared
    reference = backbone.generate(alone, num_samples=G, max_new_tokens=8, do_sample=False)
    batched = backbone.generate(pair, num_samples=G, max_new_tokens=8, do_sample=False)
    rows = slice(row * G, (row + 1) * G)
    width = reference.ids.shape[1]

    assert torch.equal(batched.ids[rows, :width], reference.ids)
    assert (batched.mask[rows, width:] == 0).all()

    ids = reference.ids.repeat(2, 1)  # the same completions under both prompts of the pair
    mask = reference.mask.repeat(2, 1)
    with torch.no_grad():
        alone_logprobs = backbone.sequence_logprobs(alone, reference.ids, reference.mask, num_samples=G)
        pair_logprobs = backbone.sequence_logprobs(pair, ids, mask, num_samples=G)
    torch.testing.assert_close(pair_logprobs[rows], alone_logprobs, rtol=1e-5, atol=1e-5)
    assert alone_logprobs.abs().sum() > 0


def test_pads_leave_the_linear_attention_conv_and_recurrent_states_of_the_prompt_alone(tmp_path):
    model = VideoLLM(str(make_tiny_model(tmp_path, arch="qwen3_5"))).load().hf_model
    _give_the_pad_token_an_embedding(model)
    pad = model.config.get_text_config().pad_token_id
    ids = torch.tensor([[40, 41, 42]])  # fewer tokens than pads: a leak would still be in the state
    padded = torch.cat([torch.full((1, 5), pad), ids], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones_like(ids)], 1)

    def prefill(rows: torch.Tensor, rows_mask: torch.Tensor | None) -> tuple[DynamicCache, torch.Tensor]:
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        with torch.no_grad():
            states = model.model(input_ids=rows, attention_mask=rows_mask, cache=cache, use_cache=True)[0]
        return cache, states

    (alone, alone_states), (batched, batched_states) = prefill(ids, None), prefill(padded, mask)
    linear = [i for i, layer in enumerate(alone.layers) if isinstance(layer, LinearAttentionLayer)]
    assert linear and alone.layers[linear[0]].recurrent_states[0].abs().sum() > 0
    for i in linear:
        torch.testing.assert_close(batched.layers[i].conv_states[0], alone.layers[i].conv_states[0])
        torch.testing.assert_close(batched.layers[i].recurrent_states[0], alone.layers[i].recurrent_states[0])
    torch.testing.assert_close(batched_states[:, 5:], alone_states, rtol=1e-5, atol=1e-5)
