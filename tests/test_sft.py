"""The supervised warm start's targets: Video-R1's chain of thought when a record has one, and answer noise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_veripo.data.videoqa import VideoQADataset, VideoQAError
from lightning_veripo.parsing import extract_answer, extract_think
from lightning_veripo.records import VideoQARecord
from lightning_veripo.sft import SFTModule, other_answer, reference_completion

OPTIONS = ("A. red", "B. green", "C. blue", "D. yellow")


def _choice(pid: str = "q", answer: str = "C", process: str | None = None) -> VideoQARecord:
    return VideoQARecord(pid, "What colour?", "video", "multiple choice", f"<answer>{answer}</answer>",
                         "v.mp4", OPTIONS, process)  # fmt: skip


def _number(pid: str = "n", answer: str = "2") -> VideoQARecord:
    return VideoQARecord(pid, "How many?", "video", "numerical", f"<answer>{answer}</answer>", "v.mp4")


def test_the_target_is_the_records_process_and_solution_when_it_has_one() -> None:
    record = _choice(process="The square is blue, so the answer is C.")
    assert reference_completion(record) == (
        "<think>The square is blue, so the answer is C.</think><answer>C</answer>"
    )


def test_without_process_the_target_states_the_option_the_solution_names() -> None:
    assert reference_completion(_choice()) == (
        "<think>In the video I see blue, so the answer is C.</think><answer>C</answer>"
    )
    assert (
        reference_completion(_number())
        == "<think>Looking at the video, the answer is 2.</think><answer>2</answer>"
    )


def test_a_replaced_answer_keeps_the_reasoning() -> None:
    record = _choice(process="The square is blue, so the answer is C.")
    assert reference_completion(record, "B") == (
        "<think>The square is blue, so the answer is C.</think><answer>B</answer>"
    )


def test_answer_noise_zero_gives_the_reference_targets_and_one_gives_only_wrong_answers() -> None:
    records = [_choice(str(i), "ABCD"[i % 4]) for i in range(40)] + [_number(f"n{i}", "2") for i in range(20)]
    clean = SFTModule.__new__(SFTModule)
    clean.answer_noise, clean.seed = 0.0, 0
    assert clean.targets(records, step=3) == [reference_completion(r) for r in records]
    noisy = SFTModule.__new__(SFTModule)
    noisy.answer_noise, noisy.seed = 1.0, 0
    for record, target in zip(records, noisy.targets(records, step=3), strict=True):
        truth = extract_answer(record.solution)
        assert extract_think(target) == extract_think(reference_completion(record))
        answer = extract_answer(target)
        assert answer != truth
        assert answer in "ABCD" if record.options else answer in {"1", "3"}


def test_answer_noise_replaces_its_share_of_targets_the_same_way_for_the_same_seed_and_step() -> None:
    records = [_choice(str(i), "ABCD"[i % 4]) for i in range(2000)]
    module = SFTModule.__new__(SFTModule)
    module.answer_noise, module.seed = 0.3, 7
    first = module.targets(records, step=5)
    assert first == module.targets(records, step=5)
    assert first != module.targets(records, step=6)
    replaced = sum(
        extract_answer(t) != extract_answer(r.solution) for t, r in zip(first, records, strict=True)
    )
    assert abs(replaced / len(records) - 0.3) < 0.05  # binomial sd 0.01


def test_other_answer_has_nothing_to_offer_for_free_text_or_a_single_option() -> None:
    import random

    rng = random.Random(0)
    free = VideoQARecord("f", "What?", "video", "free-form", "<answer>a dog</answer>", "v.mp4")
    single = VideoQARecord(
        "s", "Which?", "video", "multiple choice", "<answer>A</answer>", "v.mp4", ("A. x",)
    )
    assert other_answer(free, rng) is None and other_answer(single, rng) is None
    assert {other_answer(_number(answer="0"), rng) for _ in range(20)} == {"1"}


def test_answer_noise_outside_zero_to_one_is_refused(backbone) -> None:
    with pytest.raises(ValueError, match=r"answer_noise=1.5 must lie in \[0, 1\]"):
        SFTModule(backbone, answer_noise=1.5)


def test_video_r1_process_is_read_from_the_file_and_checked(tmp_path: Path, synthetic_dir: Path) -> None:
    record = json.loads((synthetic_dir / "train.json").read_text())[0]
    record["path"] = str((synthetic_dir / record["path"]).absolute())
    (tmp_path / "ok.json").write_text(json.dumps([dict(record, process="I see it, so the answer is A.")]))
    assert VideoQADataset(tmp_path / "ok.json").records[0].process == "I see it, so the answer is A."
    (tmp_path / "bad.json").write_text(json.dumps([dict(record, process=["not", "text"])]))
    with pytest.raises(VideoQAError, match=r"\['process'\] have the wrong type"):
        VideoQADataset(tmp_path / "bad.json")
