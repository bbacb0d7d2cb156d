"""DPOModule: VerIPO's "pair fast align" stage — direct preference optimisation on the verifier's pairs.

One training step reads as the algorithm (DPO, arXiv 2305.18290, with the variants of `losses.dpo_loss`):

    vision    = encode each pair's video once                          (vision tower frozen by default)
    logp      = policy log-probs of [chosen_0, rejected_0, chosen_1, ...] in ONE forward pass   [2B, T]
    ref_logp  = the same with the adapter disabled (or read from the precomputed cache)         [2B, T]
    loss      = sum_k w_k dpo_loss_k(logp, ref_logp) + sft_weight * NLL(chosen)                  mean over B

Both completions of a pair share one prompt and one video, so the rows repeat the visual *features*, never the
pixels. IPO scores per-token mean log-probs (as its authors define it); every other type scores sums.

With `precompute_ref_logps` the reference log-probs of every train pair are computed once, before the first
training batch, and cached beside the pairs file (`<pairs>.ref_logps.pt`) keyed by each pair's content hash, so
later epochs and later runs read them back. TRL refuses this for vision data; here the pair's frames are fixed
by the rollout's recorded frame indices, so the cached value is the value a step would compute. The cache is
valid for one reference (model path, merged adapters, dtype) and one frame sampling; any change recomputes it.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from lightning_veripo import losses
from lightning_veripo.backbone import VideoLLM
from lightning_veripo.completions import Completions
from lightning_veripo.data.preference import PreferenceDataset
from lightning_veripo.module import VideoLLMModule

REF_CACHE_SUFFIX = ".ref_logps.pt"


class PairLogps(NamedTuple):
    """Sequence log-probs of each pair's two completions under one policy."""

    chosen: torch.Tensor  # [B] sum over the completion's tokens
    rejected: torch.Tensor  # [B]
    chosen_mean: torch.Tensor  # [B] mean over the completion's tokens (IPO)
    rejected_mean: torch.Tensor  # [B]

    def stacked(self) -> torch.Tensor:
        return torch.stack(list(self), dim=-1)  # [B, 4]

    @classmethod
    def from_stacked(cls, values: torch.Tensor) -> PairLogps:
        return cls(*values.unbind(-1))

    def pick(self, mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.chosen_mean, self.rejected_mean) if mean else (self.chosen, self.rejected)


class DPOOutput(NamedTuple):
    """What one DPO step computed, all detached except `loss`."""

    loss: torch.Tensor  # scalar
    losses: torch.Tensor  # [B] per-pair loss
    chosen_rewards: torch.Tensor  # [B] beta * (logp_c - ref_c), of the first loss type's log-probs
    rejected_rewards: torch.Tensor  # [B]
    policy: PairLogps
    reference: PairLogps


def ref_cache_path(pairs_path: str | Path) -> Path:
    """Where the reference log-probs of a pairs file are cached: beside it."""
    return Path(str(pairs_path) + REF_CACHE_SUFFIX)


