"""Every GRPO knob the README advertises, checked by the value of its effect (removing or inverting it fails).

Most tests run `GRPOModule.training_step` under a real `lightning.Trainer` on the tiny Qwen2.5-VL. Where a
knob's effect depends on which completions were sampled, `FixedRollouts` replays fixed completion ids per
problem (ordinary tokens of the tiny tokenizer, some ending early, some truncated), so that two runs see the
same rollouts and the expected values can be worked out by hand; everything after sampling (rewards,
advantages, log-prob passes, the loss, backward, clipping, AdamW and its schedule) is the real code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import RecordSteps

from lightning_veripo import losses
from lightning_veripo.backbone import VideoLLM
from lightning_veripo.completions import Completions
from lightning_veripo.data.videoqa import FrameSampling, VideoQADataModule
from lightning_veripo.evaluate import EvalSettings
from lightning_veripo.grpo import GRPOModule
from lightning_veripo.lora import LoRAConfig
from lightning_veripo.records import VideoQARecord
from lightning_veripo.rewards import RewardSet

G = 4
MAX_NEW_TOKENS = 6
WORDS = "the square moves left then right and up while a red circle stays still in the middle of it"
# Where each of a problem's G rows gets its end-of-turn token (None: no end, so truncated at MAX_NEW_TOKENS).
ENDS = (1, None, 3, None)


# ----------------------------------------------------------------------------- fixed rollouts


def fixed_table(backbone: VideoLLM, problem_ids: list[str]) -> dict[str, torch.Tensor]:
    """G rows of MAX_NEW_TOKENS ordinary token ids per problem; row i ends at ENDS[i] (inclusive) or is truncated."""
    words = backbone.tokenizer(WORDS, add_special_tokens=False)["input_ids"]
    end = backbone.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert len(words) >= 2 * G + MAX_NEW_TOKENS and end not in words
    table = {}
    for p, pid in enumerate(problem_ids):
        rows = []
        for i, e in enumerate(ENDS):
            row = list(words[p * G + i : p * G + i + MAX_NEW_TOKENS])
            if e is not None:
                row[e] = end
            rows.append(row)
        table[pid] = torch.tensor(rows)
    return table


class FixedRollouts(GRPOModule):
    """GRPOModule whose sampler replays `table[problem_id]` ([G, T] ids) instead of sampling."""

    def __init__(self, *args: Any, table: dict[str, torch.Tensor], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.table = table

    def _sample(self, batch: dict[str, Any], vision: dict[str, Any] | None) -> Completions:
        ids = torch.cat([self.table[r.problem_id] for r in batch["records"]])
        return self.backbone.completions_from_ids(ids, self.max_new_tokens)


class StepSpy(L.Callback):
    """At every optimiser step (after clipping): the learning rate, the gradients, the weights before it."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()
                           if p.requires_grad and p.grad is not None})  # fmt: skip


