"""GRPO rewards, value by value: accuracy per problem type, format, length, the registry and `RewardSet`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonargparse import ArgumentParser

from lightning_veripo.records import PROBLEM_TYPES, VideoQARecord
from lightning_veripo.rewards import (
    MRA_TOLERANCES,
    REWARDS,
    LengthReward,
    RewardSet,
    accuracy_reward,
    choice_accuracy,
    format_reward,
    free_form_accuracy,
    ground_truth,
    mean_relative_accuracy,
    numerical_accuracy,
    ocr_accuracy,
    regression_accuracy,
    resolve_reward,
)


def record(
    problem_type: str, answer: str, options: tuple[str, ...] = (), problem_id: str = "q1"
) -> VideoQARecord:
    return VideoQARecord(
        problem_id=problem_id,
        problem="What colour is the moving square?",
        data_type="video",
        problem_type=problem_type,
        solution=f"<answer>{answer}</answer>",
        path="clip.mp4",
        options=options,
    )


def completion(answer: str, think: str = "The square is blue.") -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


COLOURS = record("multiple choice", "B", ("A. red", "B. blue", "C. green", "D. yellow"))


# ----------------------------------------------------------------------------- ground truth


def test_ground_truth_is_the_answer_tag_content() -> None:
    assert ground_truth(COLOURS) == "B"


def test_ground_truth_without_a_tag_is_the_stripped_solution() -> None:
    untagged = VideoQARecord("q2", "How many?", "video", "numerical", " 12 \n")
    assert ground_truth(untagged) == "12"


# ----------------------------------------------------------------------------- multiple choice


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("B", 1.0),
        ("(B)", 1.0),
        ("B. blue", 1.0),
        ("B)", 1.0),
        ("The answer is B", 1.0),
        ("b", 1.0),  # a lone lowercase letter is still a letter
        ("(b)", 1.0),
        ("A", 0.0),
        ("B or C", 0.0),  # hedging between options earns nothing
        ("B, not A", 0.0),
        ("blue", 0.0),  # the option text alone names no letter
        ("the answer is b", 0.0),  # lowercase letters inside a sentence are words
        ("Bob", 0.0),
        ("E", 0.0),  # not an offered option
    ],
)
def test_multiple_choice(answer: str, expected: float) -> None:
    assert accuracy_reward(completion(answer), COLOURS) == expected


def test_multiple_choice_letters_outside_the_options_are_ignored() -> None:
    # "I" is no option of a four-option question, so "I think B" names only B.
    assert accuracy_reward(completion("I think B"), COLOURS) == 1.0
    # With ten options I is one, and the answer hedges.
    ten = record("multiple choice", "B", tuple(f"{c}. x" for c in "ABCDEFGHIJ"))
    assert accuracy_reward(completion("I think B"), ten) == 0.0


def test_multiple_choice_full_option_text_with_an_article_counts() -> None:
    animals = record("multiple choice", "B", ("A. A dog", "B. A cat"))
    assert accuracy_reward(completion("B. A cat"), animals) == 1.0
    assert accuracy_reward(completion("B. a cat"), animals) == 1.0
    assert accuracy_reward(completion("A. A dog"), animals) == 0.0


def test_multiple_choice_without_options_offers_a_to_d() -> None:
    plain = record("multiple choice", "C")
    assert accuracy_reward(completion("C"), plain) == 1.0
    assert accuracy_reward(completion("C or D"), plain) == 0.0
    assert accuracy_reward(completion("C or E"), plain) == 1.0  # E is not offered


def test_multiple_choice_ground_truth_with_option_text() -> None:
    assert choice_accuracy("B", "B. blue", COLOURS.options) == 1.0


def test_multiple_choice_ground_truth_without_a_letter_is_a_data_error() -> None:
    bad = record("multiple choice", "blue", COLOURS.options, problem_id="vid-7")
    with pytest.raises(ValueError, match="vid-7.*names no option letter"):
        accuracy_reward(completion("B"), bad)


def test_multiple_choice_ground_truth_outside_the_options_is_a_data_error() -> None:
    bad = record("multiple choice", "F", COLOURS.options, problem_id="vid-8")
    with pytest.raises(ValueError, match="vid-8.*'F'"):
        accuracy_reward(completion("F"), bad)


@pytest.mark.parametrize("problem_type", PROBLEM_TYPES)
def test_no_answer_tag_scores_zero(problem_type: str) -> None:
    assert accuracy_reward("<think>It is B.</think> B", record(problem_type, "B")) == 0.0


@pytest.mark.parametrize("problem_type", PROBLEM_TYPES)
def test_empty_answer_scores_zero(problem_type: str) -> None:
    assert accuracy_reward(completion("  "), record(problem_type, "12")) == 0.0


def test_unclosed_answer_scores_zero() -> None:
    assert accuracy_reward("<think>x</think><answer>B", COLOURS) == 0.0


# ----------------------------------------------------------------------------- numerical


@pytest.mark.parametrize(
    ("answer", "gt", "expected"),
    [
        ("12", "12", 1.0),
        ("12 m", "12", 1.0),
        ("12.0 meters", "12 m", 1.0),
        ("1,200", "1200", 1.0),
        ("about 1,200 people", "1200", 1.0),
        ("-3.5", "-3.5", 1.0),
        ("3.5", "-3.5", 0.0),
        ("13", "12", 0.0),
        ("12.0000000001", "12", 1.0),  # inside the 1e-6 relative tolerance
        ("12.001", "12", 0.0),
        ("0", "0", 1.0),
        ("0.0000001", "0", 1.0),  # inside the 1e-6 absolute tolerance
        ("0.001", "0", 0.0),
        ("twelve", "12", 0.0),  # no digits, no credit
    ],
)
def test_numerical(answer: str, gt: str, expected: float) -> None:
    assert accuracy_reward(completion(answer), record("numerical", gt)) == expected


def test_numerical_tolerance_is_an_argument() -> None:
    assert numerical_accuracy("10.5", "10") == 0.0
    assert numerical_accuracy("10.5", "10", rel_tol=0.1) == 1.0
    assert numerical_accuracy("0.01", "0", abs_tol=0.1) == 1.0


def test_numerical_ground_truth_without_a_number_is_a_data_error() -> None:
    with pytest.raises(ValueError, match="vid-9.*holds no number"):
        accuracy_reward(completion("3"), record("numerical", "three", problem_id="vid-9"))


# ----------------------------------------------------------------------------- regression: MRA


def test_mra_thresholds_are_vsi_bench_confidences() -> None:
    assert sorted(MRA_TOLERANCES) == pytest.approx(sorted(1 - c for c in np.linspace(0.5, 0.95, 10)))


@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [
        (10.0, 10.0, 1.0),
        (9.0, 10.0, 0.9),  # relative error 0.1 passes c <= 0.9: 9 of 10 thresholds
        (11.0, 10.0, 0.9),
        (1.1, 1.0, 0.9),  # |1.1 - 1.0| is 0.10000000000000009 in floats: still 0.1
        (10.4, 10.0, 1.0),  # 0.04 <= 0.05
        (10.6, 10.0, 0.9),
        (7.0, 10.0, 0.5),  # 0.3 passes tolerances 0.30 … 0.50
        (5.0, 10.0, 0.1),  # 0.5 passes only c = 0.50
        (4.0, 10.0, 0.0),
        (-9.0, -10.0, 0.9),
        (9.0, -10.0, 0.0),
        (0.0, 0.0, 1.0),  # gt = 0: exact match only
        (0.1, 0.0, 0.0),
    ],
)
def test_mean_relative_accuracy(pred: float, gt: float, expected: float) -> None:
    assert mean_relative_accuracy(pred, gt) == pytest.approx(expected)


@settings(max_examples=200, deadline=None)
@given(st.floats(0.1, 1000.0), st.floats(-0.6, 0.6))
def test_mra_matches_the_vsi_bench_formula_away_from_thresholds(gt: float, rel: float) -> None:
    pred = gt * (1 + rel)
    error = abs(pred - gt) / gt
    thresholds = 1 - np.linspace(0.5, 0.95, 10)
    if np.min(np.abs(error - thresholds)) > 1e-6:
        assert mean_relative_accuracy(pred, gt) == pytest.approx(float(np.mean(error <= thresholds)))


def test_regression_uses_mra_on_the_answer_numbers() -> None:
    assert accuracy_reward(completion("9 m"), record("regression", "10")) == pytest.approx(0.9)
    assert accuracy_reward(completion("far"), record("regression", "10")) == 0.0
    assert regression_accuracy("1,100", "1000") == pytest.approx(0.9)


# ----------------------------------------------------------------------------- OCR


@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [
        ("hello world", "hello world", 1.0),
        ("Hello   WORLD", "hello world", 1.0),  # case and whitespace do not count
        ("hello", "hello world", 0.5),  # 1 deletion / 2 reference words
        ("hello there world", "hello world", 0.5),  # 1 insertion / 2
        ("hello word", "hello world", 0.5),  # 1 substitution / 2
        ("stop", "stop sign ahead now", 0.25),  # 3 deletions / 4
        ("a b c d e", "x", 0.0),  # WER 5, clipped
    ],
)
def test_ocr_is_one_minus_word_error_rate(pred: str, gt: str, expected: float) -> None:
    assert ocr_accuracy(pred, gt) == pytest.approx(expected)


def test_ocr_through_accuracy_reward() -> None:
    assert accuracy_reward(completion("EXIT 12"), record("OCR", "exit 12")) == 1.0


# ----------------------------------------------------------------------------- free-form: ROUGE-L


def test_rouge_l_matches_a_hand_computation() -> None:
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": 5 of 6 words each way,
    # so precision = recall = F = 5/6.
    assert free_form_accuracy("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)


def test_rouge_l_f_measure_with_unequal_lengths() -> None:
    # LCS("a red square moves", "the red square moves left") = 3; P = 3/4, R = 3/5, F = 2PR/(P+R) = 2/3.
    assert free_form_accuracy("a red square moves", "the red square moves left") == pytest.approx(2 / 3)


def test_rouge_l_ignores_case_and_punctuation() -> None:
    assert free_form_accuracy("The Cat!", "the cat") == pytest.approx(1.0)


def test_rouge_l_of_unrelated_text_is_zero() -> None:
    assert free_form_accuracy("blue sky", "red square") == 0.0


def test_rouge_l_keeps_non_ascii_words() -> None:
    assert free_form_accuracy("红色 方块", "红色 方块") == pytest.approx(1.0)
    assert free_form_accuracy("红色", "蓝色") == 0.0


def test_free_form_through_accuracy_reward() -> None:
    score = accuracy_reward(
        completion("the cat sat on the mat"), record("free-form", "the cat is on the mat")
    )
    assert score == pytest.approx(5 / 6)


def test_unknown_problem_type_names_the_record_and_the_types() -> None:
    with pytest.raises(ValueError, match=r"'vid-3'.*'yes/no'.*multiple choice"):
        accuracy_reward(completion("yes"), record("yes/no", "yes", problem_id="vid-3"))


# ----------------------------------------------------------------------------- format and length


def test_format_reward_of_a_well_formed_completion() -> None:
    assert format_reward(completion("B"), COLOURS) == 1.0


@pytest.mark.parametrize(
    "text",
    [
        "<think>a</think><think>b</think><answer>B</answer>",
        "<answer>B</answer><think>a</think>",
        "<think>a</think><answer>B</answer> done.",
        "<think>a<answer>B</answer>",
        "<think>a</think><answer>B",
        "B",
    ],
)
def test_format_reward_of_malformed_completions(text: str) -> None:
    assert format_reward(text, COLOURS) == 0.0


@pytest.mark.parametrize(
    ("think", "expected"),
    [("one two three", 1.0), ("one two", 1.0), ("one", 0.5), ("w " * 4, 1.0), ("w " * 8, 0.5), ("", 0.0)],
)
def test_length_reward_window(think: str, expected: float) -> None:
    assert LengthReward(min_words=2, max_words=4)(completion("B", think=think), COLOURS) == expected


def test_length_reward_without_think_is_zero() -> None:
    assert LengthReward(2, 4)("<answer>B</answer>", COLOURS) == 0.0


def test_length_reward_rejects_an_empty_window() -> None:
    with pytest.raises(ValueError, match="min_words <= max_words"):
        LengthReward(min_words=10, max_words=5)


# ----------------------------------------------------------------------------- registry


def shout_reward(completion: str, record: VideoQARecord) -> float:
    return 1.0 if completion.isupper() else 0.0


def test_resolve_registry_names() -> None:
    assert resolve_reward("accuracy") == ("accuracy", accuracy_reward)
    assert resolve_reward("format") == ("format", format_reward)
    assert resolve_reward("length") == ("length", REWARDS["length"])


def test_resolve_dotted_paths() -> None:
    assert resolve_reward("lightning_veripo.rewards.format_reward") == ("format", format_reward)
    assert resolve_reward(f"{__name__}.shout_reward") == ("shout_reward", shout_reward)
    name, fn = resolve_reward("lightning_veripo.rewards.LengthReward")  # a class is built with its defaults
    assert name == "length" and isinstance(fn, LengthReward)


def test_resolve_a_callable_keeps_its_name() -> None:
    assert resolve_reward(shout_reward) == ("shout_reward", shout_reward)
    assert resolve_reward(accuracy_reward)[0] == "accuracy"
    assert resolve_reward(LengthReward(1, 2))[0] == "length"


def test_resolve_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown reward 'acc'.*\['accuracy', 'format', 'length'\]"):
        resolve_reward("acc")


def test_resolve_a_bad_dotted_path() -> None:
    with pytest.raises(ValueError, match="cannot import the reward 'nowhere.reward'"):
        resolve_reward("nowhere.reward")
    with pytest.raises(ValueError, match="not a callable"):
        resolve_reward("lightning_veripo.rewards.NUMERICAL_REL_TOL")


# ----------------------------------------------------------------------------- RewardSet

TEXTS = [
    completion("B"),  # right and well formed
    "<answer>B</answer>",  # right, no reasoning
    completion("A"),  # wrong, well formed
    "no idea",
]


def test_default_reward_set_is_accuracy_plus_half_format() -> None:
    rewards = RewardSet()
    assert rewards.names == ["accuracy", "format"] and rewards.weights == [1.0, 0.5]
    components, total = rewards.score(TEXTS, [COLOURS] * 4)
    assert components["accuracy"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert components["format"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert total.tolist() == [1.5, 1.0, 0.5, 0.0]
    assert total.dtype == torch.float32 and total.shape == (4,)
    assert all(v.dtype == torch.float32 for v in components.values())


def test_reward_set_with_custom_weights() -> None:
    rewards = RewardSet(names=["accuracy", "length"], weights=[2.0, 0.25])
    short = completion("B", think="red")  # 1 word under a 32-word minimum: length 1/32
    components, total = rewards.score([short], [COLOURS])
    assert components["length"].item() == pytest.approx(1 / 32)
    assert total.item() == pytest.approx(2.0 + 0.25 / 32)


def test_reward_set_names_without_weights_weigh_one_each() -> None:
    _, total = RewardSet(names=["accuracy", "format"]).score(TEXTS[:1], [COLOURS])
    assert total.tolist() == [2.0]


def test_reward_set_of_no_completions() -> None:
    components, total = RewardSet().score([], [])
    assert total.shape == (0,) and components["accuracy"].shape == (0,)


def test_reward_set_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="2 rewards but 1 weights"):
        RewardSet(names=["accuracy", "format"], weights=[1.0])
    with pytest.raises(ValueError, match="distinct"):
        RewardSet(names=["accuracy", "lightning_veripo.rewards.accuracy_reward"])
    with pytest.raises(ValueError, match="finite"):
        RewardSet(names=["accuracy"], weights=[math.nan])
    with pytest.raises(ValueError, match="2 completions but 1 records"):
        RewardSet().score(TEXTS[:2], [COLOURS])


def test_a_raising_reward_names_itself_and_the_record() -> None:
    def broken(completion: str, record: VideoQARecord) -> float:
        raise KeyError("frames")

    with pytest.raises(RuntimeError, match=r"reward 'broken' failed on problem_id='vid-5': KeyError") as info:
        RewardSet(names=["format", broken]).score(TEXTS[:1], [record("free-form", "x", problem_id="vid-5")])
    assert isinstance(info.value.__cause__, KeyError)


def test_a_data_error_in_accuracy_is_chained() -> None:
    with pytest.raises(RuntimeError, match="'accuracy' failed on problem_id='vid-6'") as info:
        RewardSet().score(TEXTS[:1], [record("yes/no", "yes", problem_id="vid-6")])
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_reward_is_refused(bad: float) -> None:
    def unstable(completion: str, record: VideoQARecord) -> float:
        return bad

    with pytest.raises(ValueError, match=r"reward 'unstable' returned .* problem_id='q1'; must be finite"):
        RewardSet(names=[unstable]).score(TEXTS[:1], [COLOURS])


def test_a_non_number_reward_is_refused() -> None:
    def wordy(completion: str, record: VideoQARecord) -> float:
        return "high"  # type: ignore[return-value]

    with pytest.raises(TypeError, match="reward 'wordy' returned 'high'"):
        RewardSet(names=[wordy]).score(TEXTS[:1], [COLOURS])


def test_reward_set_builds_from_a_config() -> None:
    parser = ArgumentParser()
    parser.add_class_arguments(RewardSet, "rewards")
    config = {
        "rewards": {
            "names": [
                "accuracy",
                "lightning_veripo.rewards.format_reward",
                {
                    "class_path": "lightning_veripo.rewards.LengthReward",
                    "init_args": {"min_words": 2, "max_words": 4},
                },
            ],
            "weights": [1.0, 0.5, 0.1],
        }
    }
    rewards = parser.instantiate(parser.parse_object(config)).rewards
    assert rewards.names == ["accuracy", "format", "length"]
    assert rewards.weights == [1.0, 0.5, 0.1]
    _, total = rewards.score([completion("B", think="one two three")], [COLOURS])
    assert total.item() == pytest.approx(1.6)


# ----------------------------------------------------------------------------- properties

_PIECES = st.sampled_from(
    [
        "<think>",
        "</think>",
        "<answer>",
        "</answer>",
        "B",
        "(b)",
        "A or",
        " ",
        "\n",
        "1,200",
        "-3.5",
        "1e400",
        "0",
    ]
)
ARBITRARY = st.one_of(
    st.text(max_size=120), st.lists(st.one_of(_PIECES, st.text(max_size=6)), max_size=20).map("".join)
)
RECORDS = [
    COLOURS,
    record("multiple choice", "C"),
    record("numerical", "1,200"),
    record("numerical", "0"),
    record("regression", "-3.5"),
    record("regression", "0"),
    record("OCR", "EXIT 12"),
    record("free-form", "the red square moves left"),
    record("free-form", "红色 方块"),
]


def _in_unit_interval(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0


@settings(max_examples=150, deadline=None)
@given(ARBITRARY)
def test_rewards_of_arbitrary_text_are_finite_and_in_the_unit_interval(text: str) -> None:
    for rec in RECORDS:
        for fn in (accuracy_reward, format_reward, LengthReward(2, 4)):
            assert _in_unit_interval(fn(text, rec))
            assert _in_unit_interval(fn(completion(text), rec))


@settings(max_examples=150, deadline=None)
@given(ARBITRARY, ARBITRARY)
def test_text_scores_of_arbitrary_pairs_are_in_the_unit_interval(pred: str, gt: str) -> None:
    assert _in_unit_interval(ocr_accuracy(pred, gt))
    assert _in_unit_interval(free_form_accuracy(pred, gt))


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=False), st.floats(allow_nan=False))
def test_mra_of_any_floats_is_in_the_unit_interval(pred: float, gt: float) -> None:
    assert _in_unit_interval(mean_relative_accuracy(pred, gt))
