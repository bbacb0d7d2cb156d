"""Preference pairs for DPO: read pairs.jsonl, re-read each video with the rollout's frames, batch the pairs.

One line of `pairs.jsonl` is a `lightning_veripo.records.PreferencePair` (the verifier writes them):
the question's `record`, the `prompt`, the `sampling` the rollouts were generated with, the `chosen` and
`rejected` completion texts and the `reason` the pair exists. The policy must be scored on the pixels it saw
while sampling, so when `sampling["frames_indices"]` is recorded the video is decoded at exactly those frames;
otherwise `FrameSampling` picks them. The file is read with the verifier's reader
(`lightning_veripo.files.read_jsonl`); every problem with a line (not UTF-8, not JSON, a missing field,
a missing video) raises a `PreferenceError` that names `file:line`.

A batch is the prompt batch `VideoQACollator` builds (one left-padded prompt per pair) plus `chosen` and
`rejected` `Completions` (`lightning_veripo.backbone.tokenize_completions`, the same tokenization as
`VideoLLM.tokenize_completions`) and a stable `pair_keys` entry per pair.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset

from lightning_veripo.completions import tokenize_completions
from lightning_veripo.data.resumable import split_loader
from lightning_veripo.data.videoqa import REQUIRED_FIELDS as RECORD_FIELDS
from lightning_veripo.data.videoqa import (
    FrameSampling,
    VideoQACollator,
    VideoQAError,
    load_image,
    load_video,
    stage_processor,
)
from lightning_veripo.files import read_jsonl
from lightning_veripo.records import DATA_TYPES, PreferencePair

PAIR_FIELDS = tuple(f.name for f in dataclasses.fields(PreferencePair))


class PreferenceError(ValueError):
    """A preference pair cannot be used; the message names the file and the line."""


def pair_key(raw_line: str) -> str:
    """A stable key for one pair: the hash of its canonical JSON (same pair, same key, wherever it sits)."""
    return _key(json.loads(raw_line))


def _key(raw: Any) -> str:
    canonical = json.dumps(raw, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:24]


def parse_pair(raw: Any, where: str, root: Path) -> PreferencePair:
    """One decoded JSON line -> PreferencePair with a resolved, existing media path (or PreferenceError)."""
    if not isinstance(raw, dict):
        raise PreferenceError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    missing = [f for f in PAIR_FIELDS if f not in raw]
    if missing:
        raise PreferenceError(f"{where}: missing field(s) {missing}; a pair line needs {list(PAIR_FIELDS)}")
    where = f"{where} (problem_id={raw['problem_id']!r})"
    record = raw["record"]
    if not isinstance(record, dict):
        raise PreferenceError(
            f"{where}: 'record' must be a video-QA record object, got {type(record).__name__}"
        )
    missing = [f for f in RECORD_FIELDS if f not in record]
    if missing:
        raise PreferenceError(f"{where}: record is missing field(s) {missing}")
    if record["data_type"] not in DATA_TYPES:
        raise PreferenceError(
            f"{where}: unknown data_type {record['data_type']!r}; expected one of {DATA_TYPES}"
        )
    for name in ("chosen", "rejected"):
        if not isinstance(raw[name], str):
            raise PreferenceError(
                f"{where}: '{name}' must be the completion text, got {type(raw[name]).__name__}"
            )
    if not isinstance(raw["sampling"], dict):
        raise PreferenceError(f"{where}: 'sampling' must be an object, got {type(raw['sampling']).__name__}")
    indices = raw["sampling"].get("frames_indices")
    if indices is not None and (
        not isinstance(indices, list)
        or not indices
        or not all(isinstance(i, int) and i >= 0 for i in indices)
    ):
        raise PreferenceError(
            f"{where}: sampling.frames_indices must be a non-empty list of frame numbers >= 0"
        )
    media = raw["video"] or record.get("path")
    if not media:
        raise PreferenceError(f"{where}: no media path (neither 'video' nor record.path)")
    media_path = Path(media) if Path(media).is_absolute() else root / media
    if not media_path.is_file():
        raise PreferenceError(f"{where}: {record['data_type']} file {media_path} does not exist")
    pair = PreferencePair.from_dict({f: raw[f] for f in PAIR_FIELDS})
    return dataclasses.replace(
        pair, video=str(media_path), record=dataclasses.replace(pair.record, path=str(media_path))
    )


def read_pairs(path: str | Path, root: str | Path | None = None) -> tuple[list[PreferencePair], list[str]]:
    """All pairs of a pairs.jsonl file and their stable keys; relative media paths resolve against `root`
    (default: the file's folder). Raises PreferenceError naming `file:line` for the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"preference pairs file {path} does not exist (the verifier writes pairs.jsonl)"
        )
    root = Path(root) if root is not None else path.parent
    pairs, keys = [], []
    for lineno, raw in _json_lines(path):
        pairs.append(parse_pair(raw, f"{path}:{lineno}", root))
        keys.append(_key(raw))
    return pairs, keys


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """The verifier's reader (a line that is not UTF-8 or not JSON names `file:line`), its errors as
    PreferenceError."""
    try:
        yield from read_jsonl(path)
    except ValueError as e:
        raise PreferenceError(str(e)) from e


