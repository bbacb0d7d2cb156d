"""GRPOModule: VerIPO's "group slow search" stage — group-relative policy optimisation on video.

One training step reads as the algorithm (DeepSeekMath's GRPO with the DAPO / Dr. GRPO / GSPO / Video-R1
options):

    vision   = encode the prompts' videos once                        (vision tower frozen by default)
    rollouts = sample G completions per prompt                         [N*G, T]
    rewards  = weighted reward functions (+ T-GRPO, length, overlong)  [N*G]
    A        = group-relative advantages; zero-std groups are dropped  [N*G]
    for mu inner passes: loss = grpo_loss(logp, old_logp, ref_logp, A) ; optimiser step

What is shared within a group: the vision tower runs once per prompt; the same features serve generation, the
old-policy pass, the reference pass and every loss pass (the G rows repeat the features, not the pixels). The
prompt's language-model pass is shared too (`VideoLLM(shared_prefill=True)`: once per prompt, its cache repeated
to the G rows) in generation and in the scoring passes; a loss pass under gradient checkpointing runs each row
whole. With
`freeze_vision=False` the features are recomputed with gradient once per loss pass, still once per prompt.

`training_step` returns `{"loss", "rollouts"}`: `rollouts` is the list of `Rollout` records of this step,
which `VerifierCallback` collects through `on_train_batch_end`.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from lightning_veripo import losses
from lightning_veripo.backbone import VideoLLM
from lightning_veripo.batching import select_prompts
from lightning_veripo.completions import Completions
from lightning_veripo.evaluate import EvalSettings
from lightning_veripo.metrics import ReasoningMetrics, update_reasoning_metrics  # the latter was here once
from lightning_veripo.module import VideoLLMModule
from lightning_veripo.records import Rollout, VideoQARecord
from lightning_veripo.rewards import RewardSet
from lightning_veripo.rollout import (
    HFRollouts,
    RolloutEngine,
    Sampled,
    Sampling,
    Scores,
    StopEngineOnException,
    VLLMRollouts,
    VLLMSettings,
    log_rollout_panel,
    log_step,
    logprob_mismatch,
    naming_failures,
    rollout_records,
    score_rollouts,
    sharded,
)
from lightning_veripo.verifier.judges import RuleJudge


class GRPOModule(VideoLLMModule):
    """Group Relative Policy Optimisation for a Video-LLM.

    Args:
        backbone: the shared Video-LLM.
        rewards: reward functions and weights (default: accuracy 1.0 + format 0.5, as in the paper's lineage).
        num_generations: G, rollouts per prompt.
        max_new_tokens / temperature / top_p / top_k: rollout sampling.
        beta: weight of the k3 KL to the reference policy (0 = no reference pass).
        epsilon_low / epsilon_high: clipping range (epsilon_high > epsilon_low is DAPO's clip-higher).
        loss_type: "grpo", "bnpo", "dr_grpo" or "dapo" token aggregation (see `losses.grpo_loss`), over the
            global batch under data parallelism (`losses.aggregation_count`).
        advantage_scale: "group" (std of the group), "batch" (std of the global batch) or "none" (Dr. GRPO).
        num_iterations: mu, optimiser passes over one generation batch (old log-probs kept for the ratio).
        importance_sampling_level: "token" or "sequence" (GSPO).
        accumulate_grad_batches: generation batches per optimiser step (needs num_iterations == 1).
        max_grad_norm: gradient clipping by norm (0 disables).
        mask_truncated_completions: completions that hit max_new_tokens contribute no loss.
        overlong_buffer: DAPO's soft overlong punishment over the last `overlong_buffer` tokens (0 = off),
            scaled by `overlong_penalty`.
        dynamic_sampling: drop groups whose rewards all agree (zero std): they carry no signal.
        temporal: Video-R1's T-GRPO: also sample G rollouts on temporally shuffled frames; if the ordered
            accuracy >= temporal_mu x the shuffled accuracy, correct ordered rollouts get +temporal_alpha.
        length_bonus: Video-R1's length bonus for correct completions of length_min_tokens..length_max_tokens
            tokens when at least length_min_correct_fraction of the group is correct (0 = off).
        share_vision: encode each prompt's video once (True) or repeat the pixels per rollout (peers' way).
        lr / weight_decay / warmup_steps: AdamW with linear warmup.
        log_rollouts_every_n_steps: a TensorBoard text panel of a few rollouts every N steps (0 = never).
        evaluation: validation and test settings (`EvalSettings`): every question greedily, plus
            `num_samples` samples at `temperature` (logged as `val/sampled_*`); `max_new_tokens` defaults to
            the module's, the judge of the inconsistency rate to the rules. Frames and batch size come from the
            data module (its `sampling` and `val_batch_size`).
        rollout_engine: "hf" (`generate` in this process, shared prefill) or "vllm" (a vLLM server, `vllm`
            settings; adapter-only weight sync after each optimiser step; see `lightning_veripo.rollout`).
        vllm: the vLLM server (`VLLMSettings`): a URL to connect to, or the Python that starts one.
        rollout_correction: "none", "token" or "sequence": truncated importance weights for the rollout engine's
            sampler differing from the trainer's old policy (`losses.rollout_correction`; vllm only), clipped at
            `rollout_correction_clip`.
    """

    def __init__(
        self,
        backbone: VideoLLM,
        rewards: RewardSet | None = None,
        num_generations: int = 8,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        beta: float = 0.0,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        advantage_scale: str = "group",
        num_iterations: int = 1,
        importance_sampling_level: str = "token",
        accumulate_grad_batches: int = 1,
        max_grad_norm: float = 1.0,
        mask_truncated_completions: bool = False,
        overlong_buffer: int = 0,
        overlong_penalty: float = 1.0,
        dynamic_sampling: bool = True,
        temporal: bool = False,
        temporal_mu: float = 0.8,
        temporal_alpha: float = 0.3,
        length_bonus: float = 0.0,
        length_min_tokens: int = 320,
        length_max_tokens: int = 512,
        length_min_correct_fraction: float = 0.5,
        share_vision: bool = True,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        log_rollouts_every_n_steps: int = 10,
        evaluation: EvalSettings = EvalSettings(),  # noqa: B008 (frozen)
        rollout_engine: str = "hf",
        vllm: VLLMSettings = VLLMSettings(),  # noqa: B008 (frozen)
        rollout_correction: str = "none",
        rollout_correction_clip: float = 2.0,
    ) -> None:
        super().__init__(backbone, lr, weight_decay, warmup_steps)
        problems = []
        if num_generations < 2:
            problems.append(f"num_generations={num_generations}: GRPO needs at least 2 rollouts per prompt")
        if loss_type not in losses.GRPO_LOSS_TYPES:
            problems.append(f"loss_type={loss_type!r} not in {losses.GRPO_LOSS_TYPES}")
        if advantage_scale not in losses.ADVANTAGE_SCALES:
            problems.append(f"advantage_scale={advantage_scale!r} not in {losses.ADVANTAGE_SCALES}")
        if importance_sampling_level not in losses.IMPORTANCE_SAMPLING_LEVELS:
            problems.append(
                f"importance_sampling_level={importance_sampling_level!r} not in "
                f"{losses.IMPORTANCE_SAMPLING_LEVELS}"
            )
        if num_iterations < 1 or accumulate_grad_batches < 1:
            problems.append("num_iterations and accumulate_grad_batches must be >= 1")
        if num_iterations > 1 and accumulate_grad_batches > 1:
            problems.append(
                "num_iterations > 1 takes one optimiser step per pass: set accumulate_grad_batches=1"
            )
        if overlong_buffer < 0 or overlong_buffer >= max_new_tokens:
            problems.append(
                f"overlong_buffer={overlong_buffer} must lie in [0, max_new_tokens={max_new_tokens})"
            )
        if beta != 0.0 and backbone.lora is None and not backbone.reference_copy:
            problems.append(
                f"beta={beta} needs a reference policy: full fine-tuning with reference_copy=False has none"
            )
        if rollout_engine not in ("hf", "vllm"):
            problems.append(f"rollout_engine={rollout_engine!r} not in ('hf', 'vllm')")
        if rollout_correction not in losses.ROLLOUT_CORRECTIONS:
            problems.append(f"rollout_correction={rollout_correction!r} not in {losses.ROLLOUT_CORRECTIONS}")
        elif rollout_correction != "none" and rollout_engine == "hf":
            problems.append(
                "rollout_correction corrects another engine's sampler: hf samples from pi_old itself"
            )
        if rollout_engine == "vllm" and temporal:
            problems.append(
                "temporal=True samples on shuffled vision features, which only rollout_engine='hf' can"
            )
        if problems:
            raise ValueError("GRPOModule: " + "; ".join(problems))
        self.automatic_optimization = False
        self.rewards = rewards if rewards is not None else RewardSet()
        self.num_generations = num_generations
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.beta = beta
        self.epsilon_low, self.epsilon_high = epsilon_low, epsilon_high
        self.loss_type = loss_type
        self.advantage_scale = advantage_scale
        self.num_iterations = num_iterations
        self.importance_sampling_level = importance_sampling_level
        self.accumulate_grad_batches = accumulate_grad_batches
        self.max_grad_norm = max_grad_norm
        self.mask_truncated_completions = mask_truncated_completions
        self.overlong_buffer, self.overlong_penalty = overlong_buffer, overlong_penalty
        self.dynamic_sampling = dynamic_sampling
        self.temporal, self.temporal_mu, self.temporal_alpha = temporal, temporal_mu, temporal_alpha
        self.length_bonus = length_bonus
        self.length_window = (length_min_tokens, length_max_tokens)
        self.length_min_correct_fraction = length_min_correct_fraction
        self.share_vision = share_vision
        self.engine: RolloutEngine = (
            VLLMRollouts(vllm or VLLMSettings()) if rollout_engine == "vllm" else HFRollouts()
        )
        self.rollout_correction, self.rollout_correction_clip = rollout_correction, rollout_correction_clip
        self._sync_s, self._rollout_logps = 0.0, None
        self.log_rollouts_every_n_steps = log_rollouts_every_n_steps
        self.evaluation = evaluation or EvalSettings()
        if self.evaluation.frames is not None or self.evaluation.batch_size is not None:
            raise ValueError(
                "GRPOModule evaluation.frames / evaluation.batch_size: validation reads the data module's "
                "batches; set the frames with --data.init_args.sampling and the batch size with "
                "--data.init_args.val_batch_size instead"
            )
        self.val_max_new_tokens = self.evaluation.max_new_tokens or max_new_tokens
        self.val_judge = self.evaluation.judge if self.evaluation.judge is not None else RuleJudge()
        self.val_metrics, self.val_sampled_metrics = ReasoningMetrics(), ReasoningMetrics()
        self.test_metrics, self.test_sampled_metrics = ReasoningMetrics(), ReasoningMetrics()

    # ------------------------------------------------------------------ the algorithm
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        records: list[VideoQARecord] = batch["records"]
        step = self.global_step  # the optimiser step below advances global_step; rollouts keep this one
        t0 = time.perf_counter()
        with naming_failures(records, f"generation ({self.engine.name} engine)"):
            vision = self.backbone.encode_vision(batch, requires_grad=False) if self.share_vision else None
            self._rollout_logps = None
            completions = self._sample(batch, vision)
        sampled = Sampled(completions, self._rollout_logps)
        t_generate = time.perf_counter() - t0

        scores = self.score(completions, records, batch, vision)
        rewards = self._all_ranks(scores.total)  # group statistics never depend on how prompts were spread
        n = scores.total.numel()
        advantages = losses.group_advantages(rewards, self.num_generations, self.advantage_scale)
        advantages = self._on_this_rank(advantages, n)
        kept = self._kept_groups(rewards)  # [world * N] bool: every rank's groups
        keep = self._on_this_rank(kept, n // self.num_generations)
        t_score = time.perf_counter() - t0 - t_generate

        any_kept = bool(kept.any())
        self._sync_s = 0.0
        loss, stats = self._optimise(batch, sampled, advantages, keep, any_kept, vision, batch_idx, records)
        t_optimise = time.perf_counter() - t0 - t_generate - t_score

        self._log_step(completions, scores, advantages, keep, stats, loss, (t_generate, t_score, t_optimise))
        sampling = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                    "max_new_tokens": self.max_new_tokens}  # fmt: skip
        rollouts = rollout_records(batch, completions, scores.components, scores.total, scores.accuracy,
                                   advantages, self.num_generations, sampling, step)  # fmt: skip
        self._log_rollout_panel(rollouts, step)
        return {"loss": loss.detach(), "rollouts": rollouts}

    def _sample(self, batch: dict[str, Any], vision: dict[str, Any] | None) -> Completions:
        """G completions per prompt from the rollout engine; its log-probs (if any) kept for this step."""
        sampling = Sampling(
            self.num_generations, self.max_new_tokens, self.temperature, self.top_p, self.top_k
        )
        sampled = self.engine.sample(self, batch, vision, sampling)
        self._rollout_logps = sampled.logprobs
        return sampled.completions

    def on_train_start(self) -> None:
        # a resumed fit reconnects and re-syncs the same way; on_train_start, not on_fit_start: sharded strategies
        # (restore_checkpoint_after_setup) restore the checkpoint's weights after on_fit_start, and every strategy
        # restores the step counter after it
        self.engine.start(self)

    def on_fit_end(self) -> None:
        self.engine.stop()

    def configure_callbacks(self) -> list[L.Callback]:
        return [*super().configure_callbacks(), StopEngineOnException()]  # a failed fit stops the engine too

    def score(
        self,
        completions: Completions,
        records: list[VideoQARecord],
        batch: dict[str, Any] | None = None,
        vision: dict[str, Any] | None = None,
    ) -> Scores:
        """Rewards for N*G completions: configured functions, then the optional bonuses and penalties."""
        return score_rollouts(self, completions, records, batch, vision)

    def _all_ranks(self, total: torch.Tensor) -> torch.Tensor:
        """The rewards of every rank, rank-major [world * N*G] (groups never straddle ranks); one process: `total`."""
        if self._trainer is None or self.trainer.world_size == 1:
            return total
        return self.all_gather(total).flatten()

    def _on_this_rank(self, values: torch.Tensor, n: int) -> torch.Tensor:
        """This rank's `n` entries of a rank-major tensor gathered by `_all_ranks` (all of it on one process)."""
        return values[self.global_rank * n : (self.global_rank + 1) * n]

    def _kept_groups(self, total: torch.Tensor) -> torch.Tensor:
        num_groups = total.numel() // self.num_generations
        if not self.dynamic_sampling:
            return torch.ones(num_groups, dtype=torch.bool, device=total.device)
        return losses.group_std(total, self.num_generations) > 0

    def _optimise(
        self,
        batch: dict[str, Any],
        sampled: Sampled,
        advantages: torch.Tensor,
        keep: torch.Tensor,
        any_rank_kept: bool,
        vision: dict[str, Any] | None,
        batch_idx: int,
        records: list[VideoQARecord],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        opt = self.optimizers()
        sched = self.lr_schedulers()
        G = self.num_generations
        completions = sampled.completions
        zero = torch.zeros((), device=advantages.device)
        stats: dict[str, torch.Tensor] = {
            "clip_ratio_low": zero,
            "clip_ratio_high": zero,
            "clip_ratio": zero,
            "kl": zero,
        }
        loss = zero
        step_now = (batch_idx + 1) % self.accumulate_grad_batches == 0
        # Under DDP/FSDP every rank must run the backward pass when any rank does, or the gradient all-reduce
        # waits forever: a rank whose groups were all dropped back-propagates one group with weight 0.
        idle = any_rank_kept and not bool(keep.any())
        if idle:
            keep = torch.zeros_like(keep)
            keep[0] = True
        if keep.any():
            sub_batch, sub_vision = select_prompts(batch, keep, self.backbone, vision)
            rows = keep.repeat_interleave(G)
            ids, mask = completions.ids[rows], completions.mask[rows]
            if self.mask_truncated_completions:
                mask = mask * (~completions.truncated[rows]).long()[:, None]
            adv = advantages[rows]
            with naming_failures(
                [r for r, k in zip(records, keep.tolist(), strict=True) if k], "log-prob pass"
            ):
                old = ref = weights = None
                if self.num_iterations > 1 or sampled.logprobs is not None:  # recompute pi_old
                    old = self._logps(sub_batch, ids, mask, sub_vision, reference=False, grad=False)
                if sampled.logprobs is not None:
                    rollout_logps = sampled.logprobs[rows].to(old.device)
                    mismatch = logprob_mismatch(old, rollout_logps, mask)
                    stats_extra = {f"rollout_logp_diff_{k}": v for k, v in mismatch.items()}
                    weights = losses.rollout_correction(
                        old, rollout_logps, mask, self.rollout_correction, self.rollout_correction_clip
                    )
                if self.beta != 0.0:
                    ref = self._logps(sub_batch, ids, mask, sub_vision, reference=True, grad=False)
                share = self._share_of_global_batch(mask, idle)
                for _ in range(self.num_iterations):
                    logps = self._logps(sub_batch, ids, mask, sub_vision, reference=False, grad=True)
                    loss, stats = losses.grpo_loss(
                        logps, old, ref, adv, mask,
                        beta=self.beta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
                        loss_type=self.loss_type, max_completion_length=self.max_new_tokens,
                        importance_sampling_level=self.importance_sampling_level, rollout_weights=weights,
                    )  # fmt: skip
                    if sampled.logprobs is not None:
                        stats = {**stats, **stats_extra}
                    if share is not None:
                        loss = loss * share
                    if idle:
                        loss = loss * 0.0
                    self.manual_backward(loss / self.accumulate_grad_batches)
                    if self.num_iterations > 1:
                        self._step(opt, sched)
        if self.num_iterations == 1 and step_now:
            self._step(opt, sched)
        elif self.num_iterations > 1 and not keep.any():
            self._step(opt, sched)  # no gradient: a no-op update that keeps the step count honest
        return loss, stats

    def _share_of_global_batch(self, mask: torch.Tensor, idle: bool) -> torch.Tensor | None:
        """W * this rank's tokens (or sequences) / every rank's, the factor that turns this rank's loss into its
        part of the global batch's (DDP and FSDP average the ranks' gradients; each loss is normalised by its
        own rank's count): a collective every rank reaches. None on one process, whose loss is the global one."""
        if self._trainer is None or self.trainer.world_size == 1:
            return None
        count = losses.aggregation_count(mask, self.loss_type) * (0.0 if idle else 1.0)
        total = self.trainer.strategy.reduce(count.clone(), reduce_op="sum")
        return count * self.trainer.world_size / total.clamp(min=1.0)

    def _step(self, opt: Any, sched: Any) -> None:
        if self.max_grad_norm > 0:
            self.clip_gradients(opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
        opt.step()  # parameters without a gradient (all groups dropped) are left untouched by AdamW
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
        self._sync_s += self.engine.sync(self)  # the engine follows the policy (adapter-only for LoRA)

    def _logps(
        self,
        batch: dict[str, Any],
        ids: torch.Tensor,
        mask: torch.Tensor,
        vision: dict[str, Any] | None,
        reference: bool,
        grad: bool,
    ) -> torch.Tensor:
        if vision is not None and not self.backbone.freeze_vision and grad:
            vision = None  # trainable vision tower: re-encode (once per prompt) with gradient
        with torch.set_grad_enabled(grad):
            return self.backbone.sequence_logprobs(
                batch, ids, mask, num_samples=self.num_generations, reference=reference,
                vision=vision, share_vision=self.share_vision, temperature=self.temperature,
            )  # fmt: skip

    # ------------------------------------------------------------------ records and logging
    def _log_step(self, *args: Any) -> None:
        log_step(self, *args)

    def _log_rollout_panel(self, rollouts: list[Rollout], step: int) -> None:
        log_rollout_panel(self, rollouts, step)

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: dict[str, Any], greedy: ReasoningMetrics, sampled: ReasoningMetrics) -> None:
        records: list[VideoQARecord] = batch["records"]
        n, tokenizer, settings = self.evaluation.num_samples, self.backbone.tokenizer, self.evaluation
        decoding = {"max_new_tokens": self.val_max_new_tokens, "repetition_penalty": settings.repetition_penalty,
                    "synced_gpus": sharded(self)}  # fmt: skip
        with naming_failures(records, "evaluation generation"):
            vision = self.backbone.encode_vision(batch, requires_grad=False)
            completions = self.backbone.generate(
                batch, num_samples=1, do_sample=False, vision=vision, **decoding
            )
            update_reasoning_metrics(greedy, completions.text, records, tokenizer, self.val_judge)
            if n > 0:
                completions = self.backbone.generate(
                    batch,
                    num_samples=n,
                    do_sample=True,
                    temperature=settings.temperature,
                    vision=vision,
                    **decoding,
                )
                repeated = [r for r in records for _ in range(n)]
                update_reasoning_metrics(sampled, completions.text, repeated, tokenizer, self.val_judge)

    def _log_evaluation(self, split: str, greedy: ReasoningMetrics, sampled: ReasoningMetrics) -> None:
        logged = {f"{split}/{k}": v for k, v in greedy.compute().items()}
        if self.evaluation.num_samples > 0:
            logged.update({f"{split}/sampled_{k}": v for k, v in sampled.compute().items() if "/" not in k})
        self.log_dict(logged)
        greedy.reset()
        sampled.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, self.val_sampled_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val", self.val_metrics, self.val_sampled_metrics)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, self.test_sampled_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test", self.test_metrics, self.test_sampled_metrics)