def _trainable(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _run(
    tiny_model_dir: Path,
    synthetic_dir: Path,
    sampling: FrameSampling,
    *,
    batch_size: int = 2,
    max_steps: int = 1,
    seed: int = 0,
    **options: Any,
) -> tuple[FixedRollouts, RecordSteps, StepSpy, dict[str, torch.Tensor]]:
    """Fit a FixedRollouts module (LoRA initialised from `seed`) for `max_steps` optimiser steps.

    Returns the module, what every training step returned, the optimiser-step spy and the weights before."""
    torch.manual_seed(seed)
    backbone = VideoLLM(str(tiny_model_dir), lora=LoRAConfig(r=4, alpha=8)).load()
    ids = [f"train-{t}-{i:05d}" for i, t in enumerate(["colour", "direction", "count"] * 3)][:8]
    settings: dict[str, Any] = {"num_generations": G, "max_new_tokens": MAX_NEW_TOKENS, "lr": 1e-2,
                                "max_grad_norm": 0.0, "log_rollouts_every_n_steps": 0, **options}  # fmt: skip
    module = FixedRollouts(backbone, rewards=RewardSet(["rewards_for_tests.completion_chars"]),
                           table=fixed_table(backbone, ids), **settings)  # fmt: skip
    before = _trainable(module)
    record, spy = RecordSteps(), StepSpy()
    datamodule = VideoQADataModule(train_path=str(synthetic_dir / "train.json"), sampling=sampling,
                                   batch_size=batch_size, shuffle=False)  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[record, spy],
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == max_steps
    return module, record, spy, before


# ----------------------------------------------------------------------------- mask_truncated_completions


@pytest.mark.parametrize("mask_truncated", [False, True])
def test_mask_truncated_completions_takes_truncated_rows_out_of_the_loss(
    tiny_model_dir: Path, synthetic_dir: Path, frame_sampling: FrameSampling, mask_truncated: bool
) -> None:
    """With one update per generation the ratio is 1, so the dapo loss is -sum_i A_i n_i / sum_i n_i over the
    rows that count (n_i their completion tokens): truncated rows count only when they are not masked."""
    _, record, _, _ = _run(tiny_model_dir, synthetic_dir, frame_sampling,
                           mask_truncated_completions=mask_truncated, loss_type="dapo")  # fmt: skip
    rollouts = record.outputs[0]["rollouts"]
    assert [r.truncated for r in rollouts] == [e is None for e in ENDS] * 2
    lengths = torch.tensor([MAX_NEW_TOKENS if e is None else e + 1 for e in ENDS] * 2, dtype=torch.float64)
    assert [len(r.completion_ids) for r in rollouts] == lengths.long().tolist()
    adv = torch.tensor([r.advantage for r in rollouts], dtype=torch.float64)
    truncated = torch.tensor([r.truncated for r in rollouts])
    # The truncated rows carry signal: leaving them in changes the loss.
    assert adv[truncated].abs().min() > 0.1

    def dapo(counted: torch.Tensor) -> float:
        return float(-(adv * lengths)[counted].sum() / lengths[counted].sum())

    everything, untruncated = dapo(torch.ones_like(truncated)), dapo(~truncated)
    assert abs(everything - untruncated) > 0.05
    expected = untruncated if mask_truncated else everything
    assert float(record.outputs[0]["loss"]) == pytest.approx(expected, rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------- reward shaping (score)


def _records(n: int) -> list[VideoQARecord]:
    return [VideoQARecord(problem_id=f"q{i}", problem="Which?", data_type="video", problem_type="multiple choice",
                          solution="<answer>B</answer>", options=("A. x", "B. y", "C. z")) for i in range(n)]  # fmt: skip


def _completions(texts: list[str], lengths: list[int], width: int) -> Completions:
    """Hand-made completions: `lengths` tokens each (the mask), the given texts, truncated at `width` tokens."""
    n = torch.tensor(lengths)
    mask = (torch.arange(width)[None, :] < n[:, None]).long()
    return Completions(ids=torch.zeros(len(texts), width, dtype=torch.long), mask=mask, text=texts,
                       truncated=n >= width)  # fmt: skip


RIGHT = "<think>so it is B</think><answer>B</answer>"  # accuracy 1, format 1: reward 1.5
WRONG = "<answer>A</answer>"  # accuracy 0, format 0: reward 0


@pytest.mark.parametrize(("buffer", "penalty", "expected"), [
    (4, 0.5, [0.0, 0.0, -0.125, -0.25, -0.5]),
    (4, 1.0, [0.0, 0.0, -0.25, -0.5, -1.0]),
    (2, 1.0, [0.0, 0.0, 0.0, 0.0, -1.0]),
])  # fmt: skip
def test_overlong_penalty_is_dapos_soft_punishment(
    buffer: int, penalty: float, expected: list[float]
) -> None:
    """DAPO eq. 13 with L_max = 10: 0 up to L_max - buffer tokens, then falling linearly to -penalty at L_max."""
    module = GRPOModule(VideoLLM("never-loaded"), num_generations=5, max_new_tokens=10, overlong_buffer=buffer,
                        overlong_penalty=penalty)  # fmt: skip
    texts = [RIGHT, WRONG, RIGHT, WRONG, RIGHT]
    scores = module.score(_completions(texts, [3, 6, 7, 8, 10], 10), _records(1))

    torch.testing.assert_close(scores.components["overlong"], torch.tensor(expected))
    base = torch.tensor([1.5, 0.0, 1.5, 0.0, 1.5])
    torch.testing.assert_close(scores.total, base + torch.tensor(expected))


def test_no_overlong_component_without_a_buffer() -> None:
    module = GRPOModule(VideoLLM("never-loaded"), num_generations=2, max_new_tokens=10)
    scores = module.score(_completions([RIGHT, RIGHT], [10, 10], 10), _records(1))
    assert "overlong" not in scores.components
    torch.testing.assert_close(scores.total, torch.tensor([1.5, 1.5]))


def test_length_bonus_rewards_correct_completions_in_the_window_of_groups_correct_often_enough() -> None:
    """Video-R1: +bonus for a correct completion of lo..hi tokens (inclusive) when >= the fraction of its group
    is correct. Group 0: 3 of 4 correct, lengths 3 (in), 6 (above), 4 (wrong answer), 5 (in). Group 1: 1 of 4
    correct (below the 0.5 fraction) and in the window: no bonus at all. Group 2: 2 of 4 (exactly 0.5), one of
    them 2 tokens (below)."""
    module = GRPOModule(VideoLLM("never-loaded"), num_generations=4, max_new_tokens=10, length_bonus=0.2,
                        length_min_tokens=3, length_max_tokens=5, length_min_correct_fraction=0.5)  # fmt: skip
    texts = [RIGHT, RIGHT, WRONG, RIGHT] + [RIGHT, WRONG, WRONG, WRONG] + [RIGHT, RIGHT, WRONG, WRONG]
    lengths = [3, 6, 4, 5] + [4, 4, 4, 4] + [2, 5, 5, 5]
    scores = module.score(_completions(texts, lengths, 10), _records(3))

    expected = torch.tensor([0.2, 0.0, 0.0, 0.2] + [0.0] * 4 + [0.0, 0.2, 0.0, 0.0])
    torch.testing.assert_close(scores.components["length_bonus"], expected)
    accuracy = torch.tensor([float(t == RIGHT) for t in texts])
    torch.testing.assert_close(scores.total, 1.5 * accuracy + expected)


class FixedShuffledRollouts(GRPOModule):
    """GRPOModule whose only sampling call inside `score` (T-GRPO's shuffled-frame rollouts) returns fixed texts,
    and which keeps the vision features it was asked to sample from."""

    def __init__(self, *args: Any, shuffled_texts: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shuffled_texts = shuffled_texts
        self.sampled_from: list[dict[str, Any] | None] = []

    def _sample(self, batch: dict[str, Any], vision: dict[str, Any] | None) -> Completions:
        self.sampled_from.append(vision)
        n = len(self.shuffled_texts)
        return _completions(self.shuffled_texts, [3] * n, MAX_NEW_TOKENS)


def test_temporal_bonus_rewards_correct_ordered_rollouts_when_order_helped(
    backbone: VideoLLM, video_batch: dict[str, Any]
) -> None:
    """T-GRPO with mu = 0.9, alpha = 0.25. Prompt 0: ordered accuracy 3/4 >= 0.9 x shuffled 1/4, so its three
    correct rollouts get +0.25. Prompt 1: ordered 1/4 < 0.9 x shuffled 2/4: no bonus."""
    records = video_batch["records"]
    right = [f"<think>t</think><answer>{r.solution[8]}</answer>" for r in records]  # the solutions' letter
    assert [r.solution for r in records] == ["<answer>D</answer>"] * 2
    wrong = "<think>t</think><answer>A</answer>"
    ordered = [right[0]] * 3 + [wrong] + [right[1]] + [wrong] * 3
    shuffled = [right[0]] + [wrong] * 3 + [right[1]] * 2 + [wrong] * 2
    module = FixedShuffledRollouts(backbone, num_generations=G, max_new_tokens=MAX_NEW_TOKENS, temporal=True,
                                   temporal_mu=0.9, temporal_alpha=0.25, shuffled_texts=shuffled)  # fmt: skip
    vision = backbone.encode_vision(video_batch, requires_grad=False)
    scores = module.score(_completions(ordered, [3] * 2 * G, MAX_NEW_TOKENS), records, video_batch, vision)

    expected = torch.tensor([0.25, 0.25, 0.25, 0.0] + [0.0] * 4)
    torch.testing.assert_close(scores.components["temporal"], expected)
    torch.testing.assert_close(scores.total, scores.accuracy + 0.5 + expected)  # all eight are well formed
    # The shuffled rollouts were sampled from the same features with their temporal slots reordered.
    (shuffled_vision,) = module.sampled_from
    for mine, theirs, (t, _, _) in zip(vision["video"].pooler_output, shuffled_vision["video"].pooler_output,
                                       video_batch["video_grid_thw"].tolist(), strict=True):  # fmt: skip
        assert not torch.equal(mine, theirs)
        slots, shuffled_slots = mine.view(t, -1, mine.shape[-1]), theirs.view(t, -1, mine.shape[-1])
        assert sorted(any(torch.equal(s, o) for o in slots) for s in shuffled_slots) == [True] * t


# ----------------------------------------------------------------------------- optimisation knobs


def _close(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-4, atol: float = 1e-6
) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


def test_accumulating_k_batches_equals_one_batch_k_times_larger(
    tiny_model_dir: Path, synthetic_dir: Path, frame_sampling: FrameSampling
) -> None:
    """accumulate_grad_batches=2 over two 1-prompt batches: one optimiser step, with the gradient and the
    weights of one step on the 2-prompt batch ("grpo" loss: a mean over sequences, so the halves average)."""
    big_module, big_record, big, big_before = _run(tiny_model_dir, synthetic_dir, frame_sampling, batch_size=2,
                                          loss_type="grpo")  # fmt: skip
    module, record, acc, before = _run(tiny_model_dir, synthetic_dir, frame_sampling, batch_size=1,
                                       loss_type="grpo", accumulate_grad_batches=2)  # fmt: skip

    assert len(big_record.outputs) == 1 and len(record.outputs) == 2  # two generation batches ...
    assert len(acc.grads) == 1  # ... one optimiser step
    _close(before, big_before, rtol=0, atol=0)  # the same starting weights
    assert any(g.abs().max() > 1e-6 for g in big.grads[0].values())
    _close(acc.grads[0], big.grads[0])
    _close(_trainable(module), _trainable(big_module))
    adv_big = [r.advantage for r in big_record.outputs[0]["rollouts"]]
    adv_acc = [r.advantage for out in record.outputs for r in out["rollouts"]]
    assert adv_acc == pytest.approx(adv_big)


def test_max_grad_norm_scales_the_gradient_to_the_bound(
    tiny_model_dir: Path, synthetic_dir: Path, frame_sampling: FrameSampling
) -> None:
    """Clipping by norm: the applied gradient is the unclipped one times bound / ||g|| when ||g|| > bound, and
    the unclipped one when the bound is above ||g||."""
    _, _, free, _ = _run(tiny_model_dir, synthetic_dir, frame_sampling, max_grad_norm=0.0)
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g) for g in free.grads[0].values()])
    )
    bound = float(norm) / 4
    _, _, clipped, _ = _run(tiny_model_dir, synthetic_dir, frame_sampling, max_grad_norm=bound)
    _, _, loose, _ = _run(tiny_model_dir, synthetic_dir, frame_sampling, max_grad_norm=float(norm) * 4)

    clipped_norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g) for g in clipped.grads[0].values()])
    )
    assert float(clipped_norm) == pytest.approx(bound, rel=1e-4)
    _close(clipped.grads[0], {n: g * (bound / float(norm)) for n, g in free.grads[0].items()})
    _close(loose.grads[0], free.grads[0])


