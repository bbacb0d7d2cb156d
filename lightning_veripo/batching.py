"""Slicing a prompt batch by prompt: which vision items each prompt owns, and the rows of a batch taken by index.

A processor batch keeps its videos and images apart from the prompt rows: `pixel_values_videos` concatenates
every video's patches, `video_grid_thw` has one row per video, and the encoder's output holds one feature
tensor per video. Taking prompt rows (to repeat each prompt for its G rollouts, or to keep the prompts dynamic
sampling keeps) must take their vision items alike; `take_prompts` is that one operation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# (modality, pixel key, grid key, extra per-item keys) as Qwen-VL processors name them.
MODALITIES = (
    ("video", "pixel_values_videos", "video_grid_thw", ("second_per_grid_ts",)),
    ("image", "pixel_values", "image_grid_thw", ()),
)
_ROW_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


def vision_items_per_row(
    batch: dict[str, Any], modality: str, token_id: int, spatial_merge_size: int
) -> list[list[int]]:
    """Which vision items (videos or images, in batch order) each prompt row owns, matched by the count of
    placeholder tokens (`token_id`) in the row against each item's token count."""
    grid_key = {"video": "video_grid_thw", "image": "image_grid_thw"}[modality]
    if batch.get(grid_key) is None:
        return [[] for _ in range(batch["input_ids"].shape[0])]
    item_tokens = (batch[grid_key].prod(-1) // spatial_merge_size**2).tolist()
    per_row: list[list[int]] = []
    item = 0
    for count in (batch["input_ids"] == token_id).sum(-1).tolist():
        mine: list[int] = []
        while count > 0:
            if item >= len(item_tokens):
                raise ValueError(f"more {modality} placeholder tokens in the prompts than {modality} inputs")
            count -= item_tokens[item]
            mine.append(item)
            item += 1
        if count != 0:
            raise ValueError(f"{modality} placeholder tokens do not line up with the {modality} inputs")
        per_row.append(mine)
    return per_row


def take_prompts(
    batch: dict[str, Any],
    rows: list[int],
    items_per_row: dict[str, list[list[int]]],
    vision: dict[str, Any] | None = None,
    keep_pixels: bool = True,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The prompt rows `rows` of `batch` (repeats allowed, in that order) with their vision inputs, and the
    encoded `vision` features of those items (None when `vision` is None).

    `items_per_row[modality]` says which items each row owns (`vision_items_per_row`). A modality's pixels
    are carried when `keep_pixels`, or when no features of it are given (they will be encoded again)."""
    first = batch["input_ids"]
    index = torch.tensor(rows, dtype=torch.long, device=first.device)
    out = {k: batch[k].index_select(0, index) for k in _ROW_KEYS if batch.get(k) is not None}
    taken: dict[str, Any] | None = {} if vision is not None else None
    for modality, pixel_key, grid_key, extra_keys in MODALITIES:
        if batch.get(grid_key) is None:
            continue
        grid = batch[grid_key]
        order = [i for row in rows for i in items_per_row[modality][row]]
        items = torch.tensor(order, dtype=torch.long, device=grid.device)
        out[grid_key] = grid.index_select(0, items)
        for key in extra_keys:
            if batch.get(key) is not None:
                out[key] = torch.as_tensor(batch[key], device=grid.device).index_select(0, items)
        encoded = vision is not None and modality in vision
        if batch.get(pixel_key) is not None and (keep_pixels or not encoded):
            chunks = torch.split(batch[pixel_key], grid.prod(-1).tolist())
            out[pixel_key] = torch.cat([chunks[i] for i in order]) if order else batch[pixel_key][:0]
        if taken is not None and encoded:
            taken[modality] = select_vision_items(vision[modality], order)  # deepstack features too
    return out, taken


def expand_prompts(
    batch: dict[str, Any],
    num_samples: int,
    items_per_row: dict[str, list[list[int]]],
    vision: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Each prompt of `batch` repeated `num_samples` times (prompt-major), as the model's forward inputs.
    Vision features are repeated, never re-encoded, when `vision` is given (`mm_encoder_outputs`); otherwise
    the pixels are repeated."""
    rows = [p for p in range(batch["input_ids"].shape[0]) for _ in range(num_samples)]
    out, taken = take_prompts(batch, rows, items_per_row, vision, keep_pixels=False)
    if taken:
        out["mm_encoder_outputs"] = taken
    return out


def select_prompts(
    batch: dict[str, Any], keep: torch.Tensor, backbone: Any, vision: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The prompts of `batch` where `keep` [N] is True, with their vision inputs and encoded features
    (`backbone.vision_items` says which items each prompt owns)."""
    if keep.all():
        return batch, vision
    rows = keep.nonzero().flatten().tolist()
    return take_prompts(batch, rows, backbone.vision_items(batch), vision, keep_pixels=True)


def map_vision_items(output: Any, fn: Callable[[list[torch.Tensor]], list[torch.Tensor]]) -> Any:
    """A new vision-encoder output (one modality of `encode_vision`) whose per-item features are `fn(items)`.

    `fn` maps the list of per-item feature tensors (one per video or image, in batch order) to a new list. It
    is applied to every per-item field alike: `pooler_output` (the features that replace the placeholder
    tokens) and any other field split the same way, such as Qwen3-VL's `deepstack_features` (a list over
    vision layers of per-item tuples, added to the early decoder layers' hidden states). Fields that are not
    split per item (the vision tower's concatenated `last_hidden_state`) are dropped: the language model reads
    only the per-item features.
    """
    items = list(output.pooler_output)
    sizes = [item.shape[0] for item in items]

    def per_item(value: Any) -> bool:
        if not isinstance(value, (list, tuple)) or len(value) != len(sizes):
            return False
        pairs = zip(value, sizes, strict=True)
        return all(isinstance(v, torch.Tensor) and v.shape[:1] == (n,) for v, n in pairs)

    fields: dict[str, Any] = {}
    for key, value in output.items():
        if per_item(value):
            fields[key] = fn(list(value))
        elif isinstance(value, (list, tuple)) and value and all(per_item(v) for v in value):
            fields[key] = [fn(list(v)) for v in value]
    return type(output)(**fields)


def select_vision_items(output: Any, order: list[int]) -> Any:
    """The vision-encoder output of the items at `order` (repeats allowed), every per-item field alike."""
    return map_vision_items(output, lambda items: [items[i] for i in order])


def shuffle_video_features(video: Any, grid_thw: torch.Tensor, seed: int) -> Any:
    """The same video features with their temporal slots in a random (non-identity) order, for T-GRPO.

    Every per-video field of the encoder output is permuted alike (Qwen3-VL's deepstack features included)."""
    gen = torch.Generator().manual_seed(seed)
    perms: list[torch.Tensor | None] = []
    for t, _, _ in grid_thw.tolist():
        if t < 2:
            perms.append(None)
            continue
        perm = torch.randperm(t, generator=gen)
        while torch.equal(perm, torch.arange(t)):
            perm = torch.randperm(t, generator=gen)
        perms.append(perm)

    def permute(items: list[torch.Tensor]) -> list[torch.Tensor]:
        return [
            x if p is None else x.view(len(p), -1, x.shape[-1])[p.to(x.device)].reshape_as(x)
            for x, p in zip(items, perms, strict=True)
        ]

    return map_vision_items(video, permute)
