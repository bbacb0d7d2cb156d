"""Completions as token ids: what ends one, padding, tokenizing given texts, decoding generated ids.

Generation, SFT targets and DPO's chosen/rejected texts all go through these, so a completion ends the same way
(at its first end-of-turn token, which it includes) wherever it comes from.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

# Tokens a rollout must never contain: vision placeholders make the next forward pass fail ("video features
# and video tokens do not match"), and a new chat turn would leak a fake user message into the completion.
FORBIDDEN_GENERATION_TOKENS = (
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|im_start|>",
)


class Completions(NamedTuple):
    """G sampled completions per prompt, prompt-major: rows g*G .. g*G+G-1 belong to prompt g."""

    ids: torch.Tensor  # [N*G, T] token ids, padded after the end
    mask: torch.Tensor  # [N*G, T] 1 for completion tokens (the end-of-turn token included)
    text: list[str]  # N*G decoded completions (end-of-turn and padding removed)
    truncated: torch.Tensor  # [N*G] bool: reached max_new_tokens without an end-of-turn token


END_OF_TURN = "<|im_end|>"


def end_token_ids(tokenizer: Any) -> list[int]:
    """Tokens that end a completion: end-of-turn, end-of-text and the tokenizer's eos, those it has."""
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in (END_OF_TURN, "<|endoftext|>") if t in vocab]
    eos = tokenizer.eos_token_id
    return sorted(set(ids + ([eos] if eos is not None else [])))


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad token, else its first end token."""
    pad = tokenizer.pad_token_id
    return pad if pad is not None else end_token_ids(tokenizer)[0]


def tokenize_completions(tokenizer: Any, texts: list[str], add_end: bool = True) -> Completions:
    """Completion texts -> `Completions`: token ids right-padded with `pad_token_id`, the end-of-turn token
    appended when `add_end` (and the vocabulary has it), as generation ends them; nothing truncated. The one
    tokenization of given completions: SFT targets (`VideoLLM.tokenize_completions`) and DPO's chosen and
    rejected texts (`PreferenceCollator`)."""
    end = tokenizer.get_vocab().get(END_OF_TURN) if add_end else None
    pad = pad_token_id(tokenizer)
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if end is not None:
            ids = ids + [end]
        rows.append(torch.tensor(ids or [pad], dtype=torch.long))
    ids = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad)  # [B, T]
    lengths = torch.tensor([len(r) for r in rows])
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()  # [B, T]
    return Completions(
        ids=ids, mask=mask, text=list(texts), truncated=torch.zeros(len(rows), dtype=torch.bool)
    )


def completions_from_ids(tokenizer: Any, ids: torch.Tensor, max_new_tokens: int | None = None) -> Completions:
    """Mask and decode raw generated ids [rows, T]: a completion ends at (and includes) its first end token;
    one that reached `max_new_tokens` without one is `truncated`."""
    pad = pad_token_id(tokenizer)
    if ids.shape[1] == 0:
        ids = ids.new_full((ids.shape[0], 1), pad)
    is_end = torch.isin(ids, torch.tensor(end_token_ids(tokenizer), device=ids.device))
    has_end = is_end.any(-1)
    first_end = torch.where(has_end, is_end.int().argmax(-1), ids.shape[1])
    positions = torch.arange(ids.shape[1], device=ids.device)
    mask = (positions[None, :] <= first_end[:, None]).long() & (positions[None, :] < ids.shape[1])
    mask = torch.where(has_end[:, None], mask, (positions[None, :] < ids.shape[1]).long())
    ids = ids.masked_fill(mask == 0, pad)
    text = [
        tokenizer.decode(row[: int(n)].tolist(), skip_special_tokens=False)
        for row, n in zip(ids, torch.where(has_end, first_end, ids.shape[1]), strict=True)
    ]
    limit = max_new_tokens if max_new_tokens is not None else ids.shape[1]
    truncated = ~has_end & (mask.sum(-1) >= limit)
    return Completions(ids=ids, mask=mask, text=text, truncated=truncated)
