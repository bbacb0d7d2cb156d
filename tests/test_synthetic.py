"""The synthetic video-QA task: real decodable clips, valid Video-R1 records, answers readable from the pixels."""

from __future__ import annotations

import json
from pathlib import Path

import decord
import numpy as np
import pytest

from lightning_veripo.data.synthetic import COLOURS, DIRECTIONS, make_synthetic_data
from lightning_veripo.data.videoqa import validate_record

GREY = len(COLOURS)  # label of the background in `_labels`
PALETTE = np.array([*COLOURS.values(), (128, 128, 128)], dtype=np.float32)
STATIC_AREA = (56 // 4 // 2) ** 2  # static squares are side // 2 = 7 pixels wide in a 56-pixel clip


def _records(data_dir: Path, split: str = "train") -> list[dict]:
    return json.loads((data_dir / f"{split}.json").read_text())


def _task(record: dict) -> str:
    return record["problem_id"].split("-")[1]


def _answer(record: dict) -> str:
    return record["solution"].removeprefix("<answer>").removesuffix("</answer>")


def _chosen_option(record: dict) -> str:
    """The option text the solution letter points at, e.g. 'red' for 'A' in ['A. red', ...]."""
    return record["options"][ord(_answer(record)) - ord("A")].split(". ", 1)[1]


def _all_frames(path: Path) -> np.ndarray:
    reader = decord.VideoReader(str(path), num_threads=1)
    return reader.get_batch(list(range(len(reader)))).asnumpy()


def _labels(frames: np.ndarray) -> np.ndarray:
    """Each pixel's nearest palette colour (index into COLOURS, or GREY): [F, H, W]."""
    distances = ((frames[..., None, :].astype(np.float32) - PALETTE) ** 2).sum(-1)
    return distances.argmin(-1)


def _moving_colour(labels: np.ndarray) -> int:
    """The colour of the pixels that changed between the first and the last frame, at their new place.

    Static squares never change; the moving square travels farther than its own width, so where it ends up
    differs from the first frame and shows its colour.
    """
    arrived = labels[-1][labels[0] != labels[-1]]
    return int(np.bincount(arrived[arrived != GREY], minlength=len(COLOURS)).argmax())


def _counted_squares(labels: np.ndarray) -> int:
    """1 moving square + the static ones, from the area the static colours cover in any frame.

    Static squares never take the moving square's colour, and the moving square uncovers them as it passes.
    """
    moving = _moving_colour(labels)
    static = ((labels != moving) & (labels != GREY)).any(0)
    return 1 + round(int(static.sum()) / STATIC_AREA)


# ---------------------------------------------------------------------- files and records


def test_writes_mp4s_that_decord_reads_with_the_requested_frame_count_and_size(tmp_path):
    out = make_synthetic_data(tmp_path, num_train=3, num_val=2, size=64, num_frames=6, fps=6)

    videos = sorted((out / "videos").glob("*.mp4"))
    assert len(videos) == 5
    for video in videos:
        reader = decord.VideoReader(str(video), num_threads=1)
        assert len(reader) == 6
        assert reader[0].shape == (64, 64, 3)
        assert reader.get_avg_fps() == pytest.approx(6.0)


def test_writes_train_and_val_json_of_valid_video_r1_records(synthetic_dir):
    for split, size in (("train", 8), ("val", 4)):
        source = synthetic_dir / f"{split}.json"
        records = _records(synthetic_dir, split)

        assert len(records) == size
        assert len({r["problem_id"] for r in records}) == size
        assert [_task(r) for r in records] == (["colour", "direction", "count"] * 3)[:size]
        for i, raw in enumerate(records):
            record = validate_record(raw, i, source, synthetic_dir)
            assert record.path == str(synthetic_dir / raw["path"]) and not Path(raw["path"]).is_absolute()
            assert raw["solution"] == f"<answer>{_answer(raw)}</answer>"
            if record.problem_type == "multiple choice":
                assert _answer(raw) in "ABCD"[: len(record.options)]
            else:
                assert record.problem_type == "numerical" and _answer(raw) in {"1", "2", "3"}


def test_same_seed_writes_the_same_data_and_another_seed_does_not(tmp_path):
    first = make_synthetic_data(tmp_path / "a", num_train=4, num_val=2, seed=3, tasks=["colour", "count"])
    again = make_synthetic_data(tmp_path / "b", num_train=4, num_val=2, seed=3, tasks=["colour", "count"])
    other = make_synthetic_data(tmp_path / "c", num_train=4, num_val=2, seed=4, tasks=["colour", "count"])

    for split in ("train", "val"):
        assert (first / f"{split}.json").read_text() == (again / f"{split}.json").read_text()
    for rel in (r["path"] for r in _records(first)):
        assert np.array_equal(_all_frames(first / rel), _all_frames(again / rel))
    assert (first / "train.json").read_text() != (other / "train.json").read_text()


def test_unknown_task_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown synthetic task\(s\) \['weather'\]"):
        make_synthetic_data(tmp_path, num_train=1, num_val=1, tasks=["colour", "weather"])


# ---------------------------------------------------------------------- answers come from the pixels


def test_colour_answer_is_the_colour_of_the_moving_square(synthetic_dir):
    records = [
        r for split in ("train", "val") for r in _records(synthetic_dir, split) if _task(r) == "colour"
    ]
    assert len(records) == 5

    for record in records:
        labels = _labels(_all_frames(synthetic_dir / record["path"]))
        assert list(COLOURS)[_moving_colour(labels)] == _chosen_option(record), record["problem_id"]


def test_direction_answer_is_the_way_the_moving_square_travels(synthetic_dir):
    records = [
        r for split in ("train", "val") for r in _records(synthetic_dir, split) if _task(r) == "direction"
    ]
    assert len(records) == 4

    for record in records:
        labels = _labels(_all_frames(synthetic_dir / record["path"]))
        colour = _moving_colour(labels)
        (y0, x0), (y1, x1) = (np.argwhere(labels[f] == colour).mean(0) for f in (0, -1))
        dx, dy = DIRECTIONS[_chosen_option(record)]
        along, across = (x1 - x0) * dx + (y1 - y0) * dy, abs((x1 - x0) * dy) + abs((y1 - y0) * dx)
        assert along > 20 and across < 5, (record["problem_id"], x1 - x0, y1 - y0)


def test_count_answer_is_the_number_of_squares_in_the_video(synthetic_dir):
    records = [r for split in ("train", "val") for r in _records(synthetic_dir, split) if _task(r) == "count"]
    assert len(records) == 3

    for record in records:
        labels = _labels(_all_frames(synthetic_dir / record["path"]))
        assert _counted_squares(labels) == int(_answer(record)), record["problem_id"]


def test_count_answer_is_readable_from_the_frames_for_every_clip(tmp_path):
    out = make_synthetic_data(tmp_path, num_train=60, num_val=0, seed=0, tasks=["count"])

    wrong = []
    for record in _records(out):
        counted = _counted_squares(_labels(_all_frames(out / record["path"])))
        if counted != int(_answer(record)):
            wrong.append((record["problem_id"], _answer(record), counted))
    assert not wrong


# ---------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_train": 0}, r"num_train=0 must be an integer >= 1"),
        ({"num_train": -3}, r"num_train=-3 must be an integer >= 1"),
        ({"num_val": -1}, r"num_val=-1 must be an integer >= 0"),
        ({"size": 16}, r"size=16 must be an integer >= 32"),
        ({"size": 0}, r"size=0 must be an integer >= 32"),
        ({"num_frames": 1}, r"num_frames=1 must be an integer >= 2"),
        ({"fps": 0}, r"fps=0 must be an integer >= 1"),
        ({"num_train": 2.5}, r"num_train=2.5 must be an integer >= 1"),
        ({"tasks": []}, r"tasks=\[\] must be a non-empty list"),
        ({"tasks": "count"}, r"tasks='count' must be a non-empty list"),
    ],
)
def test_out_of_range_arguments_raise_a_value_error_naming_them_before_writing(tmp_path, options, message):
    out = tmp_path / "data"
    with pytest.raises(ValueError, match=message):
        make_synthetic_data(out, **{"num_train": 2, "num_val": 1, **options})
    assert not out.exists()


