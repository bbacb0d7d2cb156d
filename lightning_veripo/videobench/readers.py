"""Readers for the video benchmarks' own released files: each turns its benchmark's schema into `BenchItem`s.

Every reader says in its docstring where its schema comes from; each names the file, record and field of a
bad input. `Benchmark` holds the files and the official variant to read (subtitles, clip bounds,
question-only clips) as explicit settings.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lightning_veripo.data.videoqa import validate_record
from lightning_veripo.rewards import ground_truth
from lightning_veripo.videobench.items import (
    LETTERS,
    MULTIPLE_CHOICE,
    NUMERICAL,
    BenchItem,
    BenchmarkError,
    Where,
    read_json_object,
    read_table,
    unletter,
    video_file,
)

BenchmarkName = Literal[
    "vsibench", "vsibench_debiased", "mmvu", "videommmu", "videomme", "mvbench", "tempcompass", "videoholmes",
    "video_r1",
]  # fmt: skip


@dataclass
class Benchmark:
    """Which benchmark, its files, and which of its official variants.

    Args:
        name: the benchmark (its reader and scorer).
        path: the released annotation file (MVBench: its `json/` folder or one task's file).
        video_dir: the folder the released videos were unpacked into (default: the annotation file's folder).
        subtitles: Video-MME's "w/ subs" variant: the subtitles at the sampled frames go into the prompt.
        subtitle_dir: where Video-MME's `<videoID>.srt` files are (default: `video_dir/../subtitle`).
        clip_bounds: MVBench: sample frames only within a question's `start`..`end` seconds where it gives
            them (the official evaluation); False reads the whole video.
        question_only: Video-MMMU Adaptation's question-only clips (`question_only/<id>_image.mp4`) instead
            of the lecture video.
        track: Video-MMMU's track (Perception, Comprehension, Adaptation); default: the annotation file's
            folder name, as the hub release lays it out.
        limit: read only the first `limit` questions (a development slice); None reads all.
    """

    name: BenchmarkName
    path: str
    video_dir: str | None = None
    subtitles: bool = False
    subtitle_dir: str | None = None
    clip_bounds: bool = True
    question_only: bool = False
    track: Literal["Perception", "Comprehension", "Adaptation"] | None = None
    limit: int | None = None

    def videos(self) -> Path:
        return Path(self.video_dir) if self.video_dir else Path(self.path).parent

    def variant(self) -> dict[str, object]:
        """The settings this benchmark's score depends on (printed with the score, stored in the JSON)."""
        out: dict[str, object] = {}
        if self.name == "videomme":
            out["subtitles"] = self.subtitles
        if self.name == "mvbench":
            out["clip_bounds"] = self.clip_bounds
        if self.name == "videommmu":
            out.update(track=self.track or Path(self.path).parent.name, question_only=self.question_only)
        if self.limit is not None:
            out["limit"] = self.limit
        return out


VSI_MULTIPLE_CHOICE = (
    "object_rel_direction_easy", "object_rel_direction_medium", "object_rel_direction_hard",
    "object_rel_distance", "route_planning", "obj_appearance_order",
)  # fmt: skip
VSI_NUMERICAL = ("object_abs_distance", "object_counting", "object_size_estimation", "room_size_estimation")


def read_vsibench(bench: Benchmark) -> list[BenchItem]:
    """VSI-Bench (nyu-visionx/VSI-Bench on the hub: `test.jsonl`; the debiased split `test_debiased.parquet`).

    Schema (the hub dataset, its `create_pq.py`, and lmms-eval's `tasks/vsibench/utils.py`): `id`, `dataset`
    (arkitscenes, scannet, scannetpp), `scene_name`, `question_type` (6 multiple-choice, 4 numerical types),
    `question`, `options` (lettered "A. ..." texts; empty for numerical types), `ground_truth` (the letter,
    or the number as text); the Parquet files add `pruned` (removed by Iterative Bias Pruning), and
    `vsibench_debiased` leaves out every row it marks. Videos (the release's `<dataset>.zip` files unpacked):
    `<video_dir>/<dataset>/<scene_name>.mp4`.
    """
    items = []
    for _, raw, where in _rows(bench):
        if bench.name == "vsibench_debiased" and raw.get("pruned") is True:
            continue
        kind_of = where.get("question_type")
        if kind_of not in VSI_MULTIPLE_CHOICE + VSI_NUMERICAL:
            raise where.error(
                "question_type", f"is {kind_of!r}, not one of {list(VSI_MULTIPLE_CHOICE + VSI_NUMERICAL)}"
            )
        video = video_file(
            bench.videos(), f"{where.get('dataset')}/{where.get('scene_name')}.mp4", where, "scene_name"
        )
        ident = str(where.get("id", (str, int)))
        if kind_of in VSI_MULTIPLE_CHOICE:
            options = unletter(where.text_list("options"), where, "options")
            answer, kind = where.letter("ground_truth", options), MULTIPLE_CHOICE
        else:
            options, answer, kind = (), where.number("ground_truth"), NUMERICAL
        items.append(BenchItem(ident, where.get("question"), kind, answer, kind_of, video, options,
                               {"dataset": raw["dataset"]}))  # fmt: skip
    return items


def read_mmvu(bench: Benchmark) -> list[BenchItem]:
    """MMVU's multiple-choice validation questions (yale-nlp/MMVU, `validation.json`).

    Schema (the hub release and its repository's evaluation code): `id`, `question`, `choices` (an object
    letter -> text, A-E), `answer` (the letter for multiple choice), `question_type` ("multiple-choice" or
    "open-ended"; open-ended questions need an LLM judge and are left out, as Video-R1 evaluates MMVU),
    `video` (a hub URL `.../resolve/main/videos/<subject>/<n>.mp4`; lmms-eval's copy names it `video_path`),
    `metadata.subject`. Videos: `<video_dir>/videos/<subject>/<n>.mp4`, the path the URL names.
    """
    items = []
    for _, raw, where in _rows(bench):
        if where.get("question_type") != "multiple-choice":
            continue
        choices = where.get("choices", dict)
        keys = [k for k in LETTERS if str(choices.get(k, "")).strip()]
        if not keys or keys != list(LETTERS[: len(keys)]):
            raise where.error("choices", f"should map A, B, ... to option texts, got {choices!r}")
        options = tuple(str(choices[k]).strip() for k in keys)
        name = "video" if "video" in raw else "video_path"
        location = where.get(name)
        relative = location.split("/resolve/main/", 1)[-1] if "://" in location else location
        subject = (raw.get("metadata") or {}).get("subject") or Path(relative).parent.name
        video = video_file(bench.videos(), relative, where, name)
        items.append(BenchItem(str(where.get("id", (str, int))), where.get("question"), MULTIPLE_CHOICE,
                               where.letter("answer", options), subject, video, options))  # fmt: skip
    return items


VIDEOMMMU_DISCIPLINES = {
    "Art": ("Art", "Art_Theory", "Design", "Music"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Humanities": ("History", "Literature", "Sociology", "Psychology"),
    "Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                    "Energy_and_Power", "Materials", "Mechanical_Engineering"),
    "Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine", "Pharmacy",
                 "Public_Health"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
}  # fmt: skip


def read_videommmu(bench: Benchmark) -> list[BenchItem]:
    """Video-MMMU (lmms-lab/VideoMMMU: one Parquet file per track, `<Track>/test-00000-of-00001.parquet`).

    Schema (the hub dataset and lmms-eval's `tasks/videommmu/utils.py`): `id` ("<split>_<Subject>_<n>"),
    `question`, `options` (texts, lettered or not), `answer` (a letter for multiple choice, the value for
    open questions), `question_type` ("multiple-choice", else open). Videos:
    `<video_dir>/<discipline>/<id>.mp4` (the discipline folder of the id's subject); the question-only
    variant: `<video_dir>/question_only/<id>_image.mp4`. Open questions with a numeric answer are scored
    by the number (to 2 decimals, as MMMU does), others by the normalised text.
    """
    track = bench.track or Path(bench.path).parent.name
    items = []
    for _, raw, where in _rows(bench):
        ident = where.get("id")
        m = re.fullmatch(r"[^_]+_(.+)_\d+", ident)
        subject = m.group(1) if m else ""
        discipline = next((d for d, subjects in VIDEOMMMU_DISCIPLINES.items() if subject in subjects), None)
        if discipline is None:
            raise where.error("id", f"{ident!r} should be <split>_<Subject>_<n> with a Video-MMMU subject")
        relative = f"question_only/{ident}_image.mp4" if bench.question_only else f"{discipline}/{ident}.mp4"
        video = video_file(bench.videos(), relative, where, "id")
        groups = {"track": track, "discipline": discipline}
        if raw.get("question_type") == "multiple-choice":
            options = unletter(where.text_list("options"), where, "options")
            items.append(BenchItem(ident, where.get("question"), MULTIPLE_CHOICE, where.letter("answer", options),
                                   subject, video, options, groups))  # fmt: skip
            continue
        answer = str(where.get("answer", (str, int, float)))
        kind = NUMERICAL if _is_number(answer) else "open"
        items.append(BenchItem(ident, where.get("question"), kind, answer, subject, video, (), groups))
    return items


def read_videomme(bench: Benchmark) -> list[BenchItem]:
    """Video-MME (lmms-lab/Video-MME: `videomme/test-00000-of-00001.parquet`, videos in `data/`).

    Schema (the hub dataset card): `video_id`, `duration` (short, medium, long), `domain`, `sub_category`,
    `url`, `videoID`, `question_id`, `task_type`, `question`, `options` (4 lettered texts), `answer` (the
    letter). Videos: `<video_dir>/<videoID>.mp4`; subtitles (the "w/ subs" variant):
    `<subtitle_dir>/<videoID>.srt`; a video without one gets "No subtitles available", as the official
    evaluation does.
    """
    subtitle_dir = Path(bench.subtitle_dir) if bench.subtitle_dir else bench.videos().parent / "subtitle"
    items = []
    for _, _raw, where in _rows(bench):
        video_id = where.get("videoID")
        options = unletter(where.text_list("options"), where, "options")
        srt = subtitle_dir / f"{video_id}.srt"
        groups = {k: str(where.get(k)) for k in ("duration", "domain", "sub_category")}
        items.append(BenchItem(where.get("question_id"), where.get("question"), MULTIPLE_CHOICE,
                               where.letter("answer", options), where.get("task_type"),
                               video_file(bench.videos(), f"{video_id}.mp4", where, "videoID"), options, groups,
                               subtitles=str(srt) if bench.subtitles else None))  # fmt: skip
    return items


# MVBench's video folders per task, as its hub release (OpenGVLab/MVBench, `video/`) lays them out.
MVBENCH_FOLDERS = {
    "action_sequence": "star/Charades_v1_480", "action_prediction": "star/Charades_v1_480",
    "action_antonym": "ssv2_video", "fine_grained_action": "Moments_in_Time_Raw/videos",
    "unexpected_action": "FunQA_test/test", "object_existence": "clevrer/video_validation",
    "object_interaction": "star/Charades_v1_480", "object_shuffle": "perception/videos",
    "moving_direction": "clevrer/video_validation", "action_localization": "sta/sta_video",
    "scene_transition": "scene_qa/video", "action_count": "perception/videos",
    "moving_count": "clevrer/video_validation", "moving_attribute": "clevrer/video_validation",
    "state_change": "perception/videos", "fine_grained_pose": "nturgbd", "character_order": "perception/videos",
    "egocentric_navigation": "vlnqa", "episodic_reasoning": "tvqa/frames_fps3_hq",
    "counterfactual_inference": "clevrer/video_validation",
}  # fmt: skip


def read_mvbench(bench: Benchmark) -> list[BenchItem]:
    """MVBench (OpenGVLab/MVBench: `json/<task>.json` per task, videos under `video/`).

    Schema (the hub release; its `json/` files and the task -> folder table of its evaluation notebook):
    each task file is a JSON list of `video`, `question`, `candidates` (option texts), `answer` (the
    correct candidate's text) and, for clipped tasks, `start` / `end` in seconds. Videos:
    `<video_dir>/<task folder>/<video>` (MVBENCH_FOLDERS). `path` is the `json/` folder (all tasks) or one
    task's file. A task whose videos are frame folders (episodic_reasoning) is refused by name.
    """
    source = Path(bench.path)
    files = sorted(source.glob("*.json")) if source.is_dir() else [source]
    if not files:
        raise BenchmarkError(f"{source}: no MVBench task files (<task>.json) in this folder")
    items: list[BenchItem] = []
    for file in files:
        task = file.stem
        if task not in MVBENCH_FOLDERS:
            raise BenchmarkError(
                f"{file}: {task!r} is not an MVBench task; expected one of {sorted(MVBENCH_FOLDERS)}"
            )
        for index, raw in enumerate(read_table(file)):
            where = Where(file, f"#{index}", raw)
            options = tuple(where.text_list("candidates"))
            answer = where.get("answer")
            if answer not in options:
                raise where.error("answer", f"{answer!r} is not one of the candidates {list(options)}")
            relative = f"{MVBENCH_FOLDERS[task]}/{where.get('video')}"
            if (bench.videos() / relative).is_dir():
                raise where.error("video", f"{relative} is a folder of frames; only video files are read")
            start = end = None
            if bench.clip_bounds and "start" in raw and "end" in raw:
                start, end = float(where.get("start", (int, float))), float(where.get("end", (int, float)))
                if not 0 <= start < end:
                    raise where.error("end", f"should be after start ({start} .. {end} seconds)")
            video = video_file(bench.videos(), relative, where, "video")
            items.append(BenchItem(f"{task}/{index}", where.get("question"), MULTIPLE_CHOICE,
                                   LETTERS[options.index(answer)], task, video, options, start=start, end=end))  # fmt: skip
    return items[: bench.limit] if bench.limit is not None else items


def read_tempcompass(bench: Benchmark) -> list[BenchItem]:
    """TempCompass's multi-choice task (llyx97/TempCompass, `questions/multi-choice.json`).

    Schema (the repository's file): an object video_id -> temporal aspect (action, speed, direction, order,
    attribute_change) -> a list of `question` (the question, then one "A. text" line per option) and
    `answer` ("B. text"). Videos: `<video_dir>/<video_id>.mp4`. Item ids: `<video_id>/<aspect>/<i>`.
    """
    source = Path(bench.path)
    items = []
    for video_id, aspects in read_json_object(source).items():
        if not isinstance(aspects, dict):
            raise BenchmarkError(f"{source} video {video_id!r}: expected an object aspect -> questions")
        for aspect, questions in aspects.items():
            if not isinstance(questions, list):
                raise BenchmarkError(
                    f"{source} video {video_id!r} aspect {aspect!r}: expected a list of questions"
                )
            for i, raw in enumerate(questions):
                where = Where(source, f"{video_id}/{aspect}/{i}", raw)
                stem, *lines = [line for line in where.get("question").split("\n") if line.strip()]
                if len(lines) < 2:
                    raise where.error("question", "should end with one 'A. text' line per option")
                options = unletter(lines, where, "question")
                answer = where.get("answer")
                letter = (
                    where.letter("answer", options)
                    if len(answer) <= 3
                    else _letter_prefix(answer, options, where)
                )
                video = video_file(bench.videos(), f"{video_id}.mp4", where, "video_id")
                items.append(
                    BenchItem(
                        f"{video_id}/{aspect}/{i}", stem, MULTIPLE_CHOICE, letter, aspect, video, options
                    )
                )
    return items[: bench.limit] if bench.limit is not None else items


def read_videoholmes(bench: Benchmark) -> list[BenchItem]:
    """Video-Holmes (TencentARC/Video-Holmes: `test_Video-Holmes.json`, videos in `videos_cropped/`).

    Schema (the hub release and lmms-eval's `tasks/video_holmes/utils.py`): a JSON list of `video ID`,
    `Question ID`, `Question Type` (SR, IMC, TCI, TA, MHR, PAR, CTI), `Question`, `Options` (an object
    letter -> text, A-F), `Answer` (the letter). Videos: `<video_dir>/<video ID>.mp4`.
    """
    items = []
    for _, _raw, where in _rows(bench):
        choices = where.get("Options", dict)
        keys = sorted(choices)
        if keys != list(LETTERS[: len(keys)]) or not all(isinstance(choices[k], str) for k in keys):
            raise where.error("Options", f"should map A, B, ... to option texts, got {choices!r}")
        options = tuple(choices[k].strip() for k in keys)
        video = video_file(bench.videos(), f"{where.get('video ID')}.mp4", where, "video ID")
        items.append(BenchItem(str(where.get("Question ID", (str, int))), where.get("Question"), MULTIPLE_CHOICE,
                               where.letter("Answer", options), where.get("Question Type"), video, options))  # fmt: skip
    return items


def read_video_r1(bench: Benchmark) -> list[BenchItem]:
    """Video-R1's evaluation files (`eval_<bench>.json` of the Video-R1 repository's evaluation data).

    Schema: the training records' (lightning_veripo.data.videoqa): `problem_id`, `problem`, `data_type`,
    `problem_type`, `options` ("A. text"), `solution` ("<answer>B</answer>"), `path` (relative to
    `video_dir`), and optionally `data_source`, which the per-type table breaks down by. Validated by the
    training reader, so its errors are the same.
    """
    items = []
    for index, raw, where in _rows(bench):
        record = validate_record(raw, index, Path(bench.path), bench.videos())
        options = unletter(list(record.options), where, "options") if record.options else ()
        answer = ground_truth(record)
        if record.problem_type == MULTIPLE_CHOICE:
            answer = (
                where.letter("solution", options, answer)
                if len(answer) <= 3
                else _letter_prefix(answer, options, where)
            )
        groups = {"data_source": str(raw["data_source"])} if raw.get("data_source") else {}
        items.append(BenchItem(record.problem_id, record.problem, record.problem_type, answer, record.problem_type,
                               str(record.path), options, groups))  # fmt: skip
    return items


READERS: dict[str, Callable[[Benchmark], list[BenchItem]]] = {
    "vsibench": read_vsibench, "vsibench_debiased": read_vsibench, "mmvu": read_mmvu,
    "videommmu": read_videommmu, "videomme": read_videomme, "mvbench": read_mvbench,
    "tempcompass": read_tempcompass, "videoholmes": read_videoholmes, "video_r1": read_video_r1,
}  # fmt: skip


def read_benchmark(bench: Benchmark) -> list[BenchItem]:
    """The benchmark's questions, in file order; a repeated id is an error naming both."""
    items = READERS[bench.name](bench)
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if item.id in seen:
            raise BenchmarkError(
                f"{bench.path}: question id {item.id!r} appears twice (items #{seen[item.id]} and #{i})"
            )
        seen[item.id] = i
    return items


def _rows(bench: Benchmark):
    """(index, raw record, Where) for the first `limit` rows of a benchmark's single annotation file."""
    source = Path(bench.path)
    rows = read_table(source)
    if not rows:
        raise BenchmarkError(f"{source}: the file holds no questions")
    for index, raw in enumerate(rows[: bench.limit] if bench.limit is not None else rows):
        yield index, raw, Where(source, f"#{index}", raw)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def _letter_prefix(answer: str, options: tuple[str, ...], where: Where) -> str:
    """The letter of an answer written "B. text" (TempCompass, some Video-R1 files), checked against the text."""
    m = re.match(r"\(?([A-Z])[.:)]\s*(.*)$", answer.strip(), re.S)
    letter = m.group(1) if m else ""
    if letter not in LETTERS[: len(options)] or (
        m.group(2) and m.group(2).strip() != options[LETTERS.index(letter)]
    ):
        raise where.error("answer", f"{answer!r} should be 'X. text' for one of the options {list(options)}")
    return letter
