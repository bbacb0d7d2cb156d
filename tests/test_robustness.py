"""Robustness: bad media, bad record files, bad rewards, a hanging judge, failed and killed writes.

Each test asserts a clear error (naming the file / record / reward) or a recorded skip, and that nothing already
written is lost or left half-written. Cases other test files already pin down are not repeated here:

- garbage bytes, a zero-length .mp4 and a half-cut real clip: test_videoqa.py
  (`test_undecodable_video_raises_naming_the_file_and_the_problem_id`,
  `test_truncated_video_gives_a_clear_error_or_valid_frames`);
- a bad last JSONL line, a latin-1 record file, a duplicate id and the skip_invalid count: test_videoqa.py;
- NaN/inf/non-number/raising rewards at the `RewardSet` level: test_rewards.py;
- a judge server slower than the timeout, 5xx retries, malformed bodies, no server at all: test_judges.py
  (`test_openai_judge_times_out_slow_requests_into_unjudged`, ...);
- a real judge server (`transformers serve`) not running, killed mid-run with requests in flight,
  or restarted mid-run: test_llm_judges.py (`test_transformers_serve_killed_mid_run_...`, `..._restarted_...`);
- a rollouts.jsonl cut short: test_verifier_callback.py (`test_reading_a_damaged_rollouts_file_names_the_line`);
- parsers and the accuracy / format / length rewards on arbitrary completions: test_parsing.py, test_rewards.py.

What is new here: cut points and garbage across two mp4 layouts, clips shorter than the sampled frame count,
unreadable files, empty and BOM'd record files, a bad line in the middle (with and without skip_invalid),
duplicate ids naming both records, invalid Unicode, prompts longer than the context, NaN / overflowing /
raising rewards inside a real GRPO step, judge servers that hang or trickle, disk full (a failing writer and a
real file-size limit) and SIGTERM while the verifier writes, and property tests over arbitrary records,
judge replies and record files.

Killed and limited writers run in a forked child of this process (the libraries are already imported, so it
starts in milliseconds); the child never touches torch.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import resource
import select
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoProcessor

from lightning_veripo.backbone import VideoLLM
from lightning_veripo.data.synthetic import write_mp4
from lightning_veripo.data.videoqa import (
    FrameSampling,
    VideoQACollator,
    VideoQADataModule,
    VideoQADataset,
    VideoQAError,
    load_video,
    read_records,
)
from lightning_veripo.files import write_jsonl_atomic
from lightning_veripo.grpo import GRPOModule
from lightning_veripo.records import PROBLEM_TYPES, Rollout, VideoQARecord
from lightning_veripo.rewards import (
    LengthReward,
    RewardSet,
    accuracy_reward,
    choice_accuracy,
    numerical_accuracy,
    regression_accuracy,
)
from lightning_veripo.verifier import JudgeItem, JudgeUnavailableError, OpenAIJudge, PairConfig, RuleJudge
from lightning_veripo.verifier.llm_judges import parse_verdict
from lightning_veripo.verifier.run import (
    PAIRS_FILE,
    ROLLOUTS_FILE,
    STATS_FILE,
    VERDICTS_FILE,
    read_pairs,
    read_rollouts,
    run_verifier,
)

SAMPLING = FrameSampling(num_frames=4, min_pixels=56 * 56, max_pixels=56 * 56)
OPTIONS = ["A. red", "B. green", "C. blue", "D. yellow"]


def _record(problem_id: str, path: str, **changes: Any) -> dict[str, Any]:
    record = {
        "problem_id": problem_id,
        "problem": "What colour is the moving square?",
        "data_type": "video",
        "problem_type": "multiple choice",
        "options": OPTIONS,
        "solution": "<answer>A</answer>",
        "path": path,
    }
    return record | changes


def _write_json(path: Path, records: list[Any]) -> Path:
    path.write_text(json.dumps(records))
    return path


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _jsonl_rows(path: Path) -> list[Any]:
    """Every line of a complete JSONL file, parsed; fails on a torn last line."""
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), f"{path} does not end with a newline: cut short"
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path) -> Any:
    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture
def good_video(synthetic_dir: Path) -> str:
    return str(synthetic_dir / "videos" / "train_00000.mp4")


# ====================================================================== media: cut off, garbage, short, empty

_FRAMES = np.random.default_rng(0).integers(0, 256, size=(16, 64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """One 16-frame clip in both mp4 layouts: the index (moov atom) after the frames, and before them."""
    folder = tmp_path_factory.mktemp("clips")
    write_mp4(folder / "index_last.mp4", _FRAMES, fps=8)
    write_mp4(folder / "index_first.mp4", _FRAMES, fps=8, index_first=True)
    return {layout: (folder / f"{layout}.mp4").read_bytes() for layout in ("index_last", "index_first")}


def _cut(data: bytes, where: float) -> bytes:
    return data[: max(1, int(len(data) * where))]


def _garbage_in_the_middle(data: bytes, where: float) -> bytes:
    start = int(len(data) * where)
    noise = np.random.default_rng(1).integers(0, 256, size=256, dtype=np.uint8).tobytes()
    return data[:start] + noise + data[start + len(noise) :]


DAMAGE = {
    **{f"cut at {w:.0%}": (_cut, w) for w in (0.0, 0.1, 0.5, 0.9, 0.99)},
    **{f"garbage at {w:.0%}": (_garbage_in_the_middle, w) for w in (0.3, 0.5, 0.8)},
}


# What decord (its bundled FFmpeg) makes of each damaged clip, decided case by case: an error naming the file, or
# the 4 sampled frames of which the first `intact` equal the undamaged clip's decode at the same indices. A cut
# index-last file has lost its index (always an error); cutting the last 1% of an index-first file truncates the
# last frame's packet, which the decoder conceals (frame 15 comes back, not equal to the undamaged one).
# Garbage inside the packets ("either"): decord's threaded decoder races on it, so the same file errors on some
# reads and decodes on others (index_last 80% and index_first 50% flipped in 1 of 12 reads here); when frames
# come back the sampled ones are all intact (the garbage lands in packets the sampling never shows).
DAMAGE_OUTCOME: dict[tuple[str, str], int | str | None] = {  # None: an error; n: frames, the first n intact
    **{("index_last", f"cut at {w}%"): None for w in (0, 10, 50, 90, 99)},
    ("index_last", "garbage at 30%"): None,
    ("index_last", "garbage at 50%"): "either",
    ("index_last", "garbage at 80%"): "either",
    **{("index_first", f"cut at {w}%"): None for w in (0, 10, 50, 90)},
    ("index_first", "cut at 99%"): 3,
    ("index_first", "garbage at 30%"): "either",
    ("index_first", "garbage at 50%"): "either",
    ("index_first", "garbage at 80%"): "either",
}


def _decord(path: Path, indices: list[int]) -> np.ndarray:
    import decord

    return decord.VideoReader(str(path), num_threads=1).get_batch(indices).asnumpy()


@pytest.mark.parametrize("layout", ["index_last", "index_first"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_video_gives_a_clear_error_or_valid_frames_and_spares_the_other_records(
    tmp_path, clips, good_video, layout, damage
):
    fn, where = DAMAGE[damage]
    damaged = fn(clips[layout], where)
    (tmp_path / "bad.mp4").write_bytes(damaged)
    (tmp_path / "intact.mp4").write_bytes(clips[layout])
    data = _write_json(tmp_path / "data.json", [_record("bad-clip", "bad.mp4"), _record("good", good_video)])
    dataset = VideoQADataset(data, sampling=SAMPLING)
    outcome = DAMAGE_OUTCOME[layout, damage]

    try:
        sample = dataset[0]
    except VideoQAError as err:
        assert outcome is None or outcome == "either", f"expected frames, got {err}"
        message = str(err)
        assert str(data) in message and "'bad-clip'" in message and "bad.mp4" in message
        assert "cannot decode video" in message
    else:  # decoders skip over damaged packets: what comes back must be the decoded frames themselves
        assert outcome is not None, "expected an error, got frames"
        intact = 4 if outcome == "either" else outcome
        frames, meta = sample["video"], sample["video_metadata"]
        assert meta["total_num_frames"] == 16 and meta["frames_indices"] == [0, 5, 10, 15]
        assert frames.shape == (4, 64, 64, 3) and frames.dtype == np.uint8
        reference = _decord(tmp_path / "intact.mp4", meta["frames_indices"])
        np.testing.assert_array_equal(frames[:intact], reference[:intact])
        assert all(not np.array_equal(frames[i], reference[i]) for i in range(intact, 4))
    assert dataset[1]["video"].shape == (4, 56, 56, 3)  # one bad clip does not poison the next record
    assert (tmp_path / "bad.mp4").read_bytes() == damaged  # read-only: the evidence is left as it was


@pytest.mark.parametrize("num_frames", [1, 2, 3])
def test_video_shorter_than_the_requested_frames_repeats_frames_evenly(tmp_path, processor, num_frames):
    write_mp4(tmp_path / "short.mp4", np.ascontiguousarray(_FRAMES[:num_frames, :56, :56]), fps=8)
    data = _write_json(tmp_path / "data.json", [_record("short", "short.mp4")])
    sampling = FrameSampling(num_frames=8, min_pixels=56 * 56, max_pixels=56 * 56)

    sample = VideoQADataset(data, sampling=sampling)[0]

    video, indices = sample["video"], sample["video_metadata"]["frames_indices"]
    assert video.shape == (8, 56, 56, 3)  # the requested count, not the clip's
    assert indices == sorted(indices) and set(indices) == set(range(num_frames))  # every frame, in order
    for i, j in zip(range(7), range(1, 8), strict=True):  # a repeated index is the very same decoded frame
        assert np.array_equal(video[i], video[j]) == (indices[i] == indices[j])
    batch = VideoQACollator(processor, sampling)([sample])
    assert batch["video_grid_thw"].tolist() == [[4, 4, 4]]
    # 8 samples of a clip lasting num_frames / 8 s: each temporal patch of 2 samples spans a quarter of it
    assert batch["second_per_grid_ts"].tolist() == pytest.approx([num_frames / 8 / 4])


def test_fps_sampling_of_a_one_frame_clip_gives_min_frames(tmp_path):
    write_mp4(tmp_path / "still.mp4", _FRAMES[:1], fps=8)

    frames, meta = load_video(str(tmp_path / "still.mp4"), FrameSampling(fps=2.0, min_frames=4, max_frames=8))

    assert frames.shape == (4, 64, 64, 3) and meta["frames_indices"] == [0, 0, 0, 0]
    assert meta["total_num_frames"] == 1


def test_zero_length_video_says_the_file_is_empty(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    data = _write_json(tmp_path / "data.json", [_record("empty-clip", "empty.mp4")])

    with pytest.raises(
        VideoQAError, match=r"'empty-clip'.*empty\.mp4: cannot decode video \(the file is empty"
    ):
        VideoQADataset(data, sampling=SAMPLING)[0]


@pytest.mark.parametrize("content", ["", "\n \n"], ids=["zero bytes", "whitespace"])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_empty_record_file_is_an_error_not_an_empty_dataset(tmp_path, content, suffix):
    data = tmp_path / f"train{suffix}"
    data.write_text(content)

    for skip_invalid in (False, True):
        with pytest.raises(VideoQAError, match=rf"{data}: the file is empty"):
            VideoQADataset(data, skip_invalid=skip_invalid)


def test_empty_rollouts_file_is_zero_rollouts(tmp_path):
    (tmp_path / "rollouts.jsonl").write_bytes(b"")
    assert read_rollouts(tmp_path / "rollouts.jsonl") == []


# ====================================================================== unreadable files


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder anyone may enter (pytest's tmp_path sits under a 0700 folder), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="veripo-perm-"))
    folder.chmod(0o755)
    yield folder
    for p in folder.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    shutil.rmtree(folder)


@contextlib.contextmanager
def _unreadable(*paths: Path) -> Iterator[None]:
    """chmod 000 for the block; as root, which ignores file modes, also drop the effective uid to nobody."""
    for p in paths:
        p.chmod(0)
    as_root = os.geteuid() == 0
    if as_root:
        os.seteuid(65534)
    try:
        for p in paths:
            with contextlib.suppress(PermissionError), open(p, "rb"):
                pytest.skip("this user can read files whatever their mode (CAP_DAC_OVERRIDE?)")
        yield
    finally:
        if as_root:
            os.seteuid(0)
        for p in paths:
            p.chmod(0o644)


def test_unreadable_video_says_it_cannot_be_read(open_dir, good_video):
    shutil.copy(good_video, open_dir / "clip.mp4")
    data = _write_json(open_dir / "data.json", [_record("locked", "clip.mp4")])
    dataset = VideoQADataset(data, sampling=SAMPLING)  # the file exists: the record is valid
    load_video(good_video, SAMPLING)  # decord imported before dropping privileges

    with _unreadable(open_dir / "clip.mp4"), pytest.raises(VideoQAError) as err:
        dataset[0]

    message = str(err.value)
    assert "'locked'" in message and str(open_dir / "clip.mp4") in message
    assert "cannot read video file (PermissionError" in message  # not "cannot decode": the bytes are fine
    assert dataset[0]["video"].shape == (4, 56, 56, 3)  # readable again: nothing was cached or damaged


def test_unreadable_record_and_rollouts_files_raise_naming_the_file(open_dir, good_video):
    data = _write_json(open_dir / "data.json", [_record("a", good_video)])
    rollouts = open_dir / "rollouts.jsonl"
    write_jsonl_atomic(rollouts, [r.to_dict() for r in _group("q1")])

    with _unreadable(data, rollouts):
        with pytest.raises(PermissionError, match=str(data)):
            VideoQADataset(data)
        with pytest.raises(PermissionError, match=str(rollouts)):
            read_rollouts(rollouts)


def test_verifier_into_a_read_only_folder_fails_before_touching_the_last_run(open_dir):
    out = open_dir / "verifier"
    run_verifier(_group("q1"), RuleJudge(), PairConfig(), out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    out.chmod(0o555)
    as_root = os.geteuid() == 0
    if as_root:
        os.seteuid(65534)
    try:
        with pytest.raises(PermissionError, match=str(out)):
            run_verifier(_group("q1") + _group("q2"), RuleJudge(), PairConfig(), out, progress=False)
    finally:
        if as_root:
            os.seteuid(0)
        out.chmod(0o755)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ====================================================================== record files: bad lines, ids, Unicode


def test_bad_jsonl_line_in_the_middle_raises_or_is_skipped_keeping_its_neighbours(tmp_path, good_video):
    data = tmp_path / "data.jsonl"
    lines = [
        json.dumps(_record("before", good_video)),
        '{"problem_id": "cut',
        json.dumps(_record("after", good_video)),
    ]
    data.write_text("\n".join(lines) + "\n")

    with pytest.raises(VideoQAError, match=rf"{data}:2: invalid JSON line"):
        VideoQADataset(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = VideoQADataset(data, skip_invalid=True)

    assert [r.problem_id for r in dataset.records] == ["before", "after"]
    assert len(dataset.skipped) == 1 and f"{data}:2: invalid JSON line" in dataset.skipped[0]
    assert any("skipped 1 invalid record(s) of 3" in str(w.message) for w in caught)


def test_syntax_error_in_the_middle_of_a_json_list_names_the_line_even_with_skip_invalid(
    tmp_path, good_video
):
    data = tmp_path / "data.json"
    text = json.dumps([_record("a", good_video), _record("b", good_video)], indent=1)
    data.write_text(text.replace('"problem_id": "b"', '"problem_id": "b",,'))
    bad_line = text.splitlines().index(next(x for x in text.splitlines() if '"b"' in x)) + 1

    for skip_invalid in (False, True):
        with pytest.raises(VideoQAError, match=rf"{data}: invalid JSON at line {bad_line}"):
            VideoQADataset(data, skip_invalid=skip_invalid)


def test_bad_line_in_the_middle_of_a_pairs_file_names_the_line(tmp_path):
    run_verifier(_group("q1") + _group("q2"), RuleJudge(), PairConfig(), tmp_path, progress=False)
    lines = (tmp_path / PAIRS_FILE).read_text().splitlines()
    assert len(lines) >= 3
    lines[1] = lines[1][: len(lines[1]) // 2]
    (tmp_path / PAIRS_FILE).write_text("\n".join(lines) + "\n")

    with pytest.raises(ValueError, match=rf"{tmp_path / PAIRS_FILE}:2: not a JSON line"):
        read_pairs(tmp_path / PAIRS_FILE)


def test_duplicate_problem_id_names_both_records_or_keeps_the_first(tmp_path, good_video):
    records = [
        _record("twice", good_video),
        _record("other", good_video),
        _record("twice", good_video, problem="?"),
    ]
    data = _write_json(tmp_path / "data.json", records)

    with pytest.raises(
        VideoQAError, match=rf"{data} record #2: duplicate problem_id 'twice' \(first used by record #0\)"
    ):
        VideoQADataset(data)
    with pytest.warns(UserWarning, match="skipped 1 invalid record"):
        dataset = VideoQADataset(data, skip_invalid=True)
    assert [(r.problem_id, r.problem) for r in dataset.records] == [
        ("twice", "What colour is the moving square?"),
        ("other", "What colour is the moving square?"),
    ]


def test_integer_problem_ids_are_compared_as_text(tmp_path, good_video):
    data = _write_json(tmp_path / "data.json", [_record(7, good_video), _record("7", good_video)])
    with pytest.raises(VideoQAError, match="duplicate problem_id '7'"):
        VideoQADataset(data)


def test_utf8_byte_order_mark_is_accepted(tmp_path, good_video):
    records = [_record("caf\u00e9", good_video)]
    data = tmp_path / "data.json"
    data.write_bytes(b"\xef\xbb\xbf" + json.dumps(records, ensure_ascii=False).encode("utf-8"))
    assert read_records(data) == records


def test_unicode_line_separators_inside_jsonl_strings_do_not_split_records(tmp_path, good_video):
    problem = "Line\u2028separator, next\x85line, file\x1cseparator: which colour?"
    data = tmp_path / "data.jsonl"
    data.write_text(
        "\r\n".join(json.dumps(_record(k, good_video, problem=problem), ensure_ascii=False) for k in "ab")
    )

    assert [(r.problem_id, r.problem) for r in VideoQADataset(data).records] == [
        ("a", problem),
        ("b", problem),
    ]


def test_non_utf8_line_in_a_jsonl_file_is_a_whole_file_error(tmp_path, good_video):
    data = tmp_path / "data.jsonl"
    good = json.dumps(_record("a", good_video)).encode()
    data.write_bytes(
        good + b"\n" + json.dumps(_record("caf\u00e9", good_video), ensure_ascii=False).encode("latin-1")
    )

    for skip_invalid in (False, True):
        with pytest.raises(VideoQAError, match=rf"{data}: not UTF-8 text"):
            VideoQADataset(data, skip_invalid=skip_invalid)


def test_lone_surrogate_escape_is_rejected_at_load_not_in_the_tokenizer(tmp_path, good_video):
    data = tmp_path / "data.json"
    records = [_record("ok", good_video), _record("broken", good_video, problem="What colour\\ud800 is it?")]
    data.write_text(json.dumps(records).replace("\\\\ud800", "\\ud800"))  # the JSON holds the escape itself

    with pytest.raises(
        VideoQAError, match=r"record #1 \(problem_id='broken'\): problem is not valid Unicode"
    ):
        VideoQADataset(data)
    with pytest.warns(UserWarning, match="skipped 1"):
        assert [r.problem_id for r in VideoQADataset(data, skip_invalid=True).records] == ["ok"]


def test_wrong_field_types_are_named_at_load(tmp_path, good_video):
    records = [_record("a", good_video, problem=["a", "list"], options="ABCD"), _record("b", 42)]
    data = _write_json(tmp_path / "data.json", records)

    with pytest.warns(UserWarning, match="skipped 2"):
        dataset = VideoQADataset(data, skip_invalid=True)

    assert dataset.records == []
    assert "['problem', 'options'] have the wrong type" in dataset.skipped[0]
    assert "['path'] have the wrong type" in dataset.skipped[1]


def test_non_utf8_rollouts_file_names_the_file_and_line(tmp_path):
    rows = [json.dumps(r.to_dict(), ensure_ascii=False) for r in _group("caf\u00e9")]
    path = tmp_path / ROLLOUTS_FILE
    path.write_bytes((rows[0] + "\n").encode() + (rows[1] + "\n").encode("latin-1"))

    with pytest.raises(ValueError, match=rf"{path}:2: not UTF-8 text"):
        read_rollouts(path)


def test_text_that_cannot_be_encoded_fails_before_any_file_is_made(tmp_path):
    target = tmp_path / PAIRS_FILE
    target.write_text('{"previous": true}\n')

    with pytest.raises(ValueError, match=rf"cannot write {target}: the text is not valid Unicode"):
        write_jsonl_atomic(target, [{"completion": "ok"}, {"completion": "lone \ud800 surrogate"}])

    assert target.read_text() == '{"previous": true}\n' and _temp_files(tmp_path) == []


# ====================================================================== prompts beyond the context


def test_prompt_beyond_the_model_context_raises_naming_the_record_and_token_counts(
    tmp_path, tiny_model_dir, processor, good_video
):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    context = config.text_config.max_position_embeddings
    question = "Which colour is the square, and why? " * 1500  # ~10k tokens with the tiny BPE
    data = _write_json(
        tmp_path / "data.json", [_record("fine", good_video), _record("huge", good_video, problem=question)]
    )
    dataset = VideoQADataset(data, sampling=SAMPLING)
    collate = VideoQACollator(processor, SAMPLING)  # default limit: what the checkpoint declares

    assert collate.max_prompt_tokens == context == 8192
    with pytest.raises(VideoQAError) as err:
        collate([dataset[0], dataset[1]])

    message = str(err.value)
    (count,) = [int(n) for n in re.findall(r"\('huge', (\d+)\)", message)]
    assert count > context and f"max_prompt_tokens={context}" in message and "'fine'" not in message
    assert collate([dataset[0]])["input_ids"].shape[0] == 1  # the normal question still batches


def test_max_prompt_tokens_is_an_exact_limit_set_on_the_datamodule(synthetic_dir, tiny_model_dir):
    def first_batch(limit: int | None) -> dict[str, Any]:
        dm = VideoQADataModule(
            train_path=str(synthetic_dir / "train.json"), sampling=SAMPLING, batch_size=2,
            processor_path=str(tiny_model_dir), shuffle=False, max_prompt_tokens=limit,
        )  # fmt: skip
        return next(iter(dm.train_dataloader()))

    lengths = first_batch(None)["attention_mask"].sum(-1).tolist()
    longest = max(lengths)

    assert first_batch(longest)["input_ids"].shape[0] == 2
    with pytest.raises(
        VideoQAError, match=rf"train-\w+-0000\d', {longest}\).*max_prompt_tokens={longest - 1}"
    ):
        first_batch(longest - 1)


# ====================================================================== rewards inside a GRPO step


def _nan_for_direction_questions(completion: str, record: VideoQARecord) -> float:
    return math.nan if "direction" in record.problem_id else 0.5


def _beyond_float32(completion: str, record: VideoQARecord) -> float:
    return 1e39  # finite as a Python float, inf once in the float32 reward tensor


def _needs_missing_field(completion: str, record: VideoQARecord) -> float:
    return float(record.to_dict()["subtitles"])


GRPO_REWARD_BUGS = {
    "NaN": (_nan_for_direction_questions, ValueError,
            r"reward '_nan_for_direction_questions' returned nan for problem_id='train-direction-00001'"),
    "beyond float32": (_beyond_float32, ValueError,
                       r"reward '_beyond_float32' returned 1e\+39 .*problem_id='train-colour-00000'.*overflows"),
    "raises": (_needs_missing_field, RuntimeError,
               r"reward '_needs_missing_field' failed on problem_id='train-colour-00000': KeyError"),
}  # fmt: skip


@pytest.mark.parametrize("bug", list(GRPO_REWARD_BUGS))
def test_reward_bug_stops_a_grpo_fit_naming_the_reward_and_problem_before_any_update(
    backbone: VideoLLM, synthetic_dir: Path, bug: str
):
    fn, error, message = GRPO_REWARD_BUGS[bug]
    module = GRPOModule(backbone, rewards=RewardSet([fn]), num_generations=2, max_new_tokens=2, lr=1e-2)
    data = VideoQADataModule(train_path=str(synthetic_dir / "train.json"), sampling=SAMPLING, batch_size=2,
                             shuffle=False)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    torch.manual_seed(0)

    with pytest.raises(error, match=message) as err:
        trainer.fit(module, datamodule=data)

    if bug == "raises":
        assert isinstance(err.value.__cause__, KeyError)  # the user's own traceback is kept
    assert trainer.global_step == 0  # no optimiser step was taken on a poisoned advantage


def test_weighted_total_beyond_float32_is_refused():
    record = VideoQARecord("q-big", "?", "video", "numerical", "<answer>3</answer>")
    # each weighted value fits in float32, their sum does not
    rewards = RewardSet(["format", LengthReward(1, 4)], weights=[3e38, 3e38])
    completion = "<think>one two</think><answer>3</answer>"

    with pytest.raises(
        ValueError, match=r"reward 'length' .*weight 3e\+38.*problem_id='q-big'.*overflows float32"
    ):
        rewards.score([completion], [record])


# ====================================================================== judge servers that hang


class _StallingServer(ThreadingHTTPServer):
    """An OpenAI-compatible server whose GET /models and POST /chat/completions answer, hang or trickle.

    Hand-written only because a real server cannot be made to do this: `transformers serve` neither accepts a
    request and never answers nor trickles its answer. Faults a real server does produce (not running, killed
    mid-run, restarted) are tested against `transformers serve` itself in test_llm_judges.py."""

    daemon_threads = True

    def __init__(self, on_get: str, on_post: str) -> None:
        super().__init__(("127.0.0.1", 0), _StallingHandler)
        self.behaviour = {"GET": on_get, "POST": on_post}
        self.release = threading.Event()  # set at teardown: hung handlers return
        self.lock = threading.Lock()
        self.requests = {"GET": 0, "POST": 0}  # requests received
        self.in_flight = {"GET": 0, "POST": 0}
        self.peak = {"GET": 0, "POST": 0}  # most requests of a kind being served at once

    def handle_error(self, request: Any, client_address: Any) -> None:  # the client gave up and hung up
        pass


class _StallingHandler(BaseHTTPRequestHandler):
    server: _StallingServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _act(self, method: str, answer: bytes) -> None:
        srv = self.server
        with srv.lock:
            srv.requests[method] += 1
            srv.in_flight[method] += 1
            srv.peak[method] = max(srv.peak[method], srv.in_flight[method])
        try:
            self._serve(method, answer)
        finally:
            with srv.lock:
                srv.in_flight[method] -= 1

    def _serve(self, method: str, answer: bytes) -> None:
        behaviour = self.server.behaviour[method]
        if behaviour == "hang":  # accept the request, never answer
            self.server.release.wait()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer) if behaviour == "answer" else 10**6))
        self.end_headers()
        if behaviour == "answer":
            self.wfile.write(answer)
            return
        while not self.server.release.wait(0.02):  # "trickle": one byte at a time, never finishing
            self.wfile.write(b" ")
            self.wfile.flush()

    def do_GET(self) -> None:
        self._act("GET", json.dumps({"data": [{"id": "judge"}]}).encode())

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        reply = {"choices": [{"message": {"role": "assistant", "content": "VERDICT: CONSISTENT"}}]}
        self._act("POST", json.dumps(reply).encode())


@contextlib.contextmanager
def _stalling_judge(on_get: str, on_post: str, **options: Any) -> Iterator[OpenAIJudge]:
    srv = _StallingServer(on_get, on_post)
    thread = threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    host, port = srv.server_address[:2]
    try:
        judge = OpenAIJudge(
            f"http://{host}:{port}", "judge", **({"timeout_s": 0.2, "backoff_s": 0.01} | options)
        )
        judge.test_server = srv  # type: ignore[attr-defined]  # what the server saw, for the tests
        yield judge
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()


def _bounded(fn: Callable[[], Any], limit_s: float) -> tuple[Any, float]:
    """fn() in a thread; fail (instead of hanging the suite) when it takes longer than limit_s.

    A hang guard, not a speed test: the limits are far above what the timeouts under test add up to."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as err:
            out["error"] = err

    t0 = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"still waiting on the judge after {limit_s} s"
    if "error" in out:
        raise out["error"]
    return out["value"], time.monotonic() - t0


