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
from typing import Any, NamedTuple

import torch

from lightning_veripo import losses, sharding
from lightning_veripo.backbone import VideoLLM
from lightning_veripo.batching import select_prompts, shuffle_video_features
from lightning_veripo.completions import Completions
from lightning_veripo.evaluate import EvalSettings
from lightning_veripo.loggers import logged_step
from lightning_veripo.metrics import ReasoningMetrics, update_reasoning_metrics  # the latter was here once
from lightning_veripo.module import VideoLLMModule
from lightning_veripo.records import Rollout, VideoQARecord
from lightning_veripo.rewards import RewardSet, accuracy_reward
from lightning_veripo.verifier.judges import RuleJudge


class Scores(NamedTuple):
    """Rewards of one generation batch, prompt-major like the completions."""

    components: dict[str, torch.Tensor]  # name -> [N*G] unweighted values
    total: torch.Tensor  # [N*G] weighted sum + bonuses
    accuracy: torch.Tensor  # [N*G] accuracy reward (0 when not configured)


class GRPOModule(VideoLLMModule):
    """Group Relative Policy Optimisation for a Video-LLM.

    Args:
        backbone: the shared Video-LLM.
        rewards: reward functions and weights (default: accuracy 1.0 + format 0.5, as in the paper's lineage).
        num_generations: G, rollouts per prompt.
        max_new_tokens / temperature / top_p / top_k: rollout sampling.
        beta: weight of the k3 KL to the reference policy (0 = no reference pass).
        epsilon_low / epsilon_high: clipping range (epsilon_high > epsilon_low is DAPO's clip-higher).
        loss_type: "grpo", "bnpo", "dr_grpo" or "dapo" token aggregation (see `losses.grpo_loss`).
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
        with self._naming_failures(records, "generation"):
            vision = self.backbone.encode_vision(batch, requires_grad=False) if self.share_vision else None
            completions = self._sample(batch, vision)
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
        loss, stats = self._optimise(
            batch, completions, advantages, keep, any_kept, vision, batch_idx, records
        )
        t_optimise = time.perf_counter() - t0 - t_generate - t_score

        self._log_step(completions, scores, advantages, keep, stats, loss, (t_generate, t_score, t_optimise))
        rollouts = self._rollouts(batch, completions, scores, advantages, step)
        self._log_rollout_panel(rollouts, step)
        return {"loss": loss.detach(), "rollouts": rollouts}

    def _sample(self, batch: dict[str, Any], vision: dict[str, Any] | None) -> Completions:
        return self.backbone.generate(
            batch,
            num_samples=self.num_generations,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            vision=vision,
            synced_gpus=self._sharded(),
        )

    def _sharded(self) -> bool:
        """FSDP(2) / DeepSpeed ZeRO-3 need every rank to keep stepping generate until all ranks finish."""
        if self._trainer is None:
            return False
        name = type(self.trainer.strategy).__name__.lower()
        sharded = "fsdp" in name or "deepspeed" in name or sharding.uses_fsdp2(self.trainer.strategy)
        return self.trainer.world_size > 1 and sharded

    def score(
        self,
        completions: Completions,
        records: list[VideoQARecord],
        batch: dict[str, Any] | None = None,
        vision: dict[str, Any] | None = None,
    ) -> Scores:
        """Rewards for N*G completions: configured functions, then the optional bonuses and penalties."""
        G = self.num_generations
        expanded = [r for r in records for _ in range(G)]
        components, total = self.rewards.score(completions.text, expanded)
        device = completions.ids.device
        components = {k: v.to(device) for k, v in components.items()}
        total = total.to(device)
        accuracy = components.get("accuracy")
        if accuracy is None:
            accuracy = torch.tensor(
                [accuracy_reward(t, r) for t, r in zip(completions.text, expanded, strict=True)],
                device=device,
            )
        lengths = completions.mask.sum(-1).float()
        if self.overlong_buffer > 0:
            start = self.max_new_tokens - self.overlong_buffer
            overlong = ((start - lengths) / self.overlong_buffer).clamp(max=0.0) * self.overlong_penalty
            components["overlong"] = overlong
            total = total + overlong
        if self.length_bonus > 0:
            correct = (accuracy > 0).float().view(-1, G)
            enough = (correct.mean(1, keepdim=True) >= self.length_min_correct_fraction).float()
            lo, hi = self.length_window
            in_window = ((lengths >= lo) & (lengths <= hi)).float().view(-1, G)
            bonus = (self.length_bonus * correct * in_window * enough).flatten()
            components["length_bonus"] = bonus
            total = total + bonus
        if self.temporal and batch is not None and batch.get("video_grid_thw") is not None:
            bonus = self._temporal_bonus(batch, vision, records, accuracy)
            components["temporal"] = bonus
            total = total + bonus
        return Scores(components, total, accuracy.float())

    def _temporal_bonus(
        self,
        batch: dict[str, Any],
        vision: dict[str, Any] | None,
        records: list[VideoQARecord],
        accuracy: torch.Tensor,
    ) -> torch.Tensor:
        """T-GRPO: sample on frames in shuffled order; reward correct ordered rollouts when order helped."""
        G = self.num_generations
        if vision is None:
            vision = self.backbone.encode_vision(batch, requires_grad=False)
        shuffled = {
            **vision,
            "video": shuffle_video_features(vision["video"], batch["video_grid_thw"], self.global_step),
        }
        with self._naming_failures(records, "temporal (shuffled-frame) generation"):
            completions = self._sample(batch, shuffled)
        expanded = [r for r in records for _ in range(G)]
        shuffled_acc = (
            torch.tensor(
                [accuracy_reward(t, r) for t, r in zip(completions.text, expanded, strict=True)],
                device=accuracy.device,
            )
            .view(-1, G)
            .mean(1, keepdim=True)
        )
        ordered = accuracy.view(-1, G)
        helped = (ordered.mean(1, keepdim=True) >= self.temporal_mu * shuffled_acc).float()
        return (self.temporal_alpha * (ordered > 0).float() * helped).flatten()

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
        completions: Completions,
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
            with self._naming_failures(
                [r for r, k in zip(records, keep.tolist(), strict=True) if k], "log-prob pass"
            ):
                old = ref = None
                if self.num_iterations > 1:
                    old = self._logps(sub_batch, ids, mask, sub_vision, reference=False, grad=False)
                if self.beta != 0.0:
                    ref = self._logps(sub_batch, ids, mask, sub_vision, reference=True, grad=False)
                for _ in range(self.num_iterations):
                    logps = self._logps(sub_batch, ids, mask, sub_vision, reference=False, grad=True)
                    loss, stats = losses.grpo_loss(
                        logps, old, ref, adv, mask,
                        beta=self.beta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
                        loss_type=self.loss_type, max_completion_length=self.max_new_tokens,
                        importance_sampling_level=self.importance_sampling_level,
                    )  # fmt: skip
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

    def _step(self, opt: Any, sched: Any) -> None:
        if self.max_grad_norm > 0:
            self.clip_gradients(opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
        opt.step()  # parameters without a gradient (all groups dropped) are left untouched by AdamW
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()

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

    class _naming_failures:
        """Re-raise a failure inside generation / scoring with the problem ids of the batch (no silent skip)."""

        def __init__(self, records: list[VideoQARecord], what: str) -> None:
            self.ids, self.what = [r.problem_id for r in records], what

        def __enter__(self) -> None:
            return None

        def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
            if isinstance(
                exc, Exception
            ):  # IndexError / TypeError from a bad batch too; not KeyboardInterrupt
                raise RuntimeError(f"GRPO {self.what} failed for problem_id(s) {self.ids}: {exc}") from exc
            return False

    # ------------------------------------------------------------------ records and logging
    def _rollouts(
        self,
        batch: dict[str, Any],
        completions: Completions,
        scores: Scores,
        advantages: torch.Tensor,
        step: int,
    ) -> list[Rollout]:
        G = self.num_generations
        group_acc = scores.accuracy.view(-1, G).mean(1)
        out = []
        sampling = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
        }
        for i in range(completions.ids.shape[0]):
            p = i // G
            n = int(completions.mask[i].sum())
            out.append(Rollout(
                record=batch["records"][p],
                completion=completions.text[i],
                completion_ids=completions.ids[i, :n].tolist(),
                rewards={k: float(v[i]) for k, v in scores.components.items()},
                reward=float(scores.total[i]),
                advantage=float(advantages[i]),
                group_mean_accuracy=float(group_acc[p]),
                truncated=bool(completions.truncated[i]),
                step=step,
                sample_index=i % G,
                prompt=batch["prompts"][p] if "prompts" in batch else "",
                sampling={**sampling, **(batch["sampling"][p] if "sampling" in batch else {})},
            ))  # fmt: skip
        return out

    def _log_step(
        self,
        completions: Completions,
        scores: Scores,
        advantages: torch.Tensor,
        keep: torch.Tensor,
        stats: dict[str, torch.Tensor],
        loss: torch.Tensor,
        times: tuple[float, float, float],
    ) -> None:
        lengths = completions.mask.sum(-1).float()
        n = len(lengths)
        log = {
            "train/loss": loss.detach(),
            "train/reward": scores.total.mean(),
            "train/reward_std": scores.total.std() if n > 1 else scores.total.new_zeros(()),
            "train/advantage_std": advantages.std() if n > 1 else advantages.new_zeros(()),
            "train/completion_length": lengths.mean(),
            "train/completion_length_min": lengths.min(),
            "train/completion_length_max": lengths.max(),
            "train/truncated_fraction": completions.truncated.float().mean(),
            "train/groups_dropped": 1.0 - keep.float().mean(),
            "train/gen_tokens_per_s": lengths.sum() / max(times[0], 1e-9),
            "train/time_generate_s": times[0],
            "train/time_score_s": times[1],
            "train/time_optimise_s": times[2],
            **{f"train/{k}": v for k, v in stats.items()},
        }
        for name, values in scores.components.items():
            log[f"train/rewards/{name}"] = values.mean()
            log[f"train/rewards/{name}_std"] = values.std() if n > 1 else values.new_zeros(())
        bs = n // self.num_generations
        self.log_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in log.items()}, batch_size=bs)
        self.log("reward", scores.total.mean(), prog_bar=True, logger=False, batch_size=bs)
        self.log("acc", scores.accuracy.mean(), prog_bar=True, logger=False, batch_size=bs)
        self.log("train/accuracy", scores.accuracy.mean(), batch_size=bs)

    def _log_rollout_panel(self, rollouts: list[Rollout], step: int) -> None:
        every = self.log_rollouts_every_n_steps
        writer = getattr(self.logger, "experiment", None) if self.logger is not None else None
        if not every or writer is None or not hasattr(writer, "add_text") or step % every:
            return
        rows = ["| problem | reward | advantage | completion |", "|---|---|---|---|"]
        for r in rollouts[: min(4, len(rollouts))]:
            text = r.completion.replace("|", "\\|").replace("\n", " ")[:300]
            rows.append(f"| {r.record.problem_id} | {r.reward:.2f} | {r.advantage:+.2f} | {text} |")
        writer.add_text("train/rollouts", "\n".join(rows), logged_step(self.logger, step))

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: dict[str, Any], greedy: ReasoningMetrics, sampled: ReasoningMetrics) -> None:
        records: list[VideoQARecord] = batch["records"]
        n, tokenizer, settings = self.evaluation.num_samples, self.backbone.tokenizer, self.evaluation
        decoding = {"max_new_tokens": self.val_max_new_tokens, "repetition_penalty": settings.repetition_penalty,
                    "synced_gpus": self._sharded()}  # fmt: skip
        with self._naming_failures(records, "evaluation generation"):
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
