"""The Video-LLM both training stages share: load, LoRA, generate rollouts, score completions, reference policy.

`VideoLLM` wraps any transformers image-text-to-text model (Qwen2.5-VL first; Qwen2-VL, Qwen3-VL where
transformers supports them) and its processor. It is an `nn.Module` so a LightningModule can own it, but it
loads its weights lazily in `load()` (called from the LightningModule's `configure_model`, which is where
sharded strategies want models built).

Vision is encoded once per prompt: `encode_vision` runs the vision tower on a batch of prompts and returns the
per-video / per-image features; `generate` and `sequence_logprobs` accept them and repeat the *features* (not
the pixels) for the G completions of each prompt. With the vision tower frozen (the default) the features carry
no gradient and one encoding serves generation, the old-policy pass, the reference pass and the loss pass.
`generate` and `sequence_logprobs` also run each prompt through the language model once and let its G rows share
the key/value cache (`lightning_veripo.prefill`, the `shared_prefill` knob).

The reference policy costs no second copy under LoRA: it is the model with the adapter disabled.
`merge_and_reset()` folds the adapter into the weights and starts a fresh one, so the reference becomes the
current policy (what VerIPO does at every stage boundary). Full fine-tuning keeps a frozen copy instead.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_veripo.prefill import completion_hidden_states, prefill_prompts, shared_prefill_blocker

logger = logging.getLogger(__name__)

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
# (modality, pixel key, grid key, extra per-item keys) as Qwen-VL processors name them.
_MODALITIES = (
    ("video", "pixel_values_videos", "video_grid_thw", ("second_per_grid_ts",)),
    ("image", "pixel_values", "image_grid_thw", ()),
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


_LANGUAGE_MODEL = r"language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
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


_TRUE = {"1", "on", "yes", "true"}
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _hub_offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in _OFFLINE_VARIABLES)


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the hub cache holds this repo's config.json (what an offline load needs first)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # not a valid repo id, or no hub client: nothing cached under that name
        return False


def resolve_model_path(name_or_path: str) -> str:
    """A model location for `from_pretrained`: an existing local directory (`~` expanded) or a hub name.

    A missing local path raises FileNotFoundError at once instead of being sent to the hub as a repo id
    (where it fails only after network retries): when it is absolute, starts with `.` or `~`, has no `/` or
    more than one, or its first component is a local directory; and any missing location while the hub is
    offline (`HF_HUB_OFFLINE=1` / `TRANSFORMERS_OFFLINE=1`) unless the hub cache holds it. An `owner/name`
    that is not a local path goes to transformers, which resolves it on the hub.
    """
    text = str(name_or_path)
    local = Path(text).expanduser()
    if local.exists():
        return str(local)
    parts = text.split("/")
    looks_local = (
        local.is_absolute() or text.startswith((".", "~")) or len(parts) != 2 or Path(parts[0]).is_dir()
    )
    if looks_local or (_hub_offline() and not _in_hub_cache(text)):
        why = (
            "it does not exist"
            if looks_local
            else "it does not exist locally, and the hub is offline (HF_HUB_OFFLINE) with no cached copy"
        )
        raise FileNotFoundError(
            f"VideoLLM: model_name_or_path={text!r} is not a model directory: {why}. Build the offline tiny "
            "model there with `veripo make-tiny-model DIR`, or pass `make_tiny_if_missing=True` to build it "
            "on first load (demo only); a hub model is named `owner/name`."
        )
    return text


class Completions(NamedTuple):
    """G sampled completions per prompt, prompt-major: rows g*G .. g*G+G-1 belong to prompt g."""

    ids: torch.Tensor  # [N*G, T] token ids, padded after the end
    mask: torch.Tensor  # [N*G, T] 1 for completion tokens (the end-of-turn token included)
    text: list[str]  # N*G decoded completions (end-of-turn and padding removed)
    truncated: torch.Tensor  # [N*G] bool: reached max_new_tokens without an end-of-turn token


class VideoLLM(nn.Module):
    """A Video-LLM policy (+ its reference) loaded from a local directory or a hub name.

    Args:
        model_name_or_path: directory with `config.json` + weights + processor files, or a hub name
            (resolved by transformers on a machine that can reach the hub).
        dtype: "float32", "bfloat16" or "float16" for the weights.
        attn_implementation: transformers attention backend ("sdpa", "eager", "flash_attention_2"); None = default.
        gradient_checkpointing: recompute activations in the backward pass (turned off while generating).
        shared_prefill: with G > 1 completions per prompt, run each prompt through the language model once
            and let the G rows share its cache (`lightning_veripo.prefill`), instead of once per row: when
            sampling (the same logits and samples) and when scoring them (`sequence_logprobs`: the same
            log-probs and gradients). False forces the per-row passes; they also run, with the reason logged
            once, where sharing cannot work: sampling under `synced_gpus` (FSDP / DeepSpeed ZeRO-3), a loss
            pass under gradient checkpointing or with active dropout, a model whose cache cannot be repeated.
        freeze_vision: keep the vision tower frozen (lets one vision encoding serve every pass).
        lora: LoRA settings, or None for full fine-tuning of the language model.
        merge_adapters: adapter directories merged into the base weights at load, in order (earlier stages).
        adapter_path: an adapter directory to continue training (instead of a fresh adapter).
        make_tiny_if_missing: if `model_name_or_path` does not exist, build the offline tiny random model
            there (the embedded demo; never set this for a real checkpoint), of `tiny_size` (a preset of
            lightning_veripo.tiny.SIZES: "tiny", or "small", which learns to read the synthetic videos).
        reference_copy: under full fine-tuning, keep a frozen copy of the starting weights as the reference
            policy (GRPO's KL when beta > 0, DPO). Set False when nothing needs it (GRPO with beta = 0, DPO with
            precomputed reference log-probs) to save a whole copy of the weights. Ignored under LoRA, whose
            reference is the model with its adapter disabled.
        logprob_chunk_tokens: `sequence_logprobs` runs the LM head and the log-softmax over chunks of this many
            completion tokens (all rows together), in the forward and the backward pass, so a pass holds the
            full-vocabulary logits of one chunk, never of all rows x tokens (at Qwen2.5-VL's 151,936-token
            vocabulary, 256 tokens are 156 MB in float32; 16 rows x 1,024 tokens would be 10 GB). Padding
            tokens are skipped. None = one head call over every position, as `logits_to_keep` does.
    """

    def __init__(
        self,
        model_name_or_path: str,
        dtype: str = "float32",
        attn_implementation: str | None = "sdpa",
        gradient_checkpointing: bool = False,
        shared_prefill: bool = True,
        freeze_vision: bool = True,
        lora: LoRAConfig | None = None,
        merge_adapters: list[str] | None = None,
        adapter_path: str | None = None,
        make_tiny_if_missing: bool = False,
        reference_copy: bool = True,
        tiny_size: str = "tiny",
        logprob_chunk_tokens: int | None = 256,
    ) -> None:
        super().__init__()
        if dtype not in _DTYPES:
            raise ValueError(f"VideoLLM dtype={dtype!r} is not one of {sorted(_DTYPES)}")
        if logprob_chunk_tokens is not None and logprob_chunk_tokens < 1:
            raise ValueError(
                f"VideoLLM logprob_chunk_tokens={logprob_chunk_tokens} must be a positive number of tokens, "
                "or None for one unchunked LM-head call"
            )
        if adapter_path is not None and lora is None:
            raise ValueError(
                f"VideoLLM adapter_path={adapter_path!r} continues a LoRA adapter and needs `lora` settings; to "
                "fold a finished adapter into the weights for full fine-tuning, pass it in merge_adapters"
            )
        if lora is not None and lora.target_modules == MERGER_TARGETS and freeze_vision:
            raise ValueError(
                f"VideoLLM lora.target_modules={MERGER_TARGETS!r} puts LoRA on the vision merger, which is "
                "part of the vision tower: set freeze_vision=false, or the merger's adapter gets no gradient"
            )
        self.model_name_or_path = str(model_name_or_path)
        self.dtype_name = dtype
        self.attn_implementation = attn_implementation
        self.gradient_checkpointing = gradient_checkpointing
        self.shared_prefill = shared_prefill
        self._prefill_fallbacks: set[str] = set()  # reasons already logged for prefilling per row
        self.freeze_vision = freeze_vision
        self.lora = lora
        self.merge_adapters = list(merge_adapters or [])
        self.adapter_path = adapter_path
        self.make_tiny_if_missing = make_tiny_if_missing
        self.tiny_size = tiny_size
        self.reference_copy = reference_copy
        self.logprob_chunk_tokens = logprob_chunk_tokens
        self.model: nn.Module | None = None
        self.processor: Any = None
        self._reference: nn.Module | None = None  # frozen copy, full fine-tuning only
        self._policy: dict[str, Any] | None = None  # policy_identity(), computed once

    # ------------------------------------------------------------------ loading
    @property
    def is_loaded(self) -> bool:
        return self.model is not None

    def load(self) -> VideoLLM:
        """Load weights and processor (idempotent): merge earlier adapters, freeze, attach LoRA."""
        if self.model is not None:
            return self
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = self.model_name_or_path
        if self.make_tiny_if_missing and not (Path(path).expanduser() / "config.json").exists():
            from lightning_veripo.tiny import make_tiny_model

            make_tiny_model(Path(path).expanduser(), size=self.tiny_size)
        path = resolve_model_path(path)
        kwargs: dict[str, Any] = {"dtype": _DTYPES[self.dtype_name]}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        self.processor = AutoProcessor.from_pretrained(path)
        for adapter in self.merge_adapters:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.requires_grad_(True)
        if self.freeze_vision:
            self._vision_tower(model).requires_grad_(False)
        if self.lora is not None:
            model = self._attach_adapter(model, self.adapter_path)
        elif self.reference_copy:
            self._reference = copy.deepcopy(model).requires_grad_(False).eval()
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if self.lora is not None:
                model.enable_input_require_grads()
        self.model = model
        return self

    def _attach_adapter(self, model: nn.Module, adapter_path: str | None) -> nn.Module:
        from peft import LoraConfig, PeftModel, get_peft_model

        if adapter_path:
            return PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
        assert self.lora is not None
        spec = LoraConfig(
            r=self.lora.r,
            lora_alpha=self.lora.alpha,
            lora_dropout=self.lora.dropout,
            target_modules=self.lora.resolved_targets(),
            bias="none",
        )
        peft_model = get_peft_model(model, spec)
        if self.lora.target_modules == MERGER_TARGETS:
            merger = [n for n, _ in peft_model.named_modules() if re.search(_MERGER + r"\.lora_A$", n)]
            if not merger:
                raise ValueError(
                    f"LoRA target_modules={MERGER_TARGETS!r}: {type(model).__name__} has no vision merger "
                    f"layer this preset knows ({_MERGER}); give a regex that names its merger's layers"
                )
        return peft_model

    @staticmethod
    def _vision_tower(model: nn.Module) -> nn.Module:
        inner = getattr(model, "model", model)
        for name in ("visual", "vision_tower", "vision_model"):
            if hasattr(inner, name):
                return getattr(inner, name)
        raise AttributeError(f"{type(model).__name__} has no vision tower attribute (visual/vision_tower)")

    def _require(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError(
                "VideoLLM is not loaded: call .load() (LightningModules do it in configure_model)"
            )
        return self.model

    @property
    def hf_model(self) -> nn.Module:
        """The underlying transformers model (inside the peft wrapper under LoRA)."""
        model = self._require()
        return model.get_base_model() if self.lora is not None else model

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def token_ids(self, tokens: tuple[str, ...] | list[str]) -> list[int]:
        """Ids of the given tokens that exist in this tokenizer's vocabulary."""
        vocab = self.tokenizer.get_vocab()
        return [vocab[t] for t in tokens if t in vocab]

    @property
    def end_token_ids(self) -> list[int]:
        """Tokens that end a completion: end-of-turn and end-of-text."""
        return end_token_ids(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self._require().parameters() if p.requires_grad)

    # ------------------------------------------------------------------ reference policy and stage boundaries
    @contextlib.contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """Context in which the yielded module is the reference policy (adapter disabled, or the frozen copy)."""
        model = self._require()
        if self.lora is not None:
            with model.disable_adapter():
                yield model
        else:
            if self._reference is None:
                raise RuntimeError(
                    "no reference policy: full fine-tuning was loaded with reference_copy=False; set it True "
                    "for GRPO with beta > 0 or DPO without precomputed reference log-probs"
                )
            yield self._reference

    def merge_and_reset(self) -> None:
        """Fold the current adapter into the weights and start a fresh one (full FT: refresh the reference).

        The policy's outputs are unchanged; the reference becomes the current policy.
        """
        model = self._require()
        if self.lora is None:
            if self.reference_copy:
                self._reference = copy.deepcopy(model).requires_grad_(False).eval()
            return
        merged = model.merge_and_unload()
        self.model = self._attach_adapter(merged, None)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write the trained weights so `from_pretrained` reads them back: the adapter only under LoRA
        (peft format), else the whole model. The processor is saved beside them."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._require().save_pretrained(out)
        self.processor.save_pretrained(out)
        return out

    # ------------------------------------------------------------------ which policy a checkpoint belongs to
    def policy_identity(self) -> dict[str, Any]:
        """The policy that trainable weights saved from this backbone belong to: the base model and the
        adapters merged into it, in order. A checkpoint holds only the trainable weights (a stage's adapter),
        so it is this policy only when loaded on the same base with the same merges (`check_policy`).

        Each entry keeps the location as given, its absolute form, and a content hash: of `config.json` for
        the base model (its weights are too big to hash on every load), of the weights and LoRA settings
        for an adapter. Computed once per backbone."""
        if self._policy is None:
            self._policy = {
                "base_model": _base_model_identity(self.model_name_or_path),
                "merge_adapters": [_adapter_identity(path) for path in self.merge_adapters],
            }
        return self._policy

    # ------------------------------------------------------------------ vision
    def encode_vision(self, batch: dict[str, Any], requires_grad: bool | None = None) -> dict[str, Any]:
        """Run the vision tower once on a prompt batch; returns `mm_encoder_outputs` for the model's forward.

        Gradient flows into the features only if the vision tower is trainable (or `requires_grad=True`).
        """
        base = self.hf_model
        if requires_grad is None:
            requires_grad = not self.freeze_vision
        outputs: dict[str, Any] = {}
        with torch.set_grad_enabled(requires_grad and torch.is_grad_enabled()):
            for modality, pixel_key, grid_key, _ in _MODALITIES:
                if batch.get(pixel_key) is None:
                    continue
                fn = getattr(base, f"get_{modality}_features")
                outputs[modality] = fn(batch[pixel_key], batch[grid_key], return_dict=True)
        return outputs

    def vision_items_per_row(self, batch: dict[str, Any], modality: str) -> list[list[int]]:
        """Which vision items (videos or images, in batch order) each prompt row owns, matched by the count
        of placeholder tokens in the row against each item's token count."""
        grid_key = {"video": "video_grid_thw", "image": "image_grid_thw"}[modality]
        if batch.get(grid_key) is None:
            return [[] for _ in range(batch["input_ids"].shape[0])]
        merge = int(getattr(self._vision_tower(self.hf_model), "spatial_merge_size", 2)) ** 2
        item_tokens = (batch[grid_key].prod(-1) // merge).tolist()
        token_id = getattr(self.hf_model.config, f"{modality}_token_id")
        per_row: list[list[int]] = []
        item = 0
        for count in (batch["input_ids"] == token_id).sum(-1).tolist():
            mine: list[int] = []
            while count > 0:
                if item >= len(item_tokens):
                    raise ValueError(
                        f"more {modality} placeholder tokens in the prompts than {modality} inputs"
                    )
                count -= item_tokens[item]
                mine.append(item)
                item += 1
            if count != 0:
                raise ValueError(f"{modality} placeholder tokens do not line up with the {modality} inputs")
            per_row.append(mine)
        return per_row

    def _expand_prompt_inputs(
        self, batch: dict[str, Any], num_samples: int, vision: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Repeat a prompt batch G times (prompt-major). Vision features are repeated, never re-encoded,
        when `vision` is given; otherwise the pixels are repeated (the straightforward path)."""
        ids = batch["input_ids"]
        out: dict[str, Any] = {
            "input_ids": ids.repeat_interleave(num_samples, 0),
            "attention_mask": batch["attention_mask"].repeat_interleave(num_samples, 0),
        }
        if batch.get("mm_token_type_ids") is not None:
            out["mm_token_type_ids"] = batch["mm_token_type_ids"].repeat_interleave(num_samples, 0)
        mm: dict[str, Any] = {}
        for modality, pixel_key, grid_key, extra_keys in _MODALITIES:
            if batch.get(grid_key) is None:
                continue
            grid = batch[grid_key]
            sizes = grid.prod(-1).tolist()
            rows = self.vision_items_per_row(batch, modality)
            order = [i for items in rows for _ in range(num_samples) for i in items]
            index = torch.tensor(order, dtype=torch.long, device=grid.device)
            out[grid_key] = grid.index_select(0, index)
            for key in extra_keys:
                if batch.get(key) is not None:
                    value = torch.as_tensor(batch[key], device=grid.device)
                    out[key] = value.index_select(0, index)
            if vision is not None and modality in vision:
                mm[modality] = select_vision_items(vision[modality], order)
            else:
                chunks = torch.split(batch[pixel_key], sizes)
                out[pixel_key] = torch.cat([chunks[i] for i in order])
        if mm:
            out["mm_encoder_outputs"] = mm
        return out

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        batch: dict[str, Any],
        num_samples: int = 1,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        do_sample: bool = True,
        repetition_penalty: float = 1.0,
        vision: dict[str, Any] | None = None,
        synced_gpus: bool = False,
    ) -> Completions:
        """Sample `num_samples` completions per prompt of a left-padded processor batch.

        Vision placeholders and chat-control tokens are suppressed. Pass `vision=encode_vision(batch)` to reuse
        features already computed for this batch. With `shared_prefill` each prompt runs through the language
        model once for its `num_samples` rows (`lightning_veripo.prefill`).
        """
        model = self._require()
        if vision is None:
            vision = self.encode_vision(batch, requires_grad=False)
        shared = self._uses_shared_prefill(batch, num_samples, synced_gpus)
        prompt_len = batch["input_ids"].shape[1]
        was_training = model.training
        checkpointing = _activation_checkpointing(self.hf_model)
        if checkpointing:
            self.hf_model.gradient_checkpointing_disable()
        model.eval()
        try:
            if shared:
                prompts = self._expand_prompt_inputs(batch, 1, vision)
                inputs = prefill_prompts(self.hf_model, prompts, num_samples)
            else:
                inputs = self._expand_prompt_inputs(batch, num_samples, vision)
            sampling: dict[str, Any] = {"do_sample": do_sample}
            if do_sample:
                sampling.update(temperature=temperature, top_p=top_p, top_k=top_k)
            else:
                sampling.update(temperature=None, top_p=None, top_k=None)
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                suppress_tokens=self.token_ids(FORBIDDEN_GENERATION_TOKENS),
                eos_token_id=self.end_token_ids,
                pad_token_id=self.pad_token_id,
                repetition_penalty=repetition_penalty,
                synced_gpus=synced_gpus,
                **sampling,
            )
        finally:
            if checkpointing:
                self.hf_model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
            model.train(was_training)
        return self.completions_from_ids(out[:, prompt_len:], max_new_tokens)

    def _uses_shared_prefill(self, batch: dict[str, Any], num_samples: int, synced_gpus: bool) -> bool:
        """Whether `generate` prefills each prompt once; logs each reason it cannot, once."""
        if not self.shared_prefill or num_samples < 2:
            return False  # asked for per-row, or nothing to share
        reason = shared_prefill_blocker(self.hf_model, batch["input_ids"].shape[1], synced_gpus)
        if reason is not None and reason not in self._prefill_fallbacks:
            self._prefill_fallbacks.add(reason)
            logger.warning("VideoLLM: one prefill per rollout row instead of one per prompt: %s", reason)
        return reason is None

    def completions_from_ids(self, ids: torch.Tensor, max_new_tokens: int | None = None) -> Completions:
        """Mask and decode raw generated ids: a completion ends at (and includes) its first end token."""
        if ids.shape[1] == 0:
            ids = ids.new_full((ids.shape[0], 1), self.pad_token_id)
        is_end = torch.isin(ids, torch.tensor(self.end_token_ids, device=ids.device))
        has_end = is_end.any(-1)
        first_end = torch.where(has_end, is_end.int().argmax(-1), ids.shape[1])
        positions = torch.arange(ids.shape[1], device=ids.device)
        mask = (positions[None, :] <= first_end[:, None]).long() & (positions[None, :] < ids.shape[1])
        mask = torch.where(has_end[:, None], mask, (positions[None, :] < ids.shape[1]).long())
        ids = ids.masked_fill(mask == 0, self.pad_token_id)
        text = [
            self.tokenizer.decode(row[: int(n)].tolist(), skip_special_tokens=False)
            for row, n in zip(ids, torch.where(has_end, first_end, ids.shape[1]), strict=True)
        ]
        limit = max_new_tokens if max_new_tokens is not None else ids.shape[1]
        truncated = ~has_end & (mask.sum(-1) >= limit)
        return Completions(ids=ids, mask=mask, text=text, truncated=truncated)

    def tokenize_completions(self, texts: list[str], add_end: bool = True) -> Completions:
        """Token ids of given completion texts (e.g. preference pairs), right-padded, end-of-turn appended
        (the module-level `tokenize_completions` with this backbone's tokenizer)."""
        return tokenize_completions(self.tokenizer, texts, add_end)

    # ------------------------------------------------------------------ scoring
    def sequence_logprobs(
        self,
        batch: dict[str, Any],
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        num_samples: int = 1,
        reference: bool = False,
        vision: dict[str, Any] | None = None,
        share_vision: bool = True,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Per-token log-probs [N*G, T] (float32, 0 where masked) of completions given prompt + vision.

        `batch` holds N prompts (left-padded); rows g*G..g*G+G-1 of the completions belong to prompt g.
        `reference=True` scores with the reference policy, without gradient. With `share_vision` the vision
        tower runs at most once per prompt (`vision` reuses features from `encode_vision`); without it the
        pixels are repeated per completion and re-encoded, as peers do. With `shared_prefill` (and
        `share_vision`) each prompt runs through the decoder once for its G rows (`_shared_prompt_logprobs`).
        """
        model = self._require()
        if share_vision and vision is None:
            vision = self.encode_vision(batch)
        if share_vision and self._scores_prompt_once(batch, num_samples, reference):
            args = (completion_ids, completion_mask, num_samples, reference, vision, temperature)
            return self._shared_prompt_logprobs(batch, *args)
        inputs = self._expand_prompt_inputs(batch, num_samples, vision if share_vision else None)
        n_rows = inputs["input_ids"].shape[0]
        if completion_ids.shape[0] != n_rows:
            raise ValueError(
                f"{completion_ids.shape[0]} completions for {batch['input_ids'].shape[0]} prompts x {num_samples} samples"
            )
        T = completion_ids.shape[1]
        completion_ids = completion_ids.to(inputs["input_ids"].device)
        completion_mask = completion_mask.to(inputs["attention_mask"].device)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], completion_ids], 1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], completion_mask.long()], 1)
        if "mm_token_type_ids" in inputs:
            pad = inputs["mm_token_type_ids"].new_zeros(completion_ids.shape)
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], pad], 1)
        ctx = torch.no_grad() if reference else contextlib.nullcontext()
        with ctx, self.reference() if reference else contextlib.nullcontext(model) as scorer:
            if self.logprob_chunk_tokens is None:
                logits = scorer(**inputs, use_cache=False, logits_to_keep=T + 1).logits[:, :-1]
                return selective_log_softmax(logits.float() / temperature, completion_ids) * completion_mask
            body, head = _body_and_head(scorer)
            hidden = body(**inputs, use_cache=False)[0][:, -(T + 1) : -1]  # [N*G, T, H]: predicts each token
            return chunked_logprobs(
                hidden, head, completion_ids, completion_mask, temperature, self.logprob_chunk_tokens
            )

    def _scores_prompt_once(self, batch: dict[str, Any], num_samples: int, reference: bool = False) -> bool:
        """Whether `sequence_logprobs` can run each prompt once for its rows and give the per-row values.

        Not where transformers drops the cache (activation checkpointing, with gradient), nor where training-mode
        dropout would draw one mask per row in the per-row pass (a shared prompt draws one per prompt).
        """
        if not self.shared_prefill or num_samples < 2 or self.logprob_chunk_tokens is None:
            return False
        model = self._require()
        prompt_tokens = batch["input_ids"].shape[1] + 1  # scoring caches the whole prompt: any length will do
        reason = shared_prefill_blocker(self.hf_model, prompt_tokens, synced_gpus=False)
        if reason is None and model.training:
            if torch.is_grad_enabled() and not reference and _activation_checkpointing(self.hf_model):
                reason = "gradient checkpointing drops the cache that shares the prompt (loss pass only)"
            elif _active_dropout(model):
                reason = "dropout is active in training mode: the per-row pass draws one mask per row"
        if reason is not None and reason not in self._prefill_fallbacks:
            self._prefill_fallbacks.add(reason)
            logger.warning("VideoLLM: scoring each completion row with its own prompt pass: %s", reason)
        return reason is None

    def _shared_prompt_logprobs(
        self,
        batch: dict[str, Any],
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        num_samples: int,
        reference: bool,
        vision: dict[str, Any],
        temperature: float,
    ) -> torch.Tensor:
        """`sequence_logprobs` with each prompt through the decoder once (`prefill.completion_hidden_states`)."""
        prompts = self._expand_prompt_inputs(batch, 1, vision)
        n_rows = prompts["input_ids"].shape[0] * num_samples
        if completion_ids.shape[0] != n_rows:
            raise ValueError(
                f"{completion_ids.shape[0]} completions for {batch['input_ids'].shape[0]} prompts x {num_samples} samples"
            )
        completion_ids = completion_ids.to(prompts["input_ids"].device)
        completion_mask = completion_mask.to(prompts["attention_mask"].device)
        ctx = torch.no_grad() if reference else contextlib.nullcontext()
        with ctx, self.reference() if reference else contextlib.nullcontext(self._require()) as scorer:
            body, head = _body_and_head(scorer)
            hidden = completion_hidden_states(body, prompts, completion_ids, completion_mask, num_samples)
            return chunked_logprobs(
                hidden, head, completion_ids, completion_mask, temperature, self.logprob_chunk_tokens
            )


class PolicyMismatchError(ValueError):
    """A checkpoint's trainable weights were trained on another base model or other merged adapters."""


def _active_dropout(model: nn.Module) -> bool:
    """Whether a forward of `model` in training mode drops anything: a dropout module (LoRA's) or the
    attention dropout of its config."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    if float(getattr(text, "attention_dropout", 0.0) or 0.0) > 0:
        return True
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def _activation_checkpointing(model: nn.Module) -> bool:
    """Whether gradient (activation) checkpointing is on: `is_activation_checkpointing` where transformers has
    it, else `is_gradient_checkpointing` (a deprecated alias that warns in the versions that have both)."""
    on = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if on is None else on)


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


_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_LORA_SETTINGS = (
    "r",
    "lora_alpha",
    "use_rslora",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
)


def _absolute(location: str) -> str:
    """An existing local path made absolute; anything else (a hub name) as it is."""
    path = Path(location).expanduser()
    return str(path.resolve()) if path.exists() else location


def _base_model_identity(location: str) -> dict[str, Any]:
    config = Path(location).expanduser() / "config.json"
    digest = hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None
    return {"path": location, "resolved": _absolute(location), "config_sha256": digest}


def _adapter_identity(location: str) -> dict[str, Any]:
    folder = Path(location).expanduser()
    digest = hashlib.sha256()
    weights = [folder / name for name in _ADAPTER_WEIGHTS if (folder / name).is_file()]
    for path in weights:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    config = folder / "adapter_config.json"
    if config.is_file():
        settings = json.loads(config.read_text())
        digest.update(json.dumps({k: settings.get(k) for k in _LORA_SETTINGS}, sort_keys=True).encode())
    sha256 = digest.hexdigest() if weights else None
    return {"path": location, "resolved": _absolute(location), "sha256": sha256}


def _describe(policy: dict[str, Any]) -> str:
    adapters = [a["resolved"] for a in policy["merge_adapters"]]
    return f"base {policy['base_model']['resolved']} + merged adapters {json.dumps(adapters)}"


def check_policy(saved: dict[str, Any], built: dict[str, Any]) -> None:
    """Raise `PolicyMismatchError` unless a checkpoint's policy (`saved`, from `policy_identity()` when it was
    written) is the one this backbone `built`: the same base model (by config.json, else by name) and the
    same merged adapters (by content) in the same order. The message names the settings that rebuild it."""
    fixes = []
    base_saved, base_built = saved["base_model"], built["base_model"]
    if base_saved.get("config_sha256") and base_built.get("config_sha256"):
        same_base = base_saved["config_sha256"] == base_built["config_sha256"]
    else:
        same_base = base_saved["resolved"] == base_built["resolved"]
    if not same_base:
        fixes.append(f"--model.init_args.backbone.init_args.model_name_or_path={base_saved['resolved']}")
    merged_saved, merged_built = saved["merge_adapters"], built["merge_adapters"]
    if [a["sha256"] for a in merged_saved] != [a["sha256"] for a in merged_built]:
        adapters = json.dumps([a["resolved"] for a in merged_saved])
        fixes.append(f"'--model.init_args.backbone.init_args.merge_adapters={adapters}'")
    if fixes:
        raise PolicyMismatchError(
            "the checkpoint's weights were trained on another policy than the one built here (its metrics "
            f"would describe neither):\n  checkpoint: {_describe(saved)}\n  built here: {_describe(built)}\n"
            "Build the checkpoint's policy with (adapters merge in this order): " + " ".join(fixes)
        )


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


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., index] without materialising the whole log-softmax: [B, T, V] -> [B, T]."""
    picked = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
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