def _item(question: str = "What colour?") -> JudgeItem:
    return JudgeItem("q1", question, tuple(OPTIONS), "It is green, so B.", "B", "<think>…</think>")


def test_judge_server_that_hangs_at_the_start_check_fails_loudly_in_bounded_time():
    with _stalling_judge("hang", "answer", max_retries=1) as judge:
        with pytest.raises(JudgeUnavailableError, match="no OpenAI-compatible server answers.*timed out"):
            _bounded(lambda: judge.judge([_item()]), limit_s=60)


def test_judge_server_that_trickles_its_answer_gives_unjudged_verdicts_in_bounded_time():
    """A server that never answers at all is test_judges.py's `..._times_out_slow_requests_into_unjudged`; one
    that keeps sending a byte now and then never trips the per-read socket timeout."""
    with _stalling_judge("answer", "trickle", max_retries=1, max_concurrency=4) as judge:
        verdicts, _ = _bounded(lambda: judge.judge([_item(f"q{i}") for i in range(4)]), limit_s=60)
        srv = judge.test_server

    assert [v.consistent for v in verdicts] == [None] * 4
    assert all("after 2 attempts" in v.rationale and "timed out" in v.rationale for v in verdicts)
    # Counts, not seconds: every item was tried exactly twice (max_retries=1), each attempt given up on its own
    # deadline (the server would trickle forever).
    assert srv.requests["POST"] == 4 * 2


