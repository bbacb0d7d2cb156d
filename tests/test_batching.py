"""Slicing a prompt batch by prompt (lightning_veripo.batching), on hand-made processor batches: which vision
items each prompt owns, rows taken with their items, and T-GRPO's shuffled frames, by value."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from lightning_veripo.batching import (
    expand_prompts,
    select_vision_items,
    shuffle_video_features,
    take_prompts,
    vision_items_per_row,
)

VIDEO = 9  # the placeholder token id in these batches
MERGE = 2  # spatial merge size: a grid (t, h, w) is t*h*w / 4 placeholder tokens


def batch() -> dict:
    """Three prompts: prompt 0 owns video 0 (grid 1x2x2: 1 token), prompt 1 none, prompt 2 videos 1 and 2
    (grids 2x2x2: 2 tokens, 1x2x2: 1 token). Pixels: one row per patch, valued by video (0., 1., 2.)."""
    ids = torch.tensor([[0, VIDEO, 5, 6], [0, 0, 5, 6], [VIDEO, VIDEO, VIDEO, 6]])
    grid = torch.tensor([[1, 2, 2], [2, 2, 2], [1, 2, 2]])
    pixels = torch.cat([torch.full((4, 3), 0.0), torch.full((8, 3), 1.0), torch.full((4, 3), 2.0)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "video_grid_thw": grid,
            "pixel_values_videos": pixels, "second_per_grid_ts": torch.tensor([0.5, 1.0, 2.0])}  # fmt: skip


def features() -> BaseModelOutputWithPooling:
    return BaseModelOutputWithPooling(
        pooler_output=[torch.full((n, 2), float(i)) for i, n in enumerate([1, 2, 1])]
    )


def test_each_prompt_owns_the_videos_its_placeholders_count() -> None:
    assert vision_items_per_row(batch(), "video", VIDEO, MERGE) == [[0], [], [1, 2]]
    assert vision_items_per_row(batch(), "image", 7, MERGE) == [[], [], []]  # no image grid: nothing owned
    broken = {
        **batch(),
        "input_ids": torch.tensor([[0, VIDEO, VIDEO, 6], [0, 0, 5, 6], [VIDEO, VIDEO, VIDEO, 6]]),
    }
    with pytest.raises(ValueError, match="do not line up"):
        vision_items_per_row(broken, "video", VIDEO, MERGE)


def test_taking_rows_takes_their_videos_pixels_timestamps_and_features_in_order() -> None:
    items = {"video": vision_items_per_row(batch(), "video", VIDEO, MERGE), "image": [[], [], []]}
    out, vision = take_prompts(batch(), [2, 0, 2], items, {"video": features()}, keep_pixels=True)
    assert out["input_ids"].tolist() == [batch()["input_ids"][i].tolist() for i in (2, 0, 2)]
    assert out["video_grid_thw"].tolist() == [[2, 2, 2], [1, 2, 2], [1, 2, 2], [2, 2, 2], [1, 2, 2]]
    assert out["second_per_grid_ts"].tolist() == [1.0, 2.0, 0.5, 1.0, 2.0]
    assert (
        out["pixel_values_videos"][:, 0].tolist() == [1.0] * 8 + [2.0] * 4 + [0.0] * 4 + [1.0] * 8 + [2.0] * 4
    )
    assert [f[0, 0].item() for f in vision["video"].pooler_output] == [1.0, 2.0, 0.0, 1.0, 2.0]
    without, _ = take_prompts(batch(), [1], items, {"video": features()}, keep_pixels=False)
    assert without["video_grid_thw"].shape == (0, 3) and "pixel_values_videos" not in without
    text_only, _ = take_prompts(batch(), [1], items, None, keep_pixels=True)  # a prompt with no video at all
    assert text_only["pixel_values_videos"].shape == (0, 3)


def test_expanding_prompts_repeats_each_row_and_its_features_prompt_major() -> None:
    items = {"video": vision_items_per_row(batch(), "video", VIDEO, MERGE), "image": [[], [], []]}
    out = expand_prompts(batch(), 2, items, {"video": features()})
    assert torch.equal(out["input_ids"], batch()["input_ids"].repeat_interleave(2, 0))
    assert "pixel_values_videos" not in out  # the features travel instead of the pixels
    assert [f[0, 0].item() for f in out["mm_encoder_outputs"]["video"].pooler_output] == [0, 0, 1, 2, 1, 2]
    repixeled = expand_prompts(batch(), 2, items, None)  # no features: the pixels are repeated
    assert repixeled["pixel_values_videos"].shape[0] == 2 * batch()["pixel_values_videos"].shape[0]


def test_shuffled_video_features_permute_whole_temporal_slots_never_in_order() -> None:
    grid = torch.tensor([[4, 1, 1], [1, 1, 1]])  # 4 temporal slots of one token, then a single-frame video
    video = BaseModelOutputWithPooling(
        pooler_output=[torch.arange(4.0)[:, None].repeat(1, 2), torch.ones(1, 2)]
    )
    a = shuffle_video_features(video, grid, seed=3).pooler_output
    b = shuffle_video_features(video, grid, seed=3).pooler_output
    assert torch.equal(a[0], b[0]) and sorted(a[0][:, 0].tolist()) == [0, 1, 2, 3]
    assert a[0][:, 0].tolist() != [0, 1, 2, 3] and torch.equal(a[1], video.pooler_output[1])
    assert [x[0, 0].item() for x in select_vision_items(video, [1, 0]).pooler_output] == [1.0, 0.0]
