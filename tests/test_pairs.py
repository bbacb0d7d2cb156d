"""Pair building follows VerIPO's verifier rules: which rollouts are chosen, which are rejected and why."""

from __future__ import annotations

import random

import pytest

from lightning_veripo.records import Rollout, VideoQARecord
from lightning_veripo.verifier import PairConfig, PreferencePair, Verdict, build_pairs
from lightning_veripo.verifier.pairs import reasoning_tokens

OPTIONS = ("A. red", "B. green", "C. blue", "D. yellow")
# Reasoning texts of known word counts; the default degenerate threshold is 8 words.
SHORT_GOOD = "The square is green in every frame, so the answer is B."  # 12 words
LONG_GOOD = (
    "I look at each frame in turn. The square stays green from start to end, so the answer is B."  # 20
)
REFLECTIVE = (
    "The square looks blue at first. Wait, that was the shadow; it is green, so the answer is B."  # 18
)
WRONG = "The square is blue in the first frame, so the answer is C."  # 12 words


def record(pid: str = "q1", problem_type: str = "multiple choice") -> VideoQARecord:
    return VideoQARecord(
        problem_id=pid,
        problem="What colour is the square?",
        data_type="video",
        problem_type=problem_type,
        solution="<answer>B</answer>",
        path=f"videos/{pid}.mp4",
        options=OPTIONS if problem_type == "multiple choice" else (),
    )


def rollout(
    i: int,
    think: str | None,
    answer: str,
    accuracy: float,
    pid: str = "q1",
    step: int = 0,
    truncated: bool = False,
    problem_type: str = "multiple choice",
) -> Rollout:
    body = f"<think>{think}</think>" if think is not None else ""
    return Rollout(
        record=record(pid, problem_type),
        completion=f"{body}<answer>{answer}</answer>",
        completion_ids=[],
        rewards={"accuracy": accuracy, "format": 0.5},
        reward=accuracy + 0.5,
        advantage=0.0,
        group_mean_accuracy=0.0,
        truncated=truncated,
        step=step,
        sample_index=i,
        prompt=f"<prompt for {pid}>",
        sampling={"temperature": 1.0, "num_frames": 4},
    )


def good(i: int, think: str = SHORT_GOOD, **kw) -> Rollout:
    return rollout(i, think, "B", 1.0, **kw)


def wrong(i: int, think: str = WRONG, **kw) -> Rollout:
    return rollout(i, think, "C", 0.0, **kw)


def ok(consistent: bool | None = True, repetitive: bool = False) -> Verdict:
    return Verdict(consistent=consistent, repetitive=repetitive, judge="hand")


def summary(pairs: list[PreferencePair]) -> list[tuple[int, int, str]]:
    return [(p.chosen_sample_index, p.rejected_sample_index, p.reason) for p in pairs]


def test_question_with_no_correct_rollout_is_skipped_as_all_wrong():
    rollouts = [wrong(0), wrong(1), wrong(2)]
    pairs, stats = build_pairs(rollouts, [ok(), ok(), ok()])
    assert pairs == []
    assert stats.questions_skipped["all_wrong"] == 1
    assert stats.skipped_problem_ids["all_wrong"] == ["q1"]


def test_question_whose_rollouts_are_all_good_is_skipped_as_no_rejected():
    pairs, stats = build_pairs([good(0), good(1, LONG_GOOD)], [ok(), ok()])
    assert pairs == []
    assert stats.questions_skipped["no_rejected"] == 1


def test_unjudged_correct_rollout_is_never_chosen_nor_rejected():
    pairs, stats = build_pairs([good(0), wrong(1)], [ok(consistent=None), ok()])
    assert pairs == []
    assert stats.skipped_problem_ids["no_chosen"] == ["q1"]
    pairs, _ = build_pairs([good(0), good(1), wrong(2)], [ok(consistent=None), ok(), ok()])
    assert summary(pairs) == [(1, 2, "consistency:wrong_answer")]


def test_wrong_answer_is_rejected_against_the_correct_consistent_one():
    pairs, stats = build_pairs([wrong(0), good(1)], [ok(), ok()])
    assert summary(pairs) == [(1, 0, "consistency:wrong_answer")]
    assert stats.pairs_by_reason["consistency:wrong_answer"] == 1
    assert stats.questions_with_pairs == 1 and stats.num_pairs == 1


def test_correct_but_inconsistent_rollout_is_a_negative():
    pairs, _ = build_pairs([good(0), good(1)], [ok(), ok(consistent=False)])
    assert summary(pairs) == [(0, 1, "consistency:inconsistent_correct")]


