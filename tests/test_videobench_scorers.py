"""The benchmark scorers against scores computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest

from lightning_veripo.videobench.items import MULTIPLE_CHOICE, NUMERICAL, BenchItem
from lightning_veripo.videobench.prompts import ClipSampling, render, subtitles_at
from lightning_veripo.videobench.scorers import chosen_option, read_number, score_item, summarize

OPTIONS = ("two chairs", "three tables", "a lamp")


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("B", "B"),
        ("(b)", "B"),
        ("B.", "B"),
        ("B. three tables", "B"),
        ("(B) three tables", "B"),
        ("three tables", "B"),
        ("Three Tables.", "B"),
        ("A lamp", "C"),  # the option text wins over reading "A" as a letter
        ("C: a lamp", "C"),
        ("B. two chairs", None),  # B's letter with A's text names no option
        ("D", None),  # not an offered letter
        ("four sofas", None),
        ("", None),
    ],
)
def test_a_multiple_choice_answer_names_its_option_by_letter_letter_and_text_or_text(answer, letter):
    assert chosen_option(answer, OPTIONS) == letter


def test_numbers_are_read_from_digits_or_words():
    assert read_number("about 1,200 m") == 1200.0
    assert read_number("three") == 3.0
    assert read_number("none") is None


def _item(kind, answer, task="t", options=()):
    return BenchItem("q", "?", kind, answer, task, "v.mp4", options)


def test_vsibench_numerical_answers_score_mean_relative_accuracy():
    item = _item(NUMERICAL, "4", "object_counting")
    # |3 - 4| / 4 = 0.25 <= 1 - c for c in {0.50, 0.55, 0.60, 0.65, 0.70, 0.75}: 6 of 10 thresholds
    assert score_item("vsibench", item, "<think>..</think><answer>3</answer>") == ("3.0", pytest.approx(0.6))
    # |4.3 - 4| / 4 = 0.075 <= 1 - c for c up to 0.90 (0.10): 9 of 10
    assert score_item("vsibench", item, "4.3")[1] == pytest.approx(0.9)
    assert score_item("vsibench", item, "four")[1] == 1.0
    # |9 - 4| / 4 = 1.25: no threshold
    assert score_item("vsibench", item, "9")[1] == 0.0
    assert score_item("vsibench", item, "<answer>many</answer>") == (None, 0.0)


def test_videommmu_open_numbers_match_to_two_decimals_and_text_by_normalised_equality():
    assert score_item("videommmu", _item(NUMERICAL, "1889"), "1889.001")[1] == 1.0  # 1889.00 = 1889.00
    assert score_item("videommmu", _item(NUMERICAL, "3.14"), "3.146")[1] == 0.0  # 3.15 != 3.14
    assert score_item("videommmu", _item("open", "Van Gogh"), "van gogh.")[1] == 1.0


def test_video_r1_files_are_scored_by_the_rewards_of_their_problem_type():
    assert score_item("video_r1", _item("numerical", "3"), "<answer>3.0</answer>")[1] == 1.0
    # regression = MRA: |5 - 4| / 4 = 0.25 -> 6 of 10
    assert score_item("video_r1", _item("regression", "4"), "<answer>5</answer>")[1] == pytest.approx(0.6)
    assert (
        score_item("video_r1", _item(MULTIPLE_CHOICE, "B", options=OPTIONS), "<answer>B</answer>")[1] == 1.0
    )


def _rows(*rows):
    return [{"task": t, "kind": k, "groups": g, "score": s} for t, k, g, s in rows]


def test_vsibench_headline_averages_rel_direction_first_and_prints_both_other_conventions():
    mc, na = MULTIPLE_CHOICE, NUMERICAL
    rows = _rows(
        ("object_rel_direction_easy", mc, {}, 1.0),
        ("object_rel_direction_easy", mc, {}, 0.0),  # easy: 0.5
        ("object_rel_direction_medium", mc, {}, 1.0),  # medium: 1.0
        ("object_rel_direction_hard", mc, {}, 0.0),  # hard: 0.0
        ("route_planning", mc, {}, 1.0),  # route_planning: 1.0
        ("object_counting", na, {}, 0.6),
        ("object_counting", na, {}, 0.2),  # counting: 0.4
    )
    out = summarize("vsibench", rows)
    # rel_direction = (0.5 + 1.0 + 0.0) / 3 = 0.5; official = (0.5 + 1.0 + 0.4) / 3 = 0.6333...
    assert out["task_scores"] == pytest.approx(
        {"object_rel_direction": 0.5, "route_planning": 1.0, "object_counting": 0.4}
    )
    assert out["headline"]["value"] == pytest.approx(1.9 / 3)
    # Video-R1: multiple-choice accuracy 3 / 5 = 0.6, numerical MRA (0.6 + 0.2) / 2 = 0.4
    assert out["conventions"]["video_r1"] == pytest.approx(
        {"multiple_choice_accuracy": 0.6, "numerical_mra": 0.4}
    )
    # VerIPO's item mean: (1 + 0 + 1 + 0 + 1 + 0.6 + 0.2) / 7 = 3.8 / 7
    assert out["conventions"]["veripo_item_mean"] == pytest.approx(3.8 / 7)
    assert out["tables"]["task"]["object_rel_direction_easy"] == {"n": 2, "score": 0.5}


def test_mvbench_headline_is_the_mean_of_task_accuracies_and_others_the_item_mean():
    rows = _rows(("a", MULTIPLE_CHOICE, {}, 1.0), ("b", MULTIPLE_CHOICE, {}, 0.0), ("b", MULTIPLE_CHOICE, {}, 0.0),
                 ("b", MULTIPLE_CHOICE, {}, 1.0))  # fmt: skip
    # tasks: a = 1/1, b = 1/3; mean = (1 + 1/3) / 2 = 2/3; item mean = 2/4
    assert summarize("mvbench", rows)["headline"]["value"] == pytest.approx(2 / 3)
    assert summarize("mvbench", rows)["conventions"]["item_mean"] == 0.5
    grouped = _rows(("x", MULTIPLE_CHOICE, {"duration": "short"}, 1.0), ("y", MULTIPLE_CHOICE, {"duration": "long"}, 0.0),
                    ("y", MULTIPLE_CHOICE, {"duration": "long"}, 1.0))  # fmt: skip
    out = summarize("videomme", grouped)
    assert out["headline"]["value"] == pytest.approx(2 / 3)  # 2 of 3 questions
    assert out["tables"]["duration"] == {"long": {"n": 2, "score": 0.5}, "short": {"n": 1, "score": 1.0}}


def test_a_benchmark_without_numerical_questions_reports_their_mra_as_nan():
    out = summarize("vsibench", _rows(("route_planning", MULTIPLE_CHOICE, {}, 1.0)))
    assert math.isnan(out["conventions"]["video_r1"]["numerical_mra"])


def test_clip_sampling_takes_frames_only_within_the_bounds():
    # 25 fps, 1.0 .. 6.5 s -> frames 25 .. 162; 4 evenly spaced over 138 frames: 0, 45.67, 91.33, 137 -> rounded
    sampling = ClipSampling(num_frames=4, start=1.0, end=6.5)
    assert sampling.frame_indices(250, 25.0) == [25, 25 + 46, 25 + 91, 25 + 137]


def test_videomme_subtitles_are_the_cues_shown_at_the_sampled_frames(tmp_path):
    srt = tmp_path / "v.srt"
    srt.write_text(
        "1\n00:00:00,000 --> 00:00:01,000\n<font color=\"white\">first</font>\n\n"
        "2\n00:00:01,000 --> 00:00:03,000\nsecond\n\n3\n00:00:04,000 --> 00:00:05,000\nthird\n"
    )  # fmt: skip
    # frames 0, 44, 87, 131 at 25 fps: 0.00 s (first), 1.76 s (second), 3.48 s (none), 5.24 s (none)
    assert subtitles_at(srt, [0, 44, 87, 131], 25.0) == "first\nsecond"
    assert subtitles_at(tmp_path / "missing.srt", [0], 25.0) == ""
    item = BenchItem("q", "What happens?", MULTIPLE_CHOICE, "A", "t", "v.mp4", ("x", "y"))
    assert render(item, "plain", "").startswith(
        "This video's subtitles are listed below:\nNo subtitles available\n"
    )


def test_each_template_asks_for_the_options_by_letter():
    item = BenchItem("q", "What happens?", MULTIPLE_CHOICE, "A", "t", "v.mp4", ("x", "y"))
    assert render(item, "plain", None) == (
        "What happens?\nOptions:\nA. x\nB. y\nAnswer with the option's letter from the given choices directly."
    )
    assert render(item, "video_r1", None).startswith("What happens?Options:\nA. x\nB. y\n\nPlease think")
    assert "A. x\nB. y" in render(item, "veripo", None) and "<answer>" in render(item, "veripo", None)
