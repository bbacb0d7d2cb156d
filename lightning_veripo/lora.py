"""LoRA for a Video-LLM: the settings, the named target presets, and attaching the adapter with peft."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

# The language model's projections: attention and MLP (every Qwen-VL), and Qwen3.5's Gated-DeltaNet linear-attention
# layers' input projections (query/key/value, output gate z, the decay a and step size b) and output projection.
# Qwen3.5-MoE's routed experts are fused 3-D weights, not Linear layers: there the MLP preset reaches its shared
# expert only.
_LINEAR_ATTENTION = r"in_proj_qkv|in_proj_z|in_proj_a|in_proj_b|out_proj"
_LANGUAGE_MODEL = (
    rf"language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|{_LINEAR_ATTENTION})"
)
# The vision merger's two linear layers (the projection of the video into the language model): Qwen2-VL and
# Qwen2.5-VL name them `visual.merger.mlp.0/2`, Qwen3-VL `visual.merger.linear_fc1/2`.
_MERGER = r"visual\.merger\.(mlp\.[02]|linear_fc[12])"
# Named LoRA targets for `LoRAConfig.target_modules`, as regexes that peft matches (re.fullmatch) to module names.
MERGER_TARGETS = "language_model+merger"
LORA_TARGETS = {
    "language_model": rf".*{_LANGUAGE_MODEL}",
    MERGER_TARGETS: rf".*({_LANGUAGE_MODEL}|{_MERGER})",
}


@dataclass
class LoRAConfig:
    """peft LoRA settings.

    `target_modules` is a name in `LORA_TARGETS` (`language_model`: the language model's attention and MLP
    projections; `language_model+merger`: those and the vision merger, which needs `freeze_vision=false`), a
    regex that peft matches whole against module names, or a list of module names. The default is the
    `language_model` regex, written out.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = LORA_TARGETS["language_model"]

    def resolved_targets(self) -> str | list[str]:
        """`target_modules` with a preset name replaced by its regex."""
        if isinstance(self.target_modules, str):
            return LORA_TARGETS.get(self.target_modules, self.target_modules)
        return self.target_modules


def attach_lora(model: nn.Module, lora: LoRAConfig, adapter_path: str | None = None) -> nn.Module:
    """`model` with a LoRA adapter: the one saved at `adapter_path` (trainable, to continue it), else a fresh
    one of `lora`'s settings. The merger preset must find a merger layer, or the adapter would miss it."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_path:
        return PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
    spec = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.resolved_targets(),
        bias="none",
    )
    peft_model = get_peft_model(model, spec)
    if lora.target_modules == MERGER_TARGETS:
        merger = [n for n, _ in peft_model.named_modules() if re.search(_MERGER + r"\.lora_A$", n)]
        if not merger:
            raise ValueError(
                f"LoRA target_modules={MERGER_TARGETS!r}: {type(model).__name__} has no vision merger "
                f"layer this preset knows ({_MERGER}); give a regex that names its merger's layers"
            )
    return peft_model
