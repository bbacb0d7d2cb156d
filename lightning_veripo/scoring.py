"""Per-token log-probs of given completions under a model: every row whole, or each prompt once for its rows.

Both return the same values and gradients (`tests/test_shared_prefill.py`); `VideoLLM.sequence_logprobs` picks
the shared pass where it is exact and calls these with the policy or the reference model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_veripo.logprobs import body_and_head, chunked_logprobs, selective_log_softmax
from lightning_veripo.prefill import completion_hidden_states


def rowwise_logprobs(
    scorer: nn.Module,
    inputs: dict[str, Any],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float,
    chunk_tokens: int | None,
) -> torch.Tensor:
    """Log-probs [rows, T] of `completion_ids` appended to each row of the expanded prompt `inputs` (one row
    per completion), each row run whole. `chunk_tokens=None` takes the model's own logits (`logits_to_keep`)."""
    T = completion_ids.shape[1]
    completion_ids = completion_ids.to(inputs["input_ids"].device)
    completion_mask = completion_mask.to(inputs["attention_mask"].device)
    inputs = dict(inputs)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], completion_ids], 1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], completion_mask.long()], 1)
    if "mm_token_type_ids" in inputs:
        pad = inputs["mm_token_type_ids"].new_zeros(completion_ids.shape)
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], pad], 1)
    if chunk_tokens is None:
        logits = scorer(**inputs, use_cache=False, logits_to_keep=T + 1).logits[:, :-1]
        return selective_log_softmax(logits.float() / temperature, completion_ids) * completion_mask
    body, head = body_and_head(scorer)
    hidden = body(**inputs, use_cache=False)[0][:, -(T + 1) : -1]  # [N*G, T, H]: predicts each token
    return chunked_logprobs(hidden, head, completion_ids, completion_mask, temperature, chunk_tokens)


def shared_prompt_logprobs(
    scorer: nn.Module,
    prompts: dict[str, Any],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    num_samples: int,
    temperature: float,
    chunk_tokens: int,
) -> torch.Tensor:
    """Log-probs [N*G, T] with each of the N `prompts` through the decoder once and its cache shared by its G
    completion rows (`prefill.completion_hidden_states`)."""
    completion_ids = completion_ids.to(prompts["input_ids"].device)
    completion_mask = completion_mask.to(prompts["attention_mask"].device)
    body, head = body_and_head(scorer)
    hidden = completion_hidden_states(body, prompts, completion_ids, completion_mask, num_samples)
    return chunked_logprobs(hidden, head, completion_ids, completion_mask, temperature, chunk_tokens)
