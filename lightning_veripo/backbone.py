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
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_veripo.batching import MODALITIES, expand_prompts, vision_items_per_row
from lightning_veripo.completions import (
    FORBIDDEN_GENERATION_TOKENS,
    Completions,
    completions_from_ids,
    end_token_ids,
    pad_token_id,
    tokenize_completions,
)
from lightning_veripo.lora import MERGER_TARGETS, LoRAConfig, attach_lora
from lightning_veripo.model_path import resolve_model_path
from lightning_veripo.policy import policy_identity
from lightning_veripo.prefill import (
    activation_checkpointing,
    active_dropout,
    prefill_prompts,
    shared_prefill_blocker,
)
from lightning_veripo.scoring import rowwise_logprobs, shared_prompt_logprobs
from lightning_veripo.sharding import is_sharded, save_pretrained_from_full_tensors
from lightning_veripo.tiny import make_tiny_model

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        assert self.lora is not None
        return attach_lora(model, self.lora, adapter_path)

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
        (peft format), else the whole model. The processor is saved beside them. Sharded (FSDP2): gathered to
        full tensors and written once, by rank 0; every rank must call it."""
        out = Path(out_dir)
        if is_sharded(self._require()):
            return save_pretrained_from_full_tensors(self._require(), self.processor, out)
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
            self._policy = policy_identity(self.model_name_or_path, self.merge_adapters)
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
            for modality, pixel_key, grid_key, _ in MODALITIES:
                if batch.get(pixel_key) is None:
                    continue
                fn = getattr(base, f"get_{modality}_features")
                outputs[modality] = fn(batch[pixel_key], batch[grid_key], return_dict=True)
        return outputs

    def vision_items(self, batch: dict[str, Any]) -> dict[str, list[list[int]]]:
        """Which vision items (videos, images, in batch order) each prompt row of `batch` owns, per modality."""
        return {modality: self.vision_items_per_row(batch, modality) for modality, *_ in MODALITIES}

    def vision_items_per_row(self, batch: dict[str, Any], modality: str) -> list[list[int]]:
        """Which `modality` items each prompt row owns (`batching.vision_items_per_row` for this model)."""
        merge = int(getattr(self._vision_tower(self.hf_model), "spatial_merge_size", 2))
        token_id = getattr(self.hf_model.config, f"{modality}_token_id")
        return vision_items_per_row(batch, modality, token_id, merge)

    def _expand_prompt_inputs(
        self, batch: dict[str, Any], num_samples: int, vision: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Repeat a prompt batch G times (prompt-major), vision features repeated when given (`expand_prompts`)."""
        return expand_prompts(batch, num_samples, self.vision_items(batch), vision)

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
        checkpointing = activation_checkpointing(self.hf_model)
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
        return completions_from_ids(self.tokenizer, ids, max_new_tokens)

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
        `share_vision`) each prompt runs through the decoder once for its G rows (`scoring.shared_prompt_logprobs`).
        """
        model = self._require()
        if share_vision and vision is None:
            vision = self.encode_vision(batch)
        shared = share_vision and self._scores_prompt_once(batch, num_samples, reference)
        inputs = self._expand_prompt_inputs(
            batch, 1 if shared else num_samples, vision if share_vision else None
        )
        n_prompts = batch["input_ids"].shape[0]
        if completion_ids.shape[0] != n_prompts * num_samples:
            raise ValueError(
                f"{completion_ids.shape[0]} completions for {n_prompts} prompts x {num_samples} samples"
            )
        ctx = torch.no_grad() if reference else contextlib.nullcontext()
        with ctx, self.reference() if reference else contextlib.nullcontext(model) as scorer:
            args = (completion_ids, completion_mask)
            if shared:
                assert self.logprob_chunk_tokens is not None  # _scores_prompt_once requires it
                return shared_prompt_logprobs(
                    scorer, inputs, *args, num_samples, temperature, self.logprob_chunk_tokens
                )
            return rowwise_logprobs(scorer, inputs, *args, temperature, self.logprob_chunk_tokens)

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
            if torch.is_grad_enabled() and not reference and activation_checkpointing(self.hf_model):
                reason = "gradient checkpointing drops the cache that shares the prompt (loss pass only)"
            elif active_dropout(model):
                reason = "dropout is active in training mode: the per-row pass draws one mask per row"
        if reason is not None and reason not in self._prefill_fallbacks:
            self._prefill_fallbacks.add(reason)
            logger.warning("VideoLLM: scoring each completion row with its own prompt pass: %s", reason)
        return reason is None