def test_smallest_allowed_sizes_write_readable_data(tmp_path):
    out = make_synthetic_data(tmp_path, num_train=1, num_val=0, size=32, num_frames=2, fps=1, tasks=["count"])

    assert len(_records(out)) == 1 and _records(out, "val") == []
    assert _all_frames(out / _records(out)[0]["path"]).shape == (2, 32, 32, 3)


def test_a_size_whose_clips_decord_cannot_read_is_refused_after_the_first_clip(tmp_path):
    # decord returns 48-pixel-wide mpeg4 frames with a wrong channel count (so do 8, 12, 16, 24 and 72)
    with pytest.raises(
        ValueError, match=r"size=48 writes clips that decord cannot read back.*choose another size"
    ):
        make_synthetic_data(tmp_path, num_train=2, num_val=1, size=48)
    assert not list((tmp_path / "videos").glob("*.mp4"))


def test_command_accepts_dashed_flags_and_reports_a_bad_count(tmp_path):
    from lightning_veripo.cli import main

    with pytest.raises(ValueError, match=r"num_train=0 must be an integer >= 1"):
        main(["make-synthetic-data", str(tmp_path / "bad"), "--num-train", "0", "--num-val", "1"])
    assert main(["make-synthetic-data", str(tmp_path / "ok"), "--num-train=1", "--num-val", "0"]) == 0
    assert len(_records(tmp_path / "ok")) == 1