def load_video_at(path: str, frames_indices: list[int]) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode exactly the given frames [F, H, W, 3] uint8 with decord, plus the processor's metadata."""
    import decord

    try:
        reader = decord.VideoReader(path, num_threads=1)
        total = len(reader)
        fps = float(reader.get_avg_fps()) or 1.0
        bad = [i for i in frames_indices if not 0 <= i < total]
        if bad:
            raise VideoQAError(f"{path}: frames_indices {bad[:5]} are outside the video's {total} frames")
        frames = reader.get_batch(list(frames_indices)).asnumpy()
    except VideoQAError:
        raise
    except Exception as e:  # decord raises its own DECORDError / RuntimeError on corrupt files
        raise VideoQAError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from e
    meta = {"total_num_frames": total, "fps": fps, "frames_indices": list(frames_indices),
            "width": int(frames.shape[2]), "height": int(frames.shape[1])}  # fmt: skip
    return frames, meta


class PreferenceDataset(Dataset):
    """The pairs of one pairs.jsonl file; media decoded lazily, at the rollout's frames when recorded."""

    def __init__(
        self, pairs_path: str | Path, sampling: FrameSampling | None = None, root: str | Path | None = None
    ) -> None:
        self.path = Path(pairs_path)
        self.sampling = sampling or FrameSampling()
        self.pairs, self.keys = read_pairs(self.path, root)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        sample: dict[str, Any] = {"record": pair.record, "pair": pair, "key": self.keys[index]}
        try:
            if pair.record.data_type == "image":
                return {**sample, "image": load_image(pair.video)}
            indices = pair.sampling.get("frames_indices")
            frames, meta = (
                load_video_at(pair.video, indices) if indices else load_video(pair.video, self.sampling)
            )
        except VideoQAError as e:
            raise PreferenceError(f"{self.path} pair #{index} (problem_id={pair.problem_id!r}): {e}") from e
        return {**sample, "video": frames, "video_metadata": meta}


class PreferenceCollator:
    """Pairs -> the prompt batch (one left-padded prompt per pair) + `chosen`/`rejected` Completions.

    Holds the processor: its tokenizer tokenizes the completions, so a batch is ready for the model.
    """

    def __init__(self, processor: Any, sampling: FrameSampling) -> None:
        self.processor = processor
        self.prompts = VideoQACollator(processor, sampling)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.prompts(samples)
        pairs: list[PreferencePair] = [s["pair"] for s in samples]
        batch["chosen"] = tokenize_completions(self.processor.tokenizer, [p.chosen for p in pairs])
        batch["rejected"] = tokenize_completions(self.processor.tokenizer, [p.rejected for p in pairs])
        batch["pair_keys"] = [s["key"] for s in samples]
        batch["reasons"] = [p.reason for p in pairs]
        return batch


class PreferenceDataModule(L.LightningDataModule):
    """Train (and optional val) pairs.jsonl files as a LightningDataModule for DPOModule.

    The processor comes from the attached LightningModule's backbone (`module.backbone.processor`), or from
    `processor_path`. Relative media paths resolve against `root` (default: each pairs file's folder).
    """

    def __init__(
        self,
        pairs_path: str,
        val_pairs_path: str | None = None,
        sampling: FrameSampling | None = None,
        batch_size: int = 1,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        processor_path: str | None = None,
        root: str | None = None,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        self.pairs_path = pairs_path
        self.val_pairs_path = val_pairs_path
        self.sampling = sampling or FrameSampling()
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.processor_path = processor_path
        self.root = root
        self.shuffle = shuffle
        self.datasets: dict[str, PreferenceDataset] = {}

    def dataset(self, split: str) -> PreferenceDataset:
        if split not in self.datasets:
            path = {"train": self.pairs_path, "val": self.val_pairs_path}[split]
            if path is None:
                raise ValueError(f"PreferenceDataModule: no {split} pairs file configured")
            self.datasets[split] = PreferenceDataset(path, self.sampling, self.root)
        return self.datasets[split]

    def processor(self) -> Any:
        return stage_processor(self)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        collate = PreferenceCollator(self.processor(), self.sampling)
        return split_loader(
            self.dataset(split), split, self.trainer, batch_size, shuffle, self.num_workers, collate
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, self.shuffle)

    def val_dataloader(self) -> DataLoader:
        if self.val_pairs_path is None:
            return []  # type: ignore[return-value]  # Lightning skips validation for an empty list
        return self._loader("val", self.val_batch_size, False)