def test_repetitive_rollout_is_penalised_and_never_chosen():
    pairs, _ = build_pairs([good(0), good(1, LONG_GOOD)], [ok(), ok(repetitive=True)])
    assert summary(pairs) == [(0, 1, "penalty:repetitive")]
    # Without penalising, a repetitive rollout is still no chosen candidate.
    no_penalty = PairConfig(penalize_repetitive=False)
    pairs, stats = build_pairs([good(0), wrong(1)], [ok(repetitive=True), ok()], no_penalty)
    assert pairs == [] and stats.questions_skipped["no_chosen"] == 1


def test_without_penalising_a_repetitive_correct_rollout_is_neither_chosen_nor_rejected():
    """penalize_repetitive=False keeps a repetitive, correct, consistent rollout out of the pairs altogether."""
    rollouts = [good(0), good(1, LONG_GOOD), wrong(2)]
    verdicts = [ok(), ok(repetitive=True), ok()]
    config = PairConfig(penalize_repetitive=False, max_pairs_per_question=8)
    pairs, _ = build_pairs(rollouts, verdicts, config)
    assert summary(pairs) == [(0, 2, "consistency:wrong_answer")]
    pairs, _ = build_pairs(rollouts, verdicts, PairConfig(max_pairs_per_question=8))
    assert sorted(summary(pairs)) == [(0, 1, "penalty:repetitive"), (0, 2, "consistency:wrong_answer")]


def test_min_reasoning_tokens_is_the_shortest_reasoning_that_is_not_degenerate():
    """The default threshold is 8 (words here, the rollouts carry no ids): 8 words pass, 7 are degenerate."""
    eight, seven = "one two three four five six seven eight", "one two three four five six seven"
    rollouts = [good(0, eight), good(1, seven), wrong(2)]
    pairs, _ = build_pairs(rollouts, [ok(), ok(), ok()], PairConfig(max_pairs_per_question=8))
    assert sorted(summary(pairs)) == [(0, 1, "penalty:degenerate"), (0, 2, "consistency:wrong_answer")]


def test_truncated_rollout_is_penalised_even_when_correct():
    pairs, _ = build_pairs([good(0), good(1, LONG_GOOD, truncated=True)], [ok(), ok()])
    assert summary(pairs) == [(0, 1, "penalty:truncated")]


def test_too_short_or_missing_reasoning_is_degenerate():
    rollouts = [good(0), good(1, "B."), rollout(2, None, "B", 1.0)]
    pairs, _ = build_pairs(rollouts, [ok(), ok(), ok(consistent=None)], PairConfig(max_pairs_per_question=8))
    assert sorted(summary(pairs)) == [(0, 1, "penalty:degenerate"), (0, 2, "penalty:degenerate")]


def test_penalties_take_precedence_over_wrong_answer():
    pairs, _ = build_pairs([good(0), wrong(1, truncated=True)], [ok(), ok()])
    assert summary(pairs) == [(0, 1, "penalty:truncated")]
    pairs, _ = build_pairs([good(0), wrong(1, truncated=True)], [ok(), ok()], PairConfig(penalty_pairs=False))
    assert summary(pairs) == [(0, 1, "consistency:wrong_answer")]


def test_reflective_chosen_is_preferred_and_makes_a_reflection_pair():
    rollouts = [good(0, LONG_GOOD), good(1, REFLECTIVE), wrong(2)]
    pairs, _ = build_pairs(rollouts, [ok()] * 3)
    assert summary(pairs) == [(1, 2, "reflection")]
    # A wrong rollout that also reflects does not "commit to the wrong attempt": a plain wrong-answer pair.
    rollouts = [
        good(0, LONG_GOOD),
        good(1, REFLECTIVE),
        wrong(2, "Wait, the square is blue, so the answer is C."),
    ]
    pairs, _ = build_pairs(rollouts, [ok()] * 3)
    assert summary(pairs) == [(1, 2, "consistency:wrong_answer")]


def test_without_reflection_preference_longer_reasoning_is_chosen():
    rollouts = [good(0, LONG_GOOD), good(1, REFLECTIVE), wrong(2)]
    config = PairConfig(prefer_reflective=False, reflection_pairs=False)
    pairs, _ = build_pairs(rollouts, [ok()] * 3, config)
    assert summary(pairs) == [(0, 2, "consistency:wrong_answer")]
    pairs, _ = build_pairs([good(0), good(1, LONG_GOOD), wrong(2)], [ok()] * 3)
    assert summary(pairs) == [(1, 2, "consistency:wrong_answer")]


