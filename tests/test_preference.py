"""Preference pairs: the pairs.jsonl schema, frames re-read at the rollout's indices, batches, clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import decord
import numpy as np
import pytest
import torch

from lightning_veripo.backbone import VideoLLM
from lightning_veripo.data.preference import (
    PreferenceCollator,
    PreferenceDataModule,
    PreferenceDataset,
    PreferenceError,
    read_pairs,
)
from lightning_veripo.data.videoqa import FrameSampling
from lightning_veripo.records import VideoQARecord
from lightning_veripo.verifier.pairs import PreferencePair


def make_pair(synthetic_dir: Path, index: int, chosen: str, rejected: str, frames: list[int] | None) -> dict:
    """One pairs.jsonl line as the verifier writes it, for train record `index` of the synthetic set."""
    raw = json.loads((synthetic_dir / "train.json").read_text())[index]
    record = VideoQARecord.from_dict(dict(raw, path=str(synthetic_dir / raw["path"])))
    sampling = {"temperature": 1.0, "frames_indices": frames, "fps": 8.0} if frames else {"temperature": 1.0}
    pair = PreferencePair(
        problem_id=record.problem_id,
        record=record,
        prompt="",
        video=record.path,
        sampling=sampling,
        chosen=chosen,
        rejected=rejected,
        chosen_step=3,
        chosen_sample_index=0,
        rejected_step=3,
        rejected_sample_index=5,
        reason="consistency:wrong_answer",
    )
    return pair.to_dict()


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture
def pairs_file(tmp_path: Path, synthetic_dir: Path) -> Path:
    return write_lines(
        tmp_path / "pairs.jsonl",
        [
            make_pair(
                synthetic_dir,
                0,
                "<think>red moves</think><answer>A</answer>",
                "<answer>C</answer>",
                [1, 2, 6, 7],
            ),
            make_pair(
                synthetic_dir, 1, "<think>it goes left, so</think><answer>A</answer>", "<answer>B", None
            ),
        ],
    )


def test_pairs_round_trip_through_the_verifier_schema(pairs_file: Path, synthetic_dir: Path) -> None:
    pairs, keys = read_pairs(pairs_file)
    assert [p.problem_id for p in pairs] == ["train-colour-00000", "train-direction-00001"]
    assert pairs[0].rejected == "<answer>C</answer>" and pairs[0].reason == "consistency:wrong_answer"
    assert pairs[0].record.path == str(synthetic_dir / "videos/train_00000.mp4")
    assert len(set(keys)) == 2 and read_pairs(pairs_file)[1] == keys  # keys are stable


def test_recorded_frame_indices_are_the_frames_decoded(
    pairs_file: Path, frame_sampling: FrameSampling
) -> None:
    sample = PreferenceDataset(pairs_file, frame_sampling)[0]
    assert sample["video_metadata"]["frames_indices"] == [1, 2, 6, 7]
    reader = decord.VideoReader(sample["record"].path, num_threads=1)
    np.testing.assert_array_equal(sample["video"], reader.get_batch([1, 2, 6, 7]).asnumpy())


def test_frame_sampling_is_the_fallback_without_recorded_indices(
    pairs_file: Path, frame_sampling: FrameSampling
) -> None:
    sample = PreferenceDataset(pairs_file, frame_sampling)[1]
    assert sample["video_metadata"]["frames_indices"] == frame_sampling.frame_indices(8, 8.0) == [0, 2, 5, 7]


def test_collated_batch_holds_one_left_padded_prompt_per_pair_and_both_completions(
    pairs_file: Path, frame_sampling: FrameSampling, backbone: VideoLLM
) -> None:
    dataset = PreferenceDataset(pairs_file, frame_sampling)
    batch = PreferenceCollator(backbone.processor, frame_sampling)([dataset[0], dataset[1]])
    assert batch["input_ids"].shape[0] == 2 and batch["video_grid_thw"].shape[0] == 2
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding: every prompt ends at the last column
    assert batch["sampling"][0]["frames_indices"] == [1, 2, 6, 7]
    assert batch["pair_keys"] == dataset.keys and batch["reasons"] == ["consistency:wrong_answer"] * 2
    for name in ("chosen", "rejected"):
        expected = backbone.tokenize_completions([getattr(p, name) for p in dataset.pairs])
        torch.testing.assert_close(batch[name].ids, expected.ids)
        torch.testing.assert_close(batch[name].mask, expected.mask)
        end = backbone.tokenizer.convert_tokens_to_ids("<|im_end|>")
        lengths = batch[name].mask.sum(-1)
        assert batch[name].ids[torch.arange(2), lengths - 1].tolist() == [end, end]  # end-of-turn appended
    assert batch["chosen"].mask.shape[1] != batch["rejected"].mask.shape[1]  # lengths differ: padded apart


def test_relative_media_paths_resolve_against_the_pairs_file(tmp_path: Path, synthetic_dir: Path) -> None:
    line = make_pair(synthetic_dir, 0, "a", "b", None)
    line["video"] = line["record"]["path"] = "videos/train_00000.mp4"
    (tmp_path / "videos").symlink_to(synthetic_dir / "videos")
    pairs, _ = read_pairs(write_lines(tmp_path / "pairs.jsonl", [line]))
    assert pairs[0].video == str(tmp_path / "videos/train_00000.mp4") == pairs[0].record.path


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda p: "{not json", "not a JSON line"),  # the verifier's reader, as for its own files
        (lambda p: "[1, 2]", "expected a JSON object"),
        (lambda p: {k: v for k, v in p.items() if k != "rejected"}, "missing field(s) ['rejected']"),
        (lambda p: dict(p, record={k: v for k, v in p["record"].items() if k != "solution"}), "['solution']"),
        (lambda p: dict(p, chosen=None), "'chosen' must be the completion text"),
        (lambda p: dict(p, video="/nowhere/clip.mp4"), "/nowhere/clip.mp4 does not exist"),
        (lambda p: dict(p, sampling={"frames_indices": [0, -1]}), "frames_indices must be"),
    ],
    ids=[
        "json",
        "not-object",
        "missing-field",
        "record-field",
        "chosen-type",
        "missing-video",
        "bad-indices",
    ],
)
def test_a_bad_line_names_the_file_and_line(
    tmp_path: Path, synthetic_dir: Path, corrupt: Any, message: str
) -> None:
    good = make_pair(synthetic_dir, 0, "a", "b", None)
    path = write_lines(tmp_path / "pairs.jsonl", [good, "", corrupt(good)])
    with pytest.raises(PreferenceError) as info:
        read_pairs(path)
    assert str(info.value).startswith(f"{path}:3: ") or str(info.value).startswith(f"{path}:3 (")
    assert message in str(info.value)


def test_a_line_that_is_not_utf8_names_the_file_and_line(tmp_path: Path, synthetic_dir: Path) -> None:
    good = json.dumps(make_pair(synthetic_dir, 0, "a", "b", None)).encode()
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(good + b"\n" + good.replace(b'"a"', b'"\xff"') + b"\n")
    with pytest.raises(PreferenceError, match=rf"^{path}:2: not UTF-8 text"):
        read_pairs(path)


def test_pairs_are_read_as_the_verifier_reads_them(tmp_path: Path, synthetic_dir: Path) -> None:
    """The same file through the verifier's reader and the data module's: the same pairs, the same keys."""
    from lightning_veripo.data.preference import pair_key
    from lightning_veripo.verifier.run import read_pairs as verifier_read_pairs

    lines = [make_pair(synthetic_dir, 0, "a", "b", [0, 2, 4, 6]), make_pair(synthetic_dir, 1, "c", "d", None)]
    path = write_lines(tmp_path / "pairs.jsonl", lines)
    pairs, keys = read_pairs(path)
    assert pairs == verifier_read_pairs(path)
    assert keys == [pair_key(line) for line in path.read_text().splitlines()]


def test_frame_indices_beyond_the_video_name_the_pair(tmp_path: Path, synthetic_dir: Path) -> None:
    path = write_lines(tmp_path / "pairs.jsonl", [make_pair(synthetic_dir, 0, "a", "b", [0, 99])])
    with pytest.raises(
        PreferenceError, match=r"pair #0 \(problem_id='train-colour-00000'\).*\[99\].*8 frames"
    ):
        PreferenceDataset(path)[0]


def test_missing_pairs_file_says_who_writes_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="verifier writes pairs.jsonl"):
        PreferenceDataset(tmp_path / "pairs.jsonl")


def test_datamodule_batches_pairs_with_a_processor_from_disk(
    pairs_file: Path, frame_sampling: FrameSampling, tiny_model_dir: Path
) -> None:
    dm = PreferenceDataModule(
        str(pairs_file), val_pairs_path=str(pairs_file), sampling=frame_sampling, batch_size=2,
        processor_path=str(tiny_model_dir),
    )  # fmt: skip
    train = next(iter(dm.train_dataloader()))
    val = next(iter(dm.val_dataloader()))
    assert sorted(train["pair_keys"]) == sorted(val["pair_keys"]) and val["chosen"].ids.shape[0] == 2
    assert PreferenceDataModule(str(pairs_file)).val_dataloader() == []  # no val file: validation is skipped
