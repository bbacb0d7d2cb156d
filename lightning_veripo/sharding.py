"""FSDP2 for the Video-LLM: `fully_shard` per decoder layer and vision block, then the rest, on Lightning's
ModelParallelStrategy; and the adapter exported from full tensors.

The units follow what the code calls directly, since FSDP2 gathers a unit's parameters only when that unit's
`forward` runs: each decoder layer and each vision block (the memory-sized units, as torchtitan shards them),
under separate roots, since a unit called outside its root's forward breaks FSDP2's lazy initialisation: the
vision tower (`encode_vision` calls it outside the model's forward) with its blocks inside, and each part of the
language model (the multimodal model calls the embeddings outside the decoder's forward; `logprobs.body_and_head`
calls the head outside the model's): embeddings, each decoder layer, final norm, LM head. Under full fine-tuning the frozen reference
copy is sharded the same way, as a separate tree (no gradient, so no reduce-scatter).

`FSDP2Strategy` is `ModelParallelStrategy` with the sharding knobs a LightningCLI config can set:
`mixed_precision` ("bf16": bf16 parameters for compute, fp32 gradient reduction; a GPU knob) and
`activation_checkpointing` (transformers' per-layer recompute, which generation turns off while it runs).
Tensor parallelism is a knob of ModelParallelStrategy, but no tensor-parallel plan for Qwen-VL exists here, so
`tensor_parallel_size > 1` is refused with that reason.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

logger = logging.getLogger(__name__)

_LAYER_CLASS_SUFFIXES = ("DecoderLayer", "VisionBlock")  # Qwen2/2.5/3-VL: Qwen2_5_VLDecoderLayer, ...
_MIXED_PRECISION = {
    None: MixedPrecisionPolicy(),
    "bf16": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
}


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy (FSDP2 over the data-parallel mesh dimension) with the sharding knobs.

    Args:
        data_parallel_size: processes that shard the weights ("auto": all of them).
        tensor_parallel_size: must be 1 (or "auto", which is 1 here): no tensor-parallel plan for Qwen-VL yet.
        mixed_precision: None (compute in the weights' dtype) or "bf16" (bf16 parameters, fp32 reduction).
        activation_checkpointing: recompute each decoder layer's activations in the backward pass.
        reshard_after_forward: free the gathered parameters after each unit's forward (ZeRO-3); False keeps
            them until the backward (ZeRO-2-like: more memory, one all-gather fewer per layer).
        save_distributed_checkpoint: each rank writes its shard (`.distcp`); False gathers one file on rank 0.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = "auto",
        mixed_precision: Literal["bf16"] | None = None,
        activation_checkpointing: bool = False,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
    ) -> None:
        if tensor_parallel_size not in ("auto", 1):
            raise ValueError(
                f"FSDP2Strategy tensor_parallel_size={tensor_parallel_size}: lightning_veripo has no "
                "tensor-parallel plan for Qwen-VL (only data-parallel sharding is implemented and tested); "
                "set tensor_parallel_size=1 and shard over data_parallel_size"
            )
        if mixed_precision not in _MIXED_PRECISION:
            raise ValueError(f"FSDP2Strategy mixed_precision={mixed_precision!r} is not None or 'bf16'")
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )
        self.mixed_precision = mixed_precision
        self.activation_checkpointing = activation_checkpointing
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" is one data-parallel group per node and tensor parallelism inside it;
        # here "auto" shards over every process of every node
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def uses_fsdp2(strategy: Any) -> bool:
    """Whether a Lightning strategy applies FSDP2 in `configure_model` (ModelParallelStrategy or ours)."""
    return isinstance(strategy, ModelParallelStrategy)


def is_sharded(module: nn.Module) -> bool:
    """Whether `fully_shard` has been applied to `module` or any module inside it."""
    return any(isinstance(m, FSDPModule) for m in module.modules())


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith(_LAYER_CLASS_SUFFIXES)]


def shard_tree(
    model: nn.Module,
    mesh: DeviceMesh,
    mixed_precision: str | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Apply `fully_shard` to one transformers model (peft-wrapped or not), innermost units first."""
    if is_sharded(model):
        return model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    visual, language = getattr(inner, "visual", None), getattr(inner, "language_model", None)
    head = base.get_output_embeddings()
    if not all(isinstance(m, nn.Module) for m in (visual, language, head)):
        raise ValueError(
            f"{type(base).__name__} lacks model.visual, model.language_model or an output embedding: FSDP2 "
            "here shards the Qwen-VL layout"
        )
    if head.weight is base.get_input_embeddings().weight:
        raise ValueError(
            f"{type(base).__name__} ties its LM head to its input embeddings (tie_word_embeddings=true): FSDP2 "
            "here shards the two as separate units, which a shared weight cannot be; use a checkpoint with "
            "untied embeddings (Qwen2.5-VL-7B and larger) or the DDP overlay"
        )
    options = {"mesh": mesh, "mp_policy": _MIXED_PRECISION[mixed_precision]}
    # the vision tower: one root (called only through its forward), its blocks inside it
    for block in _layers(visual):
        fully_shard(block, reshard_after_forward=reshard_after_forward, **options)
    fully_shard(visual, reshard_after_forward=False, **options)
    # the language model: its parts are called from outside its forward (the embeddings by the multimodal
    # model, the head by the chunked log-prob pass), so each part is its own root; the decoder layers free
    # their gathered weights after forward, the small embedding / norm / head units keep theirs
    for part in language.children():
        for unit in part if isinstance(part, nn.ModuleList) else [part]:
            if any(True for _ in unit.parameters()):
                keep = not type(unit).__name__.endswith(_LAYER_CLASS_SUFFIXES)
                fully_shard(unit, reshard_after_forward=not keep and reshard_after_forward, **options)
    fully_shard(head, reshard_after_forward=False, **options)
    left = [name for name, p in model.named_parameters() if not isinstance(p, DTensor)]
    if left:
        raise ValueError(
            f"FSDP2: parameters outside every sharded unit would not be synchronised across ranks: {left[:5]}"
        )
    return model


def shard_backbone(backbone: Any, mesh: DeviceMesh, strategy: Any) -> None:
    """Shard a loaded `VideoLLM` (its policy, and its frozen reference copy under full fine-tuning) with the
    knobs of `strategy` (an `FSDP2Strategy`; a plain ModelParallelStrategy gets the defaults). Idempotent."""
    mixed = getattr(strategy, "mixed_precision", None)
    reshard = getattr(strategy, "reshard_after_forward", True)
    if getattr(strategy, "activation_checkpointing", False) and not backbone.gradient_checkpointing:
        backbone.gradient_checkpointing = True
        backbone.hf_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        if backbone.lora is not None:
            backbone.hf_model.enable_input_require_grads()
    shard_tree(backbone.model, mesh, mixed, reshard)
    if backbone._reference is not None:
        shard_tree(backbone._reference, mesh, mixed, reshard)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state of a sharded model as plain CPU tensors on rank 0 (empty elsewhere): a collective,
    every rank must call it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def save_pretrained_from_full_tensors(model: nn.Module, processor: Any, out: Path) -> Path:
    """`save_pretrained` of a sharded model: gathered to full tensors, written once by rank 0, the other ranks
    waiting at a barrier until the directory is complete. Every rank must call it."""
    state = full_state_dict(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, state_dict=state)
        processor.save_pretrained(out)
    if dist.is_initialized():
        dist.barrier()
    return out