def pair_completions(
    chosen: Completions, rejected: Completions, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected completions as one prompt-major batch [chosen_0, rejected_0, chosen_1, ...]: [2B, T]."""
    T = max(chosen.ids.shape[1], rejected.ids.shape[1])

    def pad(x: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(x, (0, T - x.shape[1]), value=value)

    ids = torch.stack([pad(chosen.ids, pad_id), pad(rejected.ids, pad_id)], dim=1).flatten(0, 1)  # [2B, T]
    mask = torch.stack([pad(chosen.mask, 0), pad(rejected.mask, 0)], dim=1).flatten(0, 1)  # [2B, T]
    return ids, mask


class DPOModule(VideoLLMModule):
    """Direct Preference Optimisation of a Video-LLM on chosen/rejected completion pairs.

    Args:
        backbone: the shared Video-LLM (its reference is the adapter-disabled model, or a frozen copy).
        beta: strength of the implicit KL to the reference (the paper's table: 0.1).
        loss_type: a `losses.DPO_LOSS_TYPES` name, or a list of them mixed by `loss_weights` (e.g. MPO's
            ["sigmoid", "bco_pair"] with [0.8, 0.2] and sft_weight=1.0). "ipo" uses per-token mean log-probs.
        loss_weights: one weight per loss type (default 1 each).
        label_smoothing: cDPO / robust / EXO smoothing, passed to every loss type.
        sft_weight: weight of the token-mean NLL of the chosen completions (RPO / MPO's generation loss).
        lr / weight_decay / warmup_steps: AdamW over the trainable weights, linear warmup (the paper: lr 5e-7).
        precompute_ref_logps: compute the reference log-probs of the train pairs once and cache them beside
            the pairs file (reused across epochs and runs) instead of one reference pass per step.
        share_vision: encode each video once per pair (False re-encodes it for each completion, as peers do).
    """

    def __init__(
        self,
        backbone: VideoLLM,
        beta: float = 0.1,
        loss_type: str | list[str] = "sigmoid",
        loss_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
        lr: float = 5e-7,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        precompute_ref_logps: bool = False,
        share_vision: bool = True,
    ) -> None:
        super().__init__(backbone, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps)
        self.loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        self.loss_weights = list(loss_weights) if loss_weights is not None else [1.0] * len(self.loss_types)
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.sft_weight = sft_weight
        self.precompute_ref_logps = precompute_ref_logps
        self.share_vision = share_vision
        self._validate_args()
        self.save_hyperparameters(ignore=["backbone"])
        self.ref_cache: dict[str, torch.Tensor] | None = None  # pair key -> [4] (see PairLogps)
        self.ref_logps_computed = 0  # pairs whose reference log-probs this module computed for the cache
        self._ref_cache_path: Path | None = None
        self._step_start = 0.0

    def _validate_args(self) -> None:
        problems = []
        if not self.loss_types:
            problems.append("loss_type is an empty list; name at least one DPO loss type")
        if len(self.loss_weights) != len(self.loss_types):
            problems.append(
                f"loss_weights={self.loss_weights} needs one weight per loss_type={self.loss_types}"
            )
        if self.sft_weight < 0:
            problems.append(f"sft_weight must be >= 0, got {self.sft_weight}")
        zero = torch.zeros(1)
        for loss_type in self.loss_types:
            try:  # dpo_loss checks the type, beta and label_smoothing for that type
                losses.dpo_loss(zero, zero, zero, zero, beta=self.beta, loss_type=loss_type,
                                label_smoothing=self.label_smoothing)  # fmt: skip
            except ValueError as e:
                problems.append(f"loss_type={loss_type!r}: {e}")
        if problems:
            raise ValueError("DPOModule: " + "; ".join(dict.fromkeys(problems)))

    # ------------------------------------------------------------------ the algorithm
    def dpo_step(self, batch: dict[str, Any]) -> DPOOutput:
        """Policy and reference log-probs of a pair batch -> the DPO loss and what to log."""
        vision = self.backbone.encode_vision(batch) if self.share_vision else None
        ids, mask = pair_completions(batch["chosen"], batch["rejected"], self.backbone.pad_token_id)
        policy = self._pair_logps(batch, ids, mask, vision, reference=False)
        reference = self._reference_logps(batch, ids, mask, vision)
        chosen_lengths = batch["chosen"].mask.sum(-1)  # [B]
        total = torch.zeros_like(policy.chosen)  # [B]
        rewards = None
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            mean = loss_type == "ipo"
            pair_losses, chosen_rewards, rejected_rewards = losses.dpo_loss(
                *policy.pick(mean), *reference.pick(mean),
                beta=self.beta, loss_type=loss_type, label_smoothing=self.label_smoothing,
            )  # fmt: skip
            total = total + weight * pair_losses
            if rewards is None:  # the first loss type's log-probs define the logged rewards
                rewards = (chosen_rewards, rejected_rewards)
        if self.sft_weight:
            tokens_per_pair = None
            if self._trainer is not None and self.trainer.world_size > 1:  # the global batch's token count
                tokens_per_pair = self.all_gather(chosen_lengths).float().mean()
            total = total + self.sft_weight * losses.dpo_sft_loss(
                policy.chosen, chosen_lengths, tokens_per_pair
            )
        assert rewards is not None
        detached = PairLogps(*(t.detach() for t in policy))
        return DPOOutput(total.mean(), total.detach(), *rewards, detached, reference)

    def _pair_logps(
        self,
        batch: dict[str, Any],
        ids: torch.Tensor,
        mask: torch.Tensor,
        vision: dict[str, Any] | None,
        reference: bool,
    ) -> PairLogps:
        per_token = self.backbone.sequence_logprobs(
            batch,
            ids,
            mask,
            num_samples=2,
            reference=reference,
            vision=vision,
            share_vision=vision is not None,
        )  # [2B, T]
        mask = mask.to(per_token.device)
        sums = losses.sequence_logps(per_token, mask).view(-1, 2)  # [B, 2]
        means = losses.sequence_logps(per_token, mask, average=True).view(-1, 2)  # [B, 2]
        return PairLogps(sums[:, 0], sums[:, 1], means[:, 0], means[:, 1])

    def _reference_logps(
        self, batch: dict[str, Any], ids: torch.Tensor, mask: torch.Tensor, vision: dict[str, Any] | None
    ) -> PairLogps:
        """The reference's log-probs of the pairs: from the precomputed cache, or one no-grad forward pass."""
        cache = self.ref_cache
        keys = batch.get("pair_keys")
        if cache is not None and keys is not None and all(k in cache for k in keys):
            return PairLogps.from_stacked(torch.stack([cache[k] for k in keys]).to(ids.device))
        return self._pair_logps(batch, ids, mask, self._reference_vision(vision), reference=True)

    def _reference_vision(self, vision: dict[str, Any] | None) -> dict[str, Any] | None:
        """The policy's features serve the reference only if the vision tower is frozen (no adapter there
        either); otherwise the reference re-encodes the pixels with its own tower."""
        tower = VideoLLM._vision_tower(self.backbone.hf_model)
        return None if any(p.requires_grad for p in tower.parameters()) else vision

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.dpo_step(batch)
        self._log_pairs("train", out)
        self.log("loss", out.loss.detach(), prog_bar=True, logger=False, batch_size=len(out.losses))
        self.log("acc", self._accuracy(out), prog_bar=True, logger=False, batch_size=len(out.losses))
        return out.loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._log_pairs("val", self.dpo_step(batch))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.log("train/step_time_s", time.perf_counter() - self._step_start, batch_size=1)

    def on_train_epoch_start(self) -> None:
        if self.precompute_ref_logps:
            self.precompute_reference(self.trainer.train_dataloader)

    @staticmethod
    def _accuracy(out: DPOOutput) -> torch.Tensor:
        return (out.chosen_rewards > out.rejected_rewards).float().mean()

    def _log_pairs(self, stage: str, out: DPOOutput) -> None:
        primary_mean = self.loss_types[0] == "ipo"
        logps_chosen, logps_rejected = out.policy.pick(primary_mean)
        metrics = {
            "loss": out.loss.detach(),
            "rewards/chosen": out.chosen_rewards.mean(),
            "rewards/rejected": out.rejected_rewards.mean(),
            "rewards/accuracy": self._accuracy(out),
            "rewards/margin": (out.chosen_rewards - out.rejected_rewards).mean(),
            "logps/chosen": logps_chosen.mean(),
            "logps/rejected": logps_rejected.mean(),
        }
        self.log_dict(
            {f"{stage}/{k}": v.float() for k, v in metrics.items()},
            batch_size=len(out.losses),
            sync_dist=stage != "train",
        )

    # ------------------------------------------------------------------ precomputed reference log-probs
    def reference_identity(self, dataset: PreferenceDataset) -> dict[str, Any]:
        """What the cached values depend on besides the pairs themselves."""
        bb = self.backbone
        return {
            "model_name_or_path": bb.model_name_or_path,
            "merge_adapters": list(bb.merge_adapters),
            "dtype": bb.dtype_name,
            "full_finetune": bb.lora is None,
            "sampling": dataclasses.asdict(dataset.sampling),
        }

    @torch.no_grad()
    def precompute_reference(self, loader: DataLoader) -> None:
        """Fill `ref_cache` for every pair of the loader's PreferenceDataset, reading and writing the cache file.

        Only pairs missing from the file are computed, each rank a share of them; rank zero writes the file.
        """
        dataset = loader.dataset
        if not isinstance(dataset, PreferenceDataset):
            raise TypeError(
                f"precompute_ref_logps needs a PreferenceDataset train set, got {type(dataset).__name__}; "
                "use PreferenceDataModule or set precompute_ref_logps=False"
            )
        path = ref_cache_path(dataset.path)
        identity = self.reference_identity(dataset)
        if self.ref_cache is None or self._ref_cache_path != path:
            self.ref_cache, self._ref_cache_path = load_ref_cache(path, identity), path
        todo = [i for i, key in enumerate(dataset.keys) if key not in self.ref_cache]
        if not todo:
            return
        world, rank = self.trainer.world_size, self.trainer.global_rank
        mine = todo[rank::world]
        mine += todo[
            : -(-len(todo) // world) - len(mine)
        ]  # equal shards: sharded models need every rank to step
        shard = DataLoader(
            Subset(dataset, mine),
            batch_size=loader.batch_size or 1,
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
        )
        computed: dict[str, torch.Tensor] = {}
        for batch in shard:
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            vision = self.backbone.encode_vision(batch, requires_grad=False) if self.share_vision else None
            ids, mask = pair_completions(batch["chosen"], batch["rejected"], self.backbone.pad_token_id)
            values = (
                self._pair_logps(batch, ids, mask, self._reference_vision(vision), reference=True)
                .stacked()
                .float()
                .cpu()
            )
            computed.update(zip(batch["pair_keys"], values, strict=True))
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
            torch.distributed.all_gather_object(parts, computed)
            computed = {k: v for part in parts for k, v in part.items()}
        self.ref_cache.update(computed)
        self.ref_logps_computed += len(computed)  # distinct pairs, whatever the padding of the shards
        if self.trainer.is_global_zero:
            save_ref_cache(path, identity, {k: self.ref_cache[k] for k in dataset.keys})
        self.trainer.strategy.barrier("dpo_ref_cache")


def load_ref_cache(path: Path, identity: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The cached reference log-probs at `path` (pair key -> [4]), or {} if absent, unreadable or stale."""
    if not path.is_file():
        return {}
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        keys, values = saved["keys"], saved["logps"]
        stored_identity = saved["identity"]
    except Exception as e:  # a truncated or foreign file: recompute rather than fail the run
        warnings.warn(f"{path}: unreadable reference log-prob cache ({type(e).__name__}: {e}); recomputing",
                      stacklevel=2)  # fmt: skip
        return {}
    if stored_identity != identity:
        changed = sorted(
            k for k in {*identity, *stored_identity} if identity.get(k) != stored_identity.get(k)
        )
        warnings.warn(f"{path}: cached reference log-probs were computed for a different {changed}; recomputing",
                      stacklevel=2)  # fmt: skip
        return {}
    return dict(zip(keys, values.unbind(0), strict=True))


def save_ref_cache(path: Path, identity: dict[str, Any], cache: dict[str, torch.Tensor]) -> None:
    """Write the cache atomically (a killed run never leaves half a file)."""
    keys = list(cache)
    values = torch.stack([cache[k] for k in keys]) if keys else torch.zeros(0, len(PairLogps._fields))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"identity": identity, "keys": keys, "logps": values}, tmp)
    os.replace(tmp, path)
