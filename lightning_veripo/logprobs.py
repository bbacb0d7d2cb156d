"""Per-token log-probs of completions without holding `[rows, tokens, vocabulary]` logits: pure tensor functions.

`chunked_logprobs` runs the LM head and a float32 log-softmax over chunks of completion tokens and recomputes
each chunk's logits in the backward pass (as Liger's and TRL's chunked cross-entropy do), so a pass over 16
rollouts of 1,024 tokens at Qwen2.5-VL's 151,936-token vocabulary holds one chunk's logits (156 MB at 256
tokens) instead of 10 GB. `VideoLLM.sequence_logprobs` calls it for GRPO, DPO, SFT and evaluation alike.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., index] without materialising the whole log-softmax: [B, T, V] -> [B, T]."""
    picked = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """A transformers `...ForConditionalGeneration` (bare or inside a peft wrapper) split into the module that
    returns the last hidden states (`.model`) and its LM head. peft injects LoRA into both in place, so the
    split runs the adapter, and `disable_adapter()` disables it, as the whole model's forward does."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body, head = getattr(base, "model", None), base.get_output_embeddings()
    if not isinstance(body, nn.Module) or head is None:
        raise TypeError(
            f"{type(base).__name__} has no `.model` decoder and LM head to run the chunked log-probs with; "
            "set VideoLLM(logprob_chunk_tokens=None) to score with the model's own forward"
        )
    return body, head


def _token_logprobs(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, temperature: float
) -> torch.Tensor:
    """log softmax(head(hidden) / temperature)[targets] in float32: [n, H] -> [n]."""
    return selective_log_softmax(head(hidden).float() / temperature, targets)


class _LinearLogprobs(torch.autograd.Function):
    """log softmax((hidden W^T + b) / t)[targets] for one chunk of tokens, [n, H] -> [n] float32, whose
    backward recomputes the chunk's logits instead of keeping them, and works in place on them: the softmax
    minus the one-hot target is the gradient of the picked log-prob with respect to the logits.
    The chunk's autocast state (bf16-mixed) is replayed in the backward, so both compute in the same dtypes."""

    @staticmethod
    def _logits(
        hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, t: float
    ) -> torch.Tensor:
        logits = nn.functional.linear(hidden, weight, bias)
        return logits.float().div_(t) if t != 1.0 else logits.float()

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
    ) -> torch.Tensor:
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.temperature = temperature
        logits = _LinearLogprobs._logits(hidden, weight, bias, temperature)  # [n, V]
        lse = torch.logsumexp(logits, -1)  # [n]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        return logits.gather(-1, targets[:, None]).squeeze(-1) - lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            logits = nn.functional.linear(hidden, weight, bias)
        compute_dtype = logits.dtype
        t = ctx.temperature
        probs = (logits.float().div_(t) if t != 1.0 else logits.float()).sub_(lse[:, None]).exp_()
        del logits
        d = probs.mul_(-grad[:, None]).scatter_add_(-1, targets[:, None], grad[:, None])  # d out / d logits
        d = (d.div_(t) if t != 1.0 else d).to(compute_dtype)  # [n, V]
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = d @ weight.to(compute_dtype) if need_hidden else None
        grad_weight = d.t() @ hidden.to(compute_dtype) if need_weight else None
        grad_bias = d.sum(0) if bias is not None and need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None


def chunked_logprobs(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 256,
) -> torch.Tensor:
    """Per-token log-probs [B, T] (float32, 0 where masked) of `targets` under `head(hidden) / temperature`,
    never holding more than `chunk_tokens` rows of full-vocabulary logits.

    hidden: [B, T, H] the states that predict each target; targets, mask: [B, T]. Only the unmasked tokens are
    scored, `chunk_tokens` at a time (across rows). The forward keeps only each chunk's log-probs; the backward
    recomputes the chunk's logits to give the gradients of `hidden` and of the head's trainable weights (tied
    embeddings, full fine-tuning), chunk by chunk. A plain `nn.Linear` head runs `_LinearLogprobs` (the
    gradient written in place over the recomputed logits); any other head (LoRA on the LM head) runs as an
    activation checkpoint per chunk, which recomputes it through autograd.
    """
    B, T = targets.shape
    where = mask.reshape(-1).nonzero().squeeze(-1)  # [n] unmasked (row, position) pairs
    states = hidden.reshape(B * T, -1).index_select(0, where)  # [n, H]
    picked = targets.reshape(-1).index_select(0, where)  # [n]
    linear = type(head) is nn.Linear  # not a subclass: quantised heads keep their own forward
    trainable = any(p.requires_grad for p in head.parameters())
    recompute = torch.is_grad_enabled() and (states.requires_grad or trainable)
    pieces = []
    for h, y in zip(states.split(chunk_tokens), picked.split(chunk_tokens), strict=True):
        if linear:
            pieces.append(_LinearLogprobs.apply(h, head.weight, head.bias, y, temperature))
        elif recompute:
            pieces.append(checkpoint(_token_logprobs, h, head, y, temperature, use_reentrant=False))
        else:
            pieces.append(_token_logprobs(h, head, y, temperature))
    out = hidden.new_zeros(B * T, dtype=torch.float32).index_put((where,), torch.cat(pieces))
    return out.view(B, T)