def test_weight_decay_shrinks_every_weight_by_lr_times_decay(
    tiny_model_dir: Path, synthetic_dir: Path, frame_sampling: FrameSampling
) -> None:
    """AdamW's decoupled decay: after one step, weights(wd) - weights(0) = -lr * wd * weights_before, exactly
    (the Adam part of the update is the same; a fresh LoRA's A matrices are non-zero, so the check bites)."""
    lr, wd = 1e-2, 0.5
    plain, _, _, before = _run(tiny_model_dir, synthetic_dir, frame_sampling, lr=lr, weight_decay=0.0)
    decayed, _, _, _ = _run(tiny_model_dir, synthetic_dir, frame_sampling, lr=lr, weight_decay=wd)

    after_plain, after_decayed = _trainable(plain), _trainable(decayed)
    assert any(w.abs().max() > 0.01 for w in before.values())
    _close({n: after_decayed[n] - after_plain[n] for n in before}, {n: -lr * wd * w for n, w in before.items()},
           rtol=1e-5, atol=1e-8)  # fmt: skip


@pytest.mark.parametrize(("warmup", "factors"), [(4, [0.25, 0.5, 0.75]), (0, [1.0, 1.0, 1.0])])
def test_warmup_steps_ramp_the_learning_rate_linearly(
    tiny_model_dir: Path,
    synthetic_dir: Path,
    frame_sampling: FrameSampling,
    warmup: int,
    factors: list[float],
) -> None:
    """Step s uses lr * min(1, (s + 1) / warmup). Adam's first update of a weight is lr_0 * g / (|g| + eps),
    so the largest first-step change of a weight with a clear gradient is lr_0 itself."""
    lr = 1e-2
    module, _, spy, before = _run(tiny_model_dir, synthetic_dir, frame_sampling, max_steps=3, lr=lr,
                                  warmup_steps=warmup)  # fmt: skip
    assert spy.lrs == pytest.approx([lr * f for f in factors])

    # The first step alone: rerun one step and measure the weights' change.
    first, _, spy1, before1 = _run(tiny_model_dir, synthetic_dir, frame_sampling, max_steps=1, lr=lr,
                                   warmup_steps=warmup)  # fmt: skip
    after = _trainable(first)
    clear = [(after[n] - before1[n])[g.abs() > 1e-4] for n, g in spy1.grads[0].items()]
    change = torch.cat([c.abs().flatten() for c in clear])
    assert change.numel() > 0
    torch.testing.assert_close(change, torch.full_like(change, lr * factors[0]), rtol=1e-3, atol=0)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(
    tiny_model_dir: Path, video_batch: dict[str, Any]
) -> None:
    """The same LoRA weights with and without checkpointing: equal loss and gradients, while the decoder
    layers really run twice per step with it (the recomputation in the backward pass)."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        # per-row scoring both times (one decoder pass per row; checkpointing falls back to it anyway): the
        # shared prompt's two passes (prompt, then completions) would blur the count of recomputations
        backbone = VideoLLM(str(tiny_model_dir), lora=LoRAConfig(r=4, alpha=8),
                            gradient_checkpointing=checkpointing, shared_prefill=False).load()  # fmt: skip
        for name, p in backbone.model.named_parameters():
            if "lora_B" in name:  # B = 0 would leave lora_A without gradient
                p.data.normal_(0.0, 0.05)
        table = fixed_table(backbone, [r.problem_id for r in video_batch["records"]])
        completions = backbone.completions_from_ids(torch.cat(list(table.values())), MAX_NEW_TOKENS)
        # transformers checkpoints a decoder layer's `forward`, so hooks on the layer itself run once; its first
        # module starts again when the backward pass recomputes the layer (which may stop early, once it has
        # rebuilt the tensors the backward needs: hence a pre-hook on the first module).
        norm = backbone.hf_model.model.language_model.layers[0].input_layernorm
        calls: list[int] = []
        norm.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        backbone.model.train()
        logps = backbone.sequence_logprobs(video_batch, completions.ids, completions.mask, num_samples=G)
        advantages = torch.linspace(-1.0, 1.0, completions.ids.shape[0])
        loss, _ = losses.grpo_loss(logps, None, None, advantages, completions.mask)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in backbone.model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, len(calls)))

    (loss, grads, calls), (loss_ckpt, grads_ckpt, calls_ckpt) = results
    assert (calls, calls_ckpt) == (1, 2)
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=1e-7)
    assert any(g.abs().max() > 0 for n, g in grads.items() if "lora_A" in n)
    _close(grads_ckpt, grads, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- evaluation.judge

# Fixed validation answers by problem type: the reasoning concludes one answer, the <answer> gives it (consistent)
# or another one (inconsistent) — the shapes the rule judge decides in tests/test_metrics.py.
VAL_TEXTS = {
    ("multiple choice", True): "<think>I watched it, so the answer is A.</think><answer>A</answer>",
    ("multiple choice", False): "<think>I watched it, so the answer is A.</think><answer>B</answer>",
    ("numerical", True): "<think>I count 3 squares, so the answer is 3.</think><answer>3</answer>",
    ("numerical", False): "<think>I count 3 squares, so the answer is 3.</think><answer>5</answer>",
}


class EveryVerdict:
    """A judge that gives every rollout the same verdict and keeps the questions it was asked about."""

    def __init__(self, consistent: bool) -> None:
        self.consistent = consistent
        self.questions: list[str] = []

    def judge(self, items: list[Any]) -> list[Any]:
        from lightning_veripo.verifier.protocol import Verdict

        self.questions.extend(item.question for item in items)
        return [Verdict(consistent=self.consistent, rationale="fixed") for _ in items]


@pytest.mark.parametrize(("judge", "expected"), [(None, 0.5), (True, 0.0), (False, 1.0)])
def test_the_evaluation_judge_is_the_judge_of_the_validation_inconsistency(
    backbone: VideoLLM, synthetic_dir: Path, frame_sampling: FrameSampling, monkeypatch: pytest.MonkeyPatch,
    judge: bool | None, expected: float,
) -> None:  # fmt: skip
    """Validation's inconsistency rate comes from `evaluation.judge`. The generator is replaced by fixed answers
    (validation records alternate consistent / inconsistent in loader order), so by hand: the default rule
    judge finds 2 of the 4 inconsistent (0.5); a judge calling everything consistent gives 0.0, one calling
    everything inconsistent 1.0, and that judge is asked about exactly the validation questions."""
    answered: list[str] = []

    def fixed_generate(batch: dict[str, Any], **_: Any) -> Any:
        texts = []
        for r in batch["records"]:
            texts.append(VAL_TEXTS[(r.problem_type, len(answered) % 2 == 0)])
            answered.append(r.problem)
        return type("Generated", (), {"text": texts})()

    monkeypatch.setattr(backbone, "generate", fixed_generate)
    given = None if judge is None else EveryVerdict(judge)
    module = GRPOModule(backbone, num_generations=G, max_new_tokens=MAX_NEW_TOKENS,
                        log_rollouts_every_n_steps=0, evaluation=EvalSettings(judge=given))  # fmt: skip
    datamodule = VideoQADataModule(train_path=str(synthetic_dir / "train.json"),
                                   val_path=str(synthetic_dir / "val.json"), sampling=frame_sampling,
                                   batch_size=2, shuffle=False)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    (out,) = trainer.validate(module, datamodule=datamodule, verbose=False)

    assert len(answered) == 4 and {p for p in answered} >= {"How many squares are in the video?"}
    assert out["val/inconsistency_rate"] == pytest.approx(expected)
    if given is not None:
        assert given.questions == answered