def test_verifier_with_a_hanging_judge_writes_every_rollout_as_unjudged(tmp_path):
    rollouts = _group("q1") + _group("q2")
    with _stalling_judge("answer", "hang", max_retries=0, max_concurrency=8) as judge:
        stats, _ = _bounded(lambda: run_verifier(rollouts, judge, PairConfig(), tmp_path, progress=False), 60)

    assert stats["num_rollouts"] == 8 and stats["unjudged"] == 8 and stats["judged"] == 0
    assert stats["judge_errors"] == 8, "every rollout was lost to the judge's timeouts, none abstained"
    verdicts = _jsonl_rows(tmp_path / VERDICTS_FILE)
    assert len(verdicts) == 8 and all(
        v["consistent"] is None and "timed out" in v["rationale"] for v in verdicts
    )
    assert json.loads((tmp_path / STATS_FILE).read_text())["unjudged"] == 8


# ====================================================================== disk full and SIGTERM while writing

_THINKING = [
    ("The square is green in every frame, so the answer is B.", "B", 1.0),
    ("Wait, the first frame is dark; looking again the square is green, so the answer is B.", "B", 1.0),
    ("The square looks blue in the first frame, so the answer is C.", "C", 0.0),
    ("The square looks blue in the first frame, so the answer is C.", "B", 1.0),
]


