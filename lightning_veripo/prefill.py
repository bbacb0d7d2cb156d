"""One prefill per prompt: run a prompt through the language model once and let its G rollouts share the cache.

transformers' `generate` given a prompt repeated G times runs the prompt's forward on every row: G prefills of
the same tokens, which dominate short rollouts of long video prompts (a 16-frame Qwen2.5-VL-7B prompt is ~2,000
vision tokens). Here the N distinct prompts are prefilled once, the key/value cache is repeated to the N*G rows,
and `generate` continues from it, so sampling (logits processors, stopping, padding, the random stream) is
transformers' own, unchanged.

What makes the continuation exact:
- Positions. Qwen-VL models place tokens with M-RoPE: 3-D positions over each video's grid, then text positions
  shifted by a per-row offset (`rope_deltas`). `generate` computes them from the whole prompt at its start; we
  compute the same tensor with the model's own `_prepare_position_ids_for_generation` on the N prompts, repeat it
  to the rows, and hand it to `generate`, which then only appends +1 per new token (as it does per row).
- One uncached token. `generate` must run at least one prompt token itself to get the first logits, so the
  prefill covers all prompt tokens but the last (a text token of the chat template, never a vision placeholder),
  and `generate` runs that last token on the N*G rows, then decodes as usual.
- Padding. Prompts are left-padded to one length; the attention mask (repeated) carries the padding into every
  later step exactly as in the per-row path.
- Hybrid caches. Qwen3.5's Gated-DeltaNet linear-attention layers cache no keys and values but a fixed-size state
  per row: the last K inputs of their causal convolution (`conv_states` [N, conv_dim, K]) and the recurrent
  state (`recurrent_states` [N, heads, d_k, d_v]). Both summarise the whole prompt, so they repeat to the rows
  like the full-attention layers' keys and values (`repeat_cache_rows`); transformers' own
  `batch_repeat_interleave` has no case for them.

Scoring the completions (old-policy, reference and loss passes) repeats the same waste, each row running the
whole prompt again: `completion_hidden_states` runs each prompt once (with gradient in the loss pass) and only
the completion tokens on the N*G rows, over the prompt's cache repeated through autograd.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, DummyLayer, DynamicLayer, LinearAttentionCacheLayerMixin


def cache_repeat_blocker(cache: Cache) -> str | None:
    """Why `repeat_cache_rows` cannot repeat `cache` (None when every layer is a key/value layer, a
    linear-attention layer, both in one, or an empty placeholder)."""
    for index, layer in enumerate(cache.layers):
        if not isinstance(layer, (DynamicLayer, LinearAttentionCacheLayerMixin, DummyLayer)):
            return (
                f"its cache layer {index} is a {type(layer).__name__}, which the library cannot repeat to the "
                "rows (it repeats key/value and linear-attention layers)"
            )
    return None


def repeat_cache_rows(cache: DynamicCache, repeats: int) -> None:
    """Repeat every layer of `cache` `repeats` times along the batch, prompt-major ([N, ...] -> [N*G, ...]).

    Key/value layers repeat their keys and values (transformers' `batch_repeat_interleave`); linear-attention
    layers their conv and recurrent states. The repeat is differentiable. The next forward reads the repeated
    recurrent state as its initial state (saved for its backward), and transformers then copies the new state
    into the buffer it read: marked uninitialised, the layer allocates a buffer of its own for that copy
    instead, so the gradient through the repeated state stays valid. (The conv state is only concatenated
    with the new inputs before its in-place update, which needs no saved value.)
    """
    for layer in cache.layers:
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            for i, state in layer.conv_states.items():
                if state is not None:
                    layer.conv_states[i] = state.repeat_interleave(
                        repeats, 0
                    )  # [N, conv_dim, K] -> [N*G, ...]
            for i, state in layer.recurrent_states.items():
                if state is not None:
                    layer.recurrent_states[i] = state.repeat_interleave(
                        repeats, 0
                    )  # [N, H, d_k, d_v] -> [N*G, ...]
                    layer.is_recurrent_states_initialized[i] = False
        if isinstance(layer, DynamicLayer):
            layer.batch_repeat_interleave(repeats)


def shared_prefill_blocker(model: nn.Module, num_prompt_tokens: int, synced_gpus: bool) -> str | None:
    """Why this transformers `model` cannot prefill once per prompt here (None when it can).

    `synced_gpus` (FSDP / DeepSpeed ZeRO-3) keeps every rank stepping `generate` in lockstep; the extra prefill
    forward would be one more collective per rank, which no test here has run on sharded ranks, so those
    strategies keep the per-row prefill.
    """
    if synced_gpus:
        return "synced_gpus is set (FSDP / DeepSpeed ZeRO-3): the shared prefill is not verified on sharded ranks"
    if getattr(model.config, "is_encoder_decoder", False):
        return f"{type(model).__name__} is an encoder-decoder model"
    if not hasattr(model, "_prepare_position_ids_for_generation"):
        return f"{type(model).__name__} has no _prepare_position_ids_for_generation (transformers too old?)"
    supports_cache = getattr(model, "_supports_default_dynamic_cache", None)
    if supports_cache is None or not supports_cache():
        return f"{type(model).__name__} does not use a DynamicCache, which is what gets repeated to the rows"
    if "cache" not in inspect.signature(model.forward).parameters:
        return f"this transformers version's {type(model).__name__}.forward takes no `cache` argument"
    unrepeatable = cache_repeat_blocker(DynamicCache(config=model.config.get_text_config(decoder=True)))
    if unrepeatable is not None:
        return f"{type(model).__name__}: {unrepeatable}"
    if num_prompt_tokens < 2:
        return "the prompts are a single token: generate needs one uncached prompt token after the prefill"
    return None


@torch.no_grad()
def prefill_prompts(model: nn.Module, prompts: dict[str, Any], num_samples: int) -> dict[str, Any]:
    """Prefill N left-padded prompts once; return `generate`'s inputs for their N*G rows (prompt-major).

    `prompts` holds the model inputs of the N prompts (`input_ids`, `attention_mask`, the vision grids and
    `mm_token_type_ids`, `mm_encoder_outputs` with the vision features; no pixels). The returned dict holds the
    repeated `input_ids` / `attention_mask` / `mm_token_type_ids`, the M-RoPE `position_ids` of the whole prompt
    and the `cache` of all prompt tokens but the last, repeated to the rows: pass it to `model.generate` with the
    sampling settings. `model` is the transformers model (LoRA layers, if any, are inside it).
    """
    ids, mask = prompts["input_ids"], prompts["attention_mask"]  # [N, L]
    text_inputs = {k: v for k, v in prompts.items() if k not in ("input_ids", "mm_encoder_outputs")}
    # [4, N, L] with M-RoPE (text positions, then temporal / height / width), else [N, L]
    positions = model._prepare_position_ids_for_generation(ids, dict(text_inputs))
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    head = {"input_ids": ids[:, :-1], "attention_mask": mask[:, :-1], "position_ids": positions[..., :-1]}
    if prompts.get("mm_token_type_ids") is not None:
        head["mm_token_type_ids"] = prompts["mm_token_type_ids"][:, :-1]
    grids = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
    vision = {k: prompts[k] for k in grids if k in prompts}
    if prompts.get("mm_encoder_outputs"):
        vision["mm_encoder_outputs"] = prompts["mm_encoder_outputs"]
    model(**head, **vision, cache=cache, use_cache=True, logits_to_keep=1)
    repeat_cache_rows(cache, num_samples)  # [N, heads, L-1, d] -> [N*G, heads, L-1, d] in every layer
    inner = getattr(model, "model", None)
    deltas = getattr(inner, "rope_deltas", None)
    if isinstance(deltas, torch.Tensor) and deltas.shape[0] == ids.shape[0]:
        # leave the model as the per-row path does: one M-RoPE offset per row, [N*G, 1]
        inner.rope_deltas = deltas.repeat_interleave(num_samples, 0)
    rows = {
        "input_ids": ids.repeat_interleave(num_samples, 0),
        "attention_mask": mask.repeat_interleave(num_samples, 0),
        "position_ids": positions.repeat_interleave(num_samples, -2),
        "cache": cache,
    }
    if prompts.get("mm_token_type_ids") is not None:
        rows["mm_token_type_ids"] = prompts["mm_token_type_ids"].repeat_interleave(num_samples, 0)
    return rows


def completion_hidden_states(
    body: nn.Module,
    prompts: dict[str, Any],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    num_samples: int,
) -> torch.Tensor:
    """The decoder's last hidden states [N*G, T, H] that predict each completion token, each prompt run once.

    What `body(prompt + completion)[:, L-1 : L+T-1]` gives on the N*G rows, at the cost of N prompt passes
    plus N*G completion passes over the prompts' repeated cache. `body` is the decoder below the LM head
    (`...ForConditionalGeneration.model`), `prompts` the N prompts' inputs as for `prefill_prompts`. With
    gradient, the cache is repeated through autograd, so the G rows' gradients meet in the prompt's activations,
    as they do in the per-row pass. Not under activation checkpointing (transformers drops the cache there).
    """
    G = num_samples
    ids, mask = prompts["input_ids"], prompts["attention_mask"]  # [N, L]
    L = ids.shape[1]
    extra = {k: v for k, v in prompts.items() if k not in ("input_ids", "attention_mask") and v is not None}
    # M-RoPE: the prompt pass computes each prompt's 3-D positions and its text offset (rope_deltas), as the
    # per-row pass does; completion tokens are text, placed after the prompt by that offset.
    grid = "image_grid_thw" in extra or "video_grid_thw" in extra
    mrope = hasattr(body, "rope_deltas") and "mm_token_type_ids" in extra and grid
    cache = DynamicCache(config=body.config.get_text_config(decoder=True))
    prompt_states = body(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True, **extra)[0]
    repeat_cache_rows(cache, G)  # differentiable: [N, heads, L, d] -> [N*G, heads, L, d]
    full_mask = torch.cat([mask.repeat_interleave(G, 0), completion_mask.to(mask.dtype)], 1)  # [N*G, L+T]
    positions = None  # the decoder's own: L, L+1, ... after the cached prompt
    if mrope:
        text = (full_mask.long().cumsum(-1) - 1)[:, L:]  # [N*G, T] index among the row's real tokens
        positions = (text + body.rope_deltas.repeat_interleave(G, 0)).unsqueeze(0).expand(3, -1, -1)
    elif hasattr(body, "rope_deltas"):  # Qwen-VL without vision: its plain count, as with no cache
        steps = torch.arange(L, full_mask.shape[1], device=ids.device)
        positions = steps.view(1, 1, -1).expand(3, full_mask.shape[0], -1)
    completion = {"input_ids": completion_ids, "attention_mask": full_mask, "position_ids": positions}
    completion_states = body(**completion, cache=cache, use_cache=True)[0]  # [N*G, T, H]
    return torch.cat([prompt_states[:, -1:].repeat_interleave(G, 0), completion_states[:, :-1]], 1)


def active_dropout(model: nn.Module) -> bool:
    """Whether a forward of `model` in training mode drops anything: a dropout module (LoRA's) or the
    attention dropout of its config."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    if float(getattr(text, "attention_dropout", 0.0) or 0.0) > 0:
        return True
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def activation_checkpointing(model: nn.Module) -> bool:
    """Whether gradient (activation) checkpointing is on: `is_activation_checkpointing` where transformers has
    it, else `is_gradient_checkpointing` (a deprecated alias that warns in the versions that have both)."""
    on = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if on is None else on)