@pytest.fixture(scope="module")
def combined_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_data(
        tmp_path_factory.mktemp("combined"), num_train=12, num_val=2, num_test=4, tasks=["colour_direction"]
    )


def _direction_of(labels: np.ndarray, colour: int) -> str:
    (y0, x0), (y1, x1) = (np.argwhere(labels[f] == colour).mean(0) for f in (0, -1))
    return max(DIRECTIONS, key=lambda d: (x1 - x0) * DIRECTIONS[d][0] + (y1 - y0) * DIRECTIONS[d][1])


def test_colour_direction_answer_needs_both_observations_from_the_pixels(combined_dir):
    records = [r for split in ("train", "val", "test") for r in _records(combined_dir, split)]
    assert len(records) == 18 and {_task(r) for r in records} == {"colour_direction"}
    right_letters = set()
    for record in records:
        labels = _labels(_all_frames(combined_dir / record["path"]))
        colour = _moving_colour(labels)
        seen = (list(COLOURS)[colour], _direction_of(labels, colour))
        assert _chosen_option(record) == f"{seen[0]}, moving {seen[1]}", record["problem_id"]
        contents = [o.split(". ", 1)[1].split(", moving ") for o in record["options"]]
        shared = sorted((c == seen[0]) + (d == seen[1]) for c, d in contents)
        # the right option, one sharing only the colour, one only the direction, one neither: one observation
        # alone leaves two candidates
        assert shared == [0, 1, 1, 2], record["options"]
        assert sum(c == seen[0] and d != seen[1] for c, d in contents) == 1
        right_letters.add(_answer(record))
    assert len(right_letters) > 2, "the right option's position is shuffled"


def test_every_record_carries_a_chain_of_thought_that_concludes_its_solution(combined_dir, synthetic_dir):
    records = _records(combined_dir) + _records(synthetic_dir)
    for record in records:
        process = record["process"]
        assert process.endswith(f"the answer is {_answer(record)}."), process
        if record["options"]:
            assert all(part in process for part in _chosen_option(record).split(", moving ")), process
        else:
            assert f"I count {_answer(record)} squares" in process


def test_num_test_writes_a_third_split_and_leaves_train_and_val_unchanged(tmp_path, combined_dir):
    without = make_synthetic_data(tmp_path / "a", num_train=12, num_val=2, tasks=["colour_direction"])
    assert not (without / "test.json").exists()
    assert _records(without) == _records(combined_dir) and _records(without, "val") == _records(
        combined_dir, "val"
    )
    test = _records(combined_dir, "test")
    assert len(test) == 4 and all(r["problem_id"].startswith("test-") for r in test)
    assert {r["path"] for r in test}.isdisjoint({r["path"] for r in _records(combined_dir)})