def _group(problem_id: str, step: int = 0, padding: int = 0) -> list[Rollout]:
    """One question's four rollouts, which the rule judge turns into two preference pairs; `padding` words of
    distinct filler (not repetitive) go before each reasoning."""
    record = VideoQARecord(problem_id, "What colour is the square?", "video", "multiple choice",
                           "<answer>B</answer>", f"{problem_id}.mp4", tuple(OPTIONS))  # fmt: skip
    filler = "".join(f"frame{k} " for k in range(padding))
    return [
        Rollout(record=record, completion=f"<think>{filler}{think}</think><answer>{answer}</answer>",
                completion_ids=[], rewards={"accuracy": acc, "format": 1.0}, reward=acc + 0.5, advantage=0.0,
                group_mean_accuracy=0.75, truncated=False, step=step, sample_index=i)
        for i, (think, answer, acc) in enumerate(_THINKING)
    ]  # fmt: skip


class _FailingFile:
    """Writes the first half of what it is given, then fails as a full disk does."""

    def __init__(self, f: Any) -> None:
        self.f = f

    def write(self, data: bytes) -> int:
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)

    def __enter__(self) -> _FailingFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.f.close()


def _break_writes_to(monkeypatch: pytest.MonkeyPatch, make: Callable[[Any], Any], *names: str) -> list[str]:
    """Temp files for `names` (as write_text_atomic names them) open through `make`; returns their paths."""
    real_mkstemp, real_fdopen = tempfile.mkstemp, os.fdopen
    opened: dict[int, str] = {}
    broken: list[str] = []

    def mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        fd, path = real_mkstemp(*args, **kwargs)
        opened[fd] = path
        return fd, path

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        f = real_fdopen(fd, *args, **kwargs)
        path = opened.pop(fd, "")
        if any(Path(path).name.startswith(f".{name}.") for name in names):
            broken.append(path)
            return make(f)
        return f

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "fdopen", fdopen)
    return broken


