"""Video-R1-format video QA: read the records, build prompts and processor batches (media: `data.media`).

A record file is a JSON list (or JSONL) of objects with `problem_id`, `problem`, `data_type` (video|image),
`problem_type` (multiple choice|numerical|OCR|free-form|regression), `options`, `solution`
(`<answer>…</answer>`) and `path` (relative paths resolve against `root`). Bad records raise an error that names
the file and the record, unless `skip_invalid=True`, which skips them with one warning that counts them.

What counts as bad, and when it is found:
- at load: a JSONL line that is not JSON (skipped under `skip_invalid`), a whole file that is not JSON, empty
  or not UTF-8 (always an error), a missing field or media file, text that is not valid Unicode (a lone
  surrogate escape such as "\\ud800"), a problem_id seen before in the file (the error names both records);
- when a sample is read: media that cannot be opened (permissions) or decoded (truncated, garbage, empty);
- when a batch is built: a prompt longer than `max_prompt_tokens` (see `VideoQACollator`).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_veripo.data.media import FrameSampling, VideoQAError, load_image, load_video
from lightning_veripo.data.resumable import split_loader
from lightning_veripo.data.synthetic import make_synthetic_data
from lightning_veripo.records import DATA_TYPES, PROBLEM_TYPES, VideoQARecord

REQUIRED_FIELDS = ("problem_id", "problem", "data_type", "problem_type", "solution")

ANSWER_HINTS = {
    "multiple choice": "Give only the option letter inside <answer> </answer>.",
    "numerical": "Give only the number inside <answer> </answer>.",
    "OCR": "Give only the transcribed text inside <answer> </answer>.",
    "free-form": "Give your answer in a short phrase inside <answer> </answer>.",
    "regression": "Give only the number inside <answer> </answer>.",
}


@dataclass
class SyntheticSpec:
    """Write the synthetic task (lightning_veripo.data.synthetic) beside `train_path` if it is missing."""

    num_train: int = 32
    num_val: int = 16
    tasks: list[str] | None = None
    seed: int = 0
    # > 0 also writes test.json (the demo's development slice for the loop's stage acceptance)
    num_test: int = 0


def read_records(path: str | Path, bad_lines: list[str] | None = None) -> list[dict[str, Any]]:
    """Raw records from a JSON list or a JSONL file; errors name the file and the line.

    With a `bad_lines` list, a JSONL line that is not JSON is described there and skipped instead of raising
    (the lines around it are kept); a JSON list that does not parse, or an empty file, always raises.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video-QA file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (some editors write one) is dropped
    except UnicodeDecodeError as e:
        raise VideoQAError(f"{path}: not UTF-8 text ({e})") from e
    if not text.strip():
        raise VideoQAError(f"{path}: the file is empty; expected a JSON list or JSONL of records")
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        rows = []
        # Only CR / LF end a line: JSON text may hold U+2028, U+0085 or \x1c raw, which splitlines() splits at.
        for lineno, line in enumerate(re.split(r"\r\n?|\n", text), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                message = f"{path}:{lineno}: invalid JSON line ({e.msg})"
                if bad_lines is None:
                    raise VideoQAError(message) from e
                bad_lines.append(message)
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise VideoQAError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from e
    if not isinstance(rows, list):
        raise VideoQAError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    return rows


def validate_record(raw: Any, index: int, source: Path, root: Path) -> VideoQARecord:
    """One raw record -> VideoQARecord with a resolved media path, or VideoQAError naming what is wrong."""
    where = f"{source} record #{index}"
    if not isinstance(raw, dict):
        raise VideoQAError(f"{where}: expected an object, got {type(raw).__name__}")
    where = f"{source} record #{index} (problem_id={raw.get('problem_id')!r})"
    missing = [f for f in REQUIRED_FIELDS if f not in raw]
    if missing:
        raise VideoQAError(f"{where}: missing field(s) {missing}")
    if raw["problem_type"] not in PROBLEM_TYPES:
        raise VideoQAError(
            f"{where}: unknown problem_type {raw['problem_type']!r}; expected one of {PROBLEM_TYPES}"
        )
    if raw["data_type"] not in DATA_TYPES:
        raise VideoQAError(f"{where}: unknown data_type {raw['data_type']!r}; expected one of {DATA_TYPES}")
    options = raw.get("options") or []
    valid = {
        "problem_id": isinstance(raw["problem_id"], (str, int)) and not isinstance(raw["problem_id"], bool),
        "problem": isinstance(raw["problem"], str),
        "solution": isinstance(raw["solution"], str),
        "options": isinstance(options, list) and all(isinstance(o, str) for o in options),
        "path": isinstance(raw.get("path"), (str, type(None))),
        "process": isinstance(raw.get("process"), (str, type(None))),
    }
    if not all(valid.values()):
        wrong = [name for name, ok in valid.items() if not ok]
        raise VideoQAError(f"{where}: field(s) {wrong} have the wrong type (text; options: a list of text)")
    texts = [(f, raw[f]) for f in ("problem_id", "problem", "solution")] + [("options", o) for o in options]
    texts += [("process", raw["process"])] if raw.get("process") else []
    for name, text in texts:
        try:
            str(text).encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate (\ud800 escaped in the JSON) breaks the tokenizer
            raise VideoQAError(f"{where}: {name} is not valid Unicode text ({e.reason} at {e.start})") from e
    if raw["problem_type"] == "multiple choice" and not raw.get("options"):
        raise VideoQAError(f"{where}: a multiple-choice record needs a non-empty 'options' list")
    if not raw.get("path"):
        raise VideoQAError(f"{where}: data_type {raw['data_type']!r} needs a 'path'")
    # absolute, so rollouts and pairs files written elsewhere (the verifier's folder) still point at it
    media = (root / raw["path"]).absolute()
    try:
        found = media.is_file()
    except OSError as e:  # a folder on the way we may not enter, a name too long for the file system
        raise VideoQAError(f"{where}: cannot access {raw['data_type']} file {media} ({e.strerror})") from e
    if not found:
        raise VideoQAError(f"{where}: {raw['data_type']} file {media} does not exist")
    record = dict(raw, path=str(media))
    return VideoQARecord.from_dict(record)


def build_prompt(record: VideoQARecord) -> str:
    """The user-turn text: question, options, and the <think>/<answer> instruction (no system prompt)."""
    lines = [record.problem.strip()]
    if record.options:
        lines.append("Options:\n" + "\n".join(record.options))
    lines.append(
        "Think about the question step by step inside <think> </think> tags, then give the final answer "
        "inside <answer> </answer> tags. " + ANSWER_HINTS[record.problem_type]
    )
    return "\n".join(lines)


def build_messages(
    record: VideoQARecord, prompt: Callable[[VideoQARecord], str] = build_prompt
) -> list[dict[str, Any]]:
    """Chat messages for one record: one user turn with the visual first, then the prompt text."""
    return [
        {
            "role": "user",
            "content": [{"type": record.data_type}, {"type": "text", "text": prompt(record)}],
        }
    ]


class VideoQADataset(Dataset):
    """Validated Video-R1-format records; media is decoded lazily, one record at a time."""

    def __init__(
        self,
        path: str | Path,
        root: str | Path | None = None,
        sampling: FrameSampling | None = None,
        skip_invalid: bool = False,
        exclude_ids: set[str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.root = Path(root) if root is not None else self.path.parent
        self.sampling = sampling or FrameSampling()
        self.records: list[VideoQARecord] = []
        problems: list[str] = []
        seen: dict[str, int] = {}  # problem_id -> index of the record that first used it
        for i, raw in enumerate(read_records(self.path, problems if skip_invalid else None)):
            try:
                rec = validate_record(raw, i, self.path, self.root)
                if rec.problem_id in seen:
                    raise VideoQAError(
                        f"{self.path} record #{i}: duplicate problem_id {rec.problem_id!r} "
                        f"(first used by record #{seen[rec.problem_id]})"
                    )
            except VideoQAError as e:
                if not skip_invalid:
                    raise
                problems.append(str(e))
                continue
            seen[rec.problem_id] = i
            if exclude_ids and rec.problem_id in exclude_ids:
                continue
            self.records.append(rec)
        if problems:
            warnings.warn(
                f"{self.path}: skipped {len(problems)} invalid record(s) of {len(problems) + len(seen)} "
                f"(skip_invalid=True); first: {problems[0]}",
                stacklevel=2,
            )
        self.skipped = problems

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        try:
            if record.data_type == "video":
                frames, meta = load_video(record.path, self.sampling)
                return {"record": record, "video": frames, "video_metadata": meta}
            return {"record": record, "image": load_image(record.path)}
        except VideoQAError as e:
            raise VideoQAError(f"{self.path} problem_id={record.problem_id!r}: {e}") from e


class VideoQACollator:
    """Samples -> one left-padded processor batch (+ the records, prompts and sampling settings).

    Prompt length policy: a prompt (chat template + vision placeholder tokens + question) longer than
    `max_prompt_tokens` raises `VideoQAError` naming the problem_id and both token counts; nothing is
    truncated, since cutting a question or its video silently changes the task. `max_prompt_tokens=None`
    means the tokenizer's `model_max_length` (the context the checkpoint declares), or no limit when it
    declares none. To fit, shorten the question or lower `FrameSampling`'s frame count / max_pixels.
    `prompt` renders a record's user text (`build_prompt`, the training template, by default; the benchmark
    evaluation passes its own templates).
    """

    def __init__(
        self,
        processor: Any,
        sampling: FrameSampling,
        max_prompt_tokens: int | None = None,
        prompt: Callable[[VideoQARecord], str] = build_prompt,
    ) -> None:
        self.processor = processor
        self.prompt = prompt
        self.sampling = sampling
        if max_prompt_tokens is None:
            declared = getattr(getattr(processor, "tokenizer", None), "model_max_length", None)
            max_prompt_tokens = declared if isinstance(declared, int) and declared < 10**9 else None
        self.max_prompt_tokens = max_prompt_tokens

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        from transformers.video_utils import VideoMetadata

        records = [s["record"] for s in samples]
        texts = [
            self.processor.apply_chat_template(
                build_messages(r, self.prompt), add_generation_prompt=True, tokenize=False
            )
            for r in records
        ]
        videos = [s["video"] for s in samples if "video" in s]
        images = [s["image"] for s in samples if "image" in s]
        kwargs: dict[str, Any] = {}
        size = {"shortest_edge": self.sampling.min_pixels, "longest_edge": self.sampling.max_pixels}
        if videos:
            kwargs.update(
                videos=videos,
                video_metadata=[VideoMetadata(**s["video_metadata"]) for s in samples if "video" in s],
                do_sample_frames=False,
                videos_kwargs={"size": size, "cap_pixels_per_frame": True},
            )
        if images:
            kwargs.update(images=images, images_kwargs={"size": size})
        batch = self.processor(text=texts, padding=True, padding_side="left", return_tensors="pt", **kwargs)
        if self.max_prompt_tokens is not None:
            lengths = batch["attention_mask"].sum(-1).tolist()
            too_long = [
                (r.problem_id, n) for r, n in zip(records, lengths, strict=True) if n > self.max_prompt_tokens
            ]
            if too_long:
                raise VideoQAError(
                    f"prompt too long for problem_id(s) {too_long} (tokens, vision placeholders included): "
                    f"more than max_prompt_tokens={self.max_prompt_tokens}. Shorten the question, lower "
                    "FrameSampling's num_frames / max_pixels, or raise max_prompt_tokens."
                )
        out = dict(batch)
        if "second_per_grid_ts" in out:
            out["second_per_grid_ts"] = torch.as_tensor(out["second_per_grid_ts"], dtype=torch.float32)
        out["records"] = records
        out["prompts"] = texts
        # the decoded frames themselves, for a rollout engine outside this process (vLLM): no second decode
        out["videos"] = [
            {"frames": s["video"], "metadata": s["video_metadata"], "size": size} if "video" in s else None
            for s in samples
        ]
        out["sampling"] = [
            {"frames_indices": s["video_metadata"]["frames_indices"], "fps": s["video_metadata"]["fps"]}
            if "video" in s
            else {}
            for s in samples
        ]
        return out


class VideoQADataModule(L.LightningDataModule):
    """Train/val/test Video-R1-format files as a LightningDataModule.

    The processor comes from the LightningModule's backbone (`module.backbone.processor`) when the module is
    attached to a trainer, or from `processor_path`. `max_prompt_tokens` goes to `VideoQACollator`: a longer
    prompt raises (None = the tokenizer's model_max_length).
    """

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        root: str | None = None,
        sampling: FrameSampling | None = None,
        batch_size: int = 1,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        skip_invalid: bool = False,
        exclude_ids_file: str | None = None,
        processor_path: str | None = None,
        shuffle: bool = True,
        synthetic: SyntheticSpec | None = None,
        max_prompt_tokens: int | None = None,
    ) -> None:
        super().__init__()
        self.synthetic = synthetic
        self.train_path, self.val_path, self.test_path = train_path, val_path, test_path
        self.root = root
        self.sampling = sampling or FrameSampling()
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.skip_invalid = skip_invalid
        self.exclude_ids_file = exclude_ids_file
        self.processor_path = processor_path
        self.shuffle = shuffle
        self.max_prompt_tokens = max_prompt_tokens
        self.datasets: dict[str, VideoQADataset] = {}

    def prepare_data(self) -> None:
        if self.synthetic is None or self.train_path is None or Path(self.train_path).exists():
            return
        spec = self.synthetic
        make_synthetic_data(
            Path(self.train_path).parent,
            spec.num_train,
            spec.num_val,
            spec.seed,
            tuple(spec.tasks or ("colour",)),
            num_test=spec.num_test,
        )

    def _dataset(self, split: str) -> VideoQADataset:
        if split not in self.datasets:
            path = {"train": self.train_path, "val": self.val_path, "test": self.test_path}[split]
            if path is None:
                raise ValueError(f"VideoQADataModule: no {split}_path configured")
            exclude = None
            if split == "train" and self.exclude_ids_file:
                exclude = set(json.loads(Path(self.exclude_ids_file).read_text()))
            self.datasets[split] = VideoQADataset(path, self.root, self.sampling, self.skip_invalid, exclude)
        return self.datasets[split]

    def processor(self) -> Any:
        return stage_processor(self)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        collate = VideoQACollator(self.processor(), self.sampling, self.max_prompt_tokens)
        return split_loader(
            self._dataset(split), split, self.trainer, batch_size, shuffle, self.num_workers, collate
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, self.shuffle)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_path is None:  # no validation set: Lightning skips the validation loop
            return []
        return self._loader("val", self.val_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.val_batch_size, False)


def stage_processor(datamodule: L.LightningDataModule) -> Any:
    """The processor a data module's collator uses: from its `processor_path` when given, else the one of the
    backbone its trainer's LightningModule has loaded (so data and model never disagree on tokens)."""
    path = getattr(datamodule, "processor_path", None)
    if path is not None:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path)
    trainer = datamodule.trainer
    backbone = getattr(trainer.lightning_module if trainer is not None else None, "backbone", None)
    if backbone is None or backbone.processor is None:
        raise RuntimeError(
            f"{type(datamodule).__name__} needs processor_path, or a LightningModule with a loaded backbone"
        )
    return backbone.processor