def test_ties_break_by_a_seeded_draw_that_is_stable_per_seed():
    rollouts, verdicts = [good(0), good(1), wrong(2)], [ok()] * 3
    picks = {}
    for seed in range(16):
        first, _ = build_pairs(rollouts, verdicts, PairConfig(seed=seed))
        again, _ = build_pairs(rollouts, verdicts, PairConfig(seed=seed))
        assert summary(first) == summary(again)
        picks[seed] = first[0].chosen_sample_index
    assert set(picks.values()) == {0, 1}, "both tied rollouts should win for some seed"


def test_pairs_per_question_are_capped_and_cycle_over_reasons_and_chosen():
    rollouts = [good(0, LONG_GOOD), good(1)] + [wrong(i) for i in range(2, 5)]
    rollouts += [good(5), good(6)]
    verdicts = [ok(), ok(), ok(), ok(), ok(), ok(consistent=False), ok(repetitive=True)]
    pairs, stats = build_pairs(rollouts, verdicts, PairConfig(max_pairs_per_question=3))
    reasons = [p.reason for p in pairs]
    assert reasons == ["consistency:inconsistent_correct", "consistency:wrong_answer", "penalty:repetitive"]
    assert [p.chosen_sample_index for p in pairs] == [0, 1, 0]  # best chosen first, then the next
    assert stats.num_pairs == 3


def test_output_is_independent_of_input_order_and_deterministic_per_seed():
    rollouts = [good(i, LONG_GOOD if i % 2 else SHORT_GOOD, pid=f"q{i % 3}") for i in range(6)]
    rollouts += [wrong(10 + i, pid=f"q{i % 3}") for i in range(6)]
    verdicts = [ok() for _ in rollouts]
    reference, _ = build_pairs(rollouts, verdicts, PairConfig(max_pairs_per_question=2, seed=7))
    order = list(range(len(rollouts)))
    random.Random(0).shuffle(order)
    shuffled, _ = build_pairs(
        [rollouts[i] for i in order],
        [verdicts[i] for i in order],
        PairConfig(seed=7, max_pairs_per_question=2),
    )
    assert [p.to_dict() for p in shuffled] == [p.to_dict() for p in reference]
    assert [p.problem_id for p in reference] == ["q0", "q0", "q1", "q1", "q2", "q2"]


def test_always_solved_lists_questions_whose_rollouts_were_all_correct():
    rollouts = [good(0, pid="easy"), good(1, pid="easy"), good(0, pid="mixed"), wrong(1, pid="mixed")]
    rollouts += [wrong(0, pid="hard")]
    _, stats = build_pairs(rollouts, [ok()] * 5)
    assert stats.always_solved == ["easy"]
    assert stats.num_questions == 3


def test_pair_kinds_can_be_switched_off():
    rollouts, verdicts = [good(0), wrong(1), good(2)], [ok(), ok(), ok(consistent=False)]
    config = PairConfig(consistency_pairs=False, reflection_pairs=False)
    pairs, stats = build_pairs(rollouts, verdicts, config)
    assert pairs == [] and stats.questions_skipped["no_rejected"] == 1


def test_correct_threshold_can_differ_by_problem_type():
    rollouts = [
        rollout(0, SHORT_GOOD, "3", 0.8, problem_type="regression"),
        rollout(1, SHORT_GOOD, "9", 0.1, problem_type="regression"),
    ]
    pairs, stats = build_pairs(rollouts, [ok(), ok()])
    assert stats.questions_skipped["all_wrong"] == 1
    pairs, _ = build_pairs(rollouts, [ok(), ok()], PairConfig(correct_threshold_by_type={"regression": 0.5}))
    assert summary(pairs) == [(0, 1, "consistency:wrong_answer")]


def test_pair_carries_the_prompt_video_sampling_and_round_trips():
    pairs, _ = build_pairs([good(0, step=3), wrong(1, step=3)], [ok(), ok()])
    pair = pairs[0]
    assert (pair.prompt, pair.video, pair.sampling) == (
        "<prompt for q1>",
        "videos/q1.mp4",
        {"temperature": 1.0, "num_frames": 4},
    )
    assert (pair.chosen_step, pair.rejected_step) == (3, 3)
    assert pair.chosen.endswith("<answer>B</answer>") and pair.rejected.endswith("<answer>C</answer>")
    assert PreferencePair.from_dict(pair.to_dict()) == pair


def test_reasoning_tokens_use_the_policy_token_ids_when_present():
    r = good(0)
    assert reasoning_tokens(r) == 12  # words without ids
    r.completion_ids = list(range(100))
    think_share = len(SHORT_GOOD) / len(r.completion)
    assert reasoning_tokens(r) == round(100 * think_share)


def test_one_verdict_per_rollout_is_required():
    with pytest.raises(ValueError, match="one verdict per rollout"):
        build_pairs([good(0)], [])