def test_disk_full_while_writing_leaves_the_previous_file_or_none(tmp_path, monkeypatch):
    kept, fresh = tmp_path / "kept.jsonl", tmp_path / "fresh.jsonl"
    kept.write_text('{"previous": 1}\n')
    rows = [{"i": i, "text": "x" * 100} for i in range(1000)]
    broken = _break_writes_to(monkeypatch, _FailingFile, "kept.jsonl", "fresh.jsonl")

    for target in (kept, fresh):
        with pytest.raises(OSError) as err:
            write_jsonl_atomic(target, rows)
        assert err.value.errno == errno.ENOSPC and f"cannot write {target}: No space left" in str(err.value)
        assert isinstance(err.value.__cause__, OSError)

    assert len(broken) == 2 and all(not Path(p).exists() for p in broken)  # the half-written temp files
    assert kept.read_text() == '{"previous": 1}\n' and not fresh.exists()
    assert _temp_files(tmp_path) == []


def test_disk_full_while_writing_pairs_keeps_the_last_pairs_and_marks_the_run_unfinished(
    tmp_path, monkeypatch
):
    run_verifier(_group("old"), RuleJudge(), PairConfig(), tmp_path, progress=False)
    old_pairs = (tmp_path / PAIRS_FILE).read_bytes()
    new = _group("q1") + _group("q2", step=1)
    broken = _break_writes_to(monkeypatch, _FailingFile, PAIRS_FILE)

    with pytest.raises(OSError, match=rf"\[Errno {errno.ENOSPC}\] cannot write {tmp_path / PAIRS_FILE}"):
        run_verifier(new, RuleJudge(), PairConfig(), tmp_path, progress=False)

    assert len(broken) == 1 and _temp_files(tmp_path) == []
    assert (tmp_path / PAIRS_FILE).read_bytes() == old_pairs  # the previous complete file
    assert not (tmp_path / STATS_FILE).exists()  # so neither the callback nor the loop takes it as finished
    assert len(_jsonl_rows(tmp_path / ROLLOUTS_FILE)) == len(_jsonl_rows(tmp_path / VERDICTS_FILE)) == 8

    monkeypatch.undo()  # space freed: the same call completes
    stats = run_verifier(new, RuleJudge(), PairConfig(), tmp_path, progress=False)
    assert len(_jsonl_rows(tmp_path / PAIRS_FILE)) == stats["pairs"] == 4 and (tmp_path / STATS_FILE).exists()


