"""What the model is shown for a benchmark question: the prompt template, the frames (a clip, if bounded),
Video-MME's subtitles at the sampled frames; as a Dataset the library's collator batches.

Templates (`PromptTemplate`):
- `video_r1`: Video-R1's evaluation prompt (its repository's `QUESTION_TEMPLATE` + `TYPE_TEMPLATE`): the
  problem, "Options:" and the lettered options, the think-aloud instruction, the answer-type hint.
- `veripo`: this library's training prompt (lightning_veripo.data.videoqa.build_prompt), what its policies
  are trained to answer.
- `plain`: a direct answer without reasoning, as lmms-eval prompts (question, options, "Answer with the
  option's letter from the given choices directly." / "Please answer the question using a single word or
  phrase."); with Video-MME's subtitles first, as its official "w/ subs" prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset

from lightning_veripo.data.videoqa import FrameSampling, VideoQAError, build_prompt, load_video
from lightning_veripo.records import VideoQARecord
from lightning_veripo.videobench.items import MULTIPLE_CHOICE, NUMERICAL, BenchItem

PromptTemplate = Literal["video_r1", "veripo", "plain"]

VIDEO_R1_QUESTION = (
    "{Question}\n"
    "Please think about this question as if you were a human pondering deeply. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', "
    "'let's break it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> </think> tags, and then give your final answer "
    "between the <answer> </answer> tags."
)
VIDEO_R1_TYPE = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the "
    "<answer> </answer> tags.",
    "numerical": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer within the "
    "<answer> </answer> tags.",
    "free-form": " Please provide your text answer within the <answer> </answer> tags.",
    "regression": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
}
PLAIN_HINT = {
    MULTIPLE_CHOICE: "Answer with the option's letter from the given choices directly.",
    NUMERICAL: "Please answer the question using a single word or phrase.",
}
# the Video-R1 record type a benchmark question is asked as (its answer hint, the training prompt's hint)
_PROBLEM_TYPE = {MULTIPLE_CHOICE: "multiple choice", NUMERICAL: "numerical", "open": "free-form"}


def problem_type(item: BenchItem) -> str:
    return _PROBLEM_TYPE.get(item.kind, item.kind)


def render(item: BenchItem, template: PromptTemplate, subtitles: str | None = None) -> str:
    """The user-turn text for `item` under `template` (subtitles: Video-MME's, placed before the question)."""
    options = item.lettered_options()
    kind = problem_type(item)
    if template == "video_r1":
        question = item.question + ("Options:\n" + "\n".join(options) + "\n" if options else "")
        text = VIDEO_R1_QUESTION.format(Question=question) + VIDEO_R1_TYPE[kind]
    elif template == "veripo":
        record = VideoQARecord(item.id, item.question, "video", kind, "", options=tuple(options))
        text = build_prompt(record)
    else:
        lines = [item.question] + (["Options:", *options] if options else [])
        lines.append(PLAIN_HINT.get(item.kind, PLAIN_HINT[NUMERICAL]))
        text = "\n".join(lines)
    if subtitles is not None:
        text = f"This video's subtitles are listed below:\n{subtitles or 'No subtitles available'}\n{text}"
    return text


@dataclass
class ClipSampling(FrameSampling):
    """FrameSampling within `start`..`end` seconds of a video (MVBench's clipped questions)."""

    start: float = 0.0
    end: float = float("inf")

    def frame_indices(self, total_frames: int, video_fps: float) -> list[int]:
        first = min(int(self.start * video_fps), total_frames - 1)
        last = max(first, min(total_frames - 1, int(self.end * video_fps)))
        return [first + i for i in super().frame_indices(last - first + 1, video_fps)]


def read_srt(path: Path) -> list[tuple[float, float, str]]:
    """(start s, end s, text) of each cue of a SubRip file; markup such as <font> is dropped."""
    cues = []
    stamp = re.compile(r"(\d+):(\d+):(\d+)[,.](\d+)\s*-->\s*(\d+):(\d+):(\d+)[,.](\d+)")
    for block in re.split(
        r"\n\s*\n", path.read_text(encoding="utf-8-sig", errors="replace").replace("\r", "")
    ):
        lines = block.strip().split("\n")
        for i, line in enumerate(lines):
            m = stamp.search(line)
            if m:
                h1, m1, s1, f1, h2, m2, s2, f2 = (int(g) for g in m.groups())
                text = re.sub(r"<[^>]+>", "", " ".join(lines[i + 1 :])).strip()
                cues.append(
                    (h1 * 3600 + m1 * 60 + s1 + f1 / 1000, h2 * 3600 + m2 * 60 + s2 + f2 / 1000, text)
                )
                break
    return cues


def subtitles_at(path: Path, frame_indices: list[int], fps: float) -> str:
    """Video-MME's "w/ subs" text: the cues shown at the sampled frames, each once, in order ("" if none)."""
    if not path.is_file():
        return ""
    times = [i / fps for i in frame_indices]
    shown = [text for start, end, text in read_srt(path) if text and any(start <= t < end for t in times)]
    return "\n".join(dict.fromkeys(shown))


class BenchDataset(Dataset):
    """Benchmark items as the library's video-QA samples: sampled frames + a record whose `problem` is the
    rendered prompt (collate with `VideoQACollator(..., prompt=rendered_prompt)`)."""

    def __init__(self, items: list[BenchItem], sampling: FrameSampling, template: PromptTemplate) -> None:
        self.items, self.sampling, self.template = items, sampling, template

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        sampling = self.sampling
        if item.start is not None and item.end is not None:
            fields = {k: getattr(sampling, k) for k in FrameSampling.__dataclass_fields__}
            sampling = ClipSampling(**fields, start=item.start, end=item.end)
        try:
            frames, meta = load_video(item.video, sampling)
        except VideoQAError as e:
            raise VideoQAError(f"question {item.id!r}: {e}") from e
        subtitles = None
        if item.subtitles is not None:
            subtitles = subtitles_at(Path(item.subtitles), meta["frames_indices"], meta["fps"])
        record = VideoQARecord(
            problem_id=item.id, problem=render(item, self.template, subtitles), data_type="video",
            problem_type=problem_type(item), solution=f"<answer>{item.answer}</answer>", path=item.video,
            options=tuple(item.lettered_options()),
        )  # fmt: skip
        return {"record": record, "video": frames, "video_metadata": meta}


def rendered_prompt(record: VideoQARecord) -> str:
    """The collator's prompt function for BenchDataset records: the text is already rendered."""
    return record.problem