def _fork(child: Callable[[int], None]) -> tuple[int, int]:
    """Run child(pipe) in a forked copy of this process; (pid, read end of the pipe). The child exits when
    child returns (status 0), raises (status 1, the error written to the pipe), or after 30 s (SIGALRM)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        status = 1
        try:
            os.close(read_end)
            for sig in (signal.SIGTERM, signal.SIGALRM):
                signal.signal(sig, signal.SIG_DFL)
            signal.alarm(30)
            child(write_end)
            status = 0
        except BaseException as err:
            os.write(write_end, f"error {type(err).__name__}: {err}\n".encode())
        finally:
            os._exit(status)
    os.close(write_end)
    return pid, read_end


def _read_line(fd: int, timeout_s: float = 20.0) -> str:
    data = b""
    deadline = time.monotonic() + timeout_s
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, "the child process said nothing in time"
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode()


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return status


def test_real_write_failure_from_a_file_size_limit_leaves_no_partial_file(tmp_path):
    target = tmp_path / PAIRS_FILE
    target.write_text('{"previous": 1}\n')
    rows = [{"i": i, "text": "x" * 1000} for i in range(1000)]  # ~1 MB

    def child(pipe: int) -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so the kernel answers EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            write_jsonl_atomic(target, rows)
        except OSError as err:
            os.write(pipe, f"{err.errno} {err}\n".encode())

    pid, pipe = _fork(child)
    reply = _read_line(pipe)
    assert _wait(pid) == 0, reply

    assert reply.startswith(f"{errno.EFBIG} [Errno {errno.EFBIG}] cannot write {target}: File too large"), (
        reply
    )
    assert target.read_text() == '{"previous": 1}\n' and _temp_files(tmp_path) == []


def test_sigterm_while_the_verifier_writes_pairs_leaves_complete_files_and_no_stats(tmp_path):
    """The child stops half-way through writing a ~0.5 MB pairs.jsonl (so the kill lands mid-write for sure)."""
    run_verifier(_group("old"), RuleJudge(), PairConfig(), tmp_path, progress=False)
    old_pairs = (tmp_path / PAIRS_FILE).read_bytes()
    new = [r for k in range(40) for r in _group(f"q{k:03d}", padding=300)]

    def child(pipe: int) -> None:
        class Stalling(_FailingFile):
            written = 0

            def write(self, data: bytes) -> int:  # rows are streamed: pass the first 100 KB, then stall
                if Stalling.written <= 110_000:
                    Stalling.written += len(data)
                    return self.f.write(data)
                self.f.write(data[: len(data) // 2])  # stop inside a line
                self.f.flush()
                os.fsync(self.f.fileno())
                os.write(pipe, b"half written\n")
                time.sleep(60)
                return 0

        _break_writes_to(pytest.MonkeyPatch(), Stalling, PAIRS_FILE)  # a fresh process: no need to undo
        run_verifier(new, RuleJudge(), PairConfig(), tmp_path, progress=False)

    pid, pipe = _fork(child)
    assert _read_line(pipe) == "half written\n"
    (partial,) = tmp_path.glob(f".{PAIRS_FILE}.*.tmp")
    assert partial.stat().st_size > 100_000 and not partial.read_bytes().endswith(b"\n")  # a torn temp file
    os.kill(pid, signal.SIGTERM)
    status = _wait(pid)

    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert (tmp_path / PAIRS_FILE).read_bytes() == old_pairs  # never the torn one
    assert len(_jsonl_rows(tmp_path / ROLLOUTS_FILE)) == len(_jsonl_rows(tmp_path / VERDICTS_FILE)) == 160
    assert not (tmp_path / STATS_FILE).exists()

    stats = run_verifier(new, RuleJudge(), PairConfig(), tmp_path, progress=False)  # the re-run tidies up
    assert _temp_files(tmp_path) == [] and (tmp_path / STATS_FILE).exists()
    assert len(_jsonl_rows(tmp_path / PAIRS_FILE)) == stats["pairs"] == 80


def test_sigterm_at_any_moment_of_repeated_large_writes_never_leaves_a_torn_file(tmp_path):
    """No hooks: a child rewrites a ~2 MB file in a loop and is killed at arbitrary moments."""
    target = tmp_path / PAIRS_FILE
    versions = {v: [{"version": v, "i": i, "text": "y" * 150} for i in range(12_000)] for v in ("a", "b")}

    for delay in (0.0, 0.017, 0.07):
        target.unlink(missing_ok=True)

        def child(pipe: int) -> None:
            write_jsonl_atomic(target, versions["a"])
            os.write(pipe, b"first written\n")
            for k in range(1000):
                write_jsonl_atomic(target, versions["ab"[k % 2]])

        pid, pipe = _fork(child)
        assert _read_line(pipe) == "first written\n"
        time.sleep(delay)
        os.kill(pid, signal.SIGTERM)
        status = _wait(pid)
        os.close(pipe)

        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        rows = _jsonl_rows(target)
        assert rows in (versions["a"], versions["b"])


# ====================================================================== properties on arbitrary input

_PIECES = st.sampled_from(
    ["<think>", "</think>", "<answer>", "</answer>", "VERDICT: CONSISTENT", "VERDICT: INCONSISTENT",
     "REASON:", "so the answer is ", "A", "B", "(c)", " ", "\n", "1,200", "-0.5", "1e400", "nan", "\ud7ff"]
)  # fmt: skip
ARBITRARY = st.one_of(
    st.text(max_size=120), st.lists(st.one_of(_PIECES, st.text(max_size=6)), max_size=20).map("".join)
)
_RECORDS = st.builds(
    VideoQARecord,
    problem_id=st.text(max_size=8),
    problem=ARBITRARY,
    data_type=st.just("video"),
    problem_type=st.sampled_from(PROBLEM_TYPES),
    solution=st.one_of(ARBITRARY, ARBITRARY.map(lambda s: f"<answer>{s}</answer>")),
    options=st.lists(st.text(max_size=10), max_size=6).map(tuple),
)


@settings(max_examples=200, deadline=None)
@given(_RECORDS, ARBITRARY)
def test_accuracy_of_any_record_is_in_the_unit_interval_or_a_data_error_naming_it(record, completion):
    try:
        value = accuracy_reward(completion, record)
    except ValueError as err:  # a ground truth that cannot be scored (no letter, no number)
        assert repr(record.problem_id) in str(err)
        with pytest.raises(RuntimeError, match=r"reward 'accuracy' failed on problem_id="):
            RewardSet(["accuracy"]).score([completion], [record])
    else:
        assert isinstance(value, float) and 0.0 <= value <= 1.0


@settings(max_examples=200, deadline=None)
@given(ARBITRARY, ARBITRARY, st.lists(st.text(max_size=10), max_size=30))
def test_answer_scorers_on_arbitrary_pairs_score_or_refuse_the_ground_truth(pred, gt, options):
    for score in (numerical_accuracy, regression_accuracy, lambda p, g: choice_accuracy(p, g, options)):
        try:
            value = score(pred, gt)
        except ValueError as err:
            assert "ground truth" in str(err)
        else:
            assert isinstance(value, float) and 0.0 <= value <= 1.0


_TYPED = [
    VideoQARecord("mc", "?", "video", "multiple choice", "<answer>B</answer>", options=tuple(OPTIONS)),
    VideoQARecord("num", "?", "video", "numerical", "<answer>1,200</answer>"),
    VideoQARecord("reg", "?", "video", "regression", "<answer>-0.5</answer>"),
    VideoQARecord("ocr", "?", "video", "OCR", "<answer>EXIT 12</answer>"),
    VideoQARecord("free", "?", "video", "free-form", "<answer>the square moves left</answer>"),
]


@settings(max_examples=100, deadline=None)
@given(st.lists(ARBITRARY, min_size=1, max_size=4))
def test_reward_totals_of_arbitrary_completions_on_every_problem_type_are_finite(texts):
    rewards = RewardSet(["accuracy", "format", LengthReward(2, 8)], weights=[1.0, 0.5, 0.25])
    completions = [t for t in texts for _ in _TYPED]
    records = [r for _ in texts for r in _TYPED]

    components, total = rewards.score(completions, records)

    for values in components.values():
        assert ((values >= 0) & (values <= 1)).all()
    expected = components["accuracy"] + 0.5 * components["format"] + 0.25 * components["length"]
    assert torch.isfinite(total).all() and torch.allclose(total, expected)


@settings(max_examples=200, deadline=None)
@given(ARBITRARY, ARBITRARY, st.sampled_from(PROBLEM_TYPES), st.booleans())
def test_judge_reply_parser_and_rule_judge_never_raise_on_arbitrary_text(
    reply, completion, problem_type, cut
):
    consistent, rationale = parse_verdict(reply)
    assert consistent in (True, False, None) and isinstance(rationale, str)
    assert (consistent is None) == rationale.startswith("unjudged")

    item = JudgeItem.from_rollout(
        Rollout(record=VideoQARecord("q", "?", "video", problem_type, "<answer>B</answer>", options=tuple(OPTIONS)),
                completion=completion, completion_ids=[], rewards={}, reward=0.0, advantage=0.0,
                group_mean_accuracy=0.0, truncated=cut, step=0, sample_index=0)
    )  # fmt: skip
    (verdict,) = RuleJudge().judge([item])
    assert verdict.consistent in (True, False, None) and verdict.truncated == cut


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | ARBITRARY,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
_FIELDS = ["problem_id", "problem", "data_type", "problem_type", "options", "solution", "path"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_record_file_gives_valid_records_or_a_clear_error(synthetic_dir, data):
    good = _record("seed", str(synthetic_dir / "videos" / "train_00000.mp4"))
    raw_records = data.draw(
        st.lists(
            st.one_of(
                st.fixed_dictionaries({k: st.one_of(st.just(v), _JSON) for k, v in good.items()}),
                st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=7),
                _JSON,
            ),
            max_size=4,
        )
    )
    lines = [json.dumps(r) for r in raw_records] + data.draw(st.lists(ARBITRARY, max_size=2))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.jsonl"
        path.write_text("\n".join(lines), encoding="utf-8")
        try:
            strict = VideoQADataset(path, root=synthetic_dir)
        except VideoQAError as err:
            assert str(path) in str(err)
        else:
            assert all(r.problem_type in PROBLEM_TYPES for r in strict.records)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lenient = VideoQADataset(path, root=synthetic_dir, skip_invalid=True)
        except VideoQAError as err:  # only whole-file problems survive skip_invalid
            assert "not UTF-8" in str(err) or "the file is empty" in str(err)
        else:
            for r in lenient.records:
                assert isinstance(r.problem, str) and isinstance(r.solution, str)
                assert all(isinstance(o, str) for o in r.options) and Path(r.path).is_file()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=40), _JSON.map(json.dumps).map(str.encode)), max_size=4))
def test_any_rollouts_file_gives_rollouts_or_an_error_naming_the_line(lines):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ROLLOUTS_FILE
        path.write_bytes(b"\n".join(lines))
        try:
            rollouts = read_rollouts(path)
        except ValueError as err:
            assert f"{path}:" in str(err)
        else:
            assert all(isinstance(r, Rollout) for r in rollouts)
