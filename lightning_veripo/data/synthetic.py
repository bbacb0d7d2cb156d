"""A learnable synthetic video-QA task written as real .mp4 files and Video-R1-format JSON.

Each clip shows coloured squares on a grey background; one of them moves. The questions can only be answered
from the frames, and each task is selected by name:

- `colour`: the colour of the moving square (multiple choice, one frame suffices; chance 25%);
- `direction`: the direction it moves (multiple choice, needs two frames compared; chance 25%);
- `count`: the number of squares (numerical, 1-3; chance 33%);
- `colour_direction`: which option describes the moving square, e.g. "red, moving up" (multiple choice; needs
  both observations combined: each wrong option shares the colour or the direction with the right one, so one
  observation alone leaves a coin flip; chance 25%).

Every record also carries a Video-R1-style chain of thought in `process` (what a viewer would reason), used as
the supervised warm start's target.
"""

from __future__ import annotations

import json
import numbers
import random
from pathlib import Path
from typing import Any

import numpy as np

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 60, 230), "yellow": (230, 220, 30)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
TASKS = ("colour", "direction", "count", "colour_direction")


def _clip(
    rng: random.Random, size: int, num_frames: int, colour: str, direction: str, count: int
) -> np.ndarray:
    """Frames [F, size, size, 3]: `count` squares, the first of `colour` moving in `direction`."""
    frames = np.full((num_frames, size, size, 3), 128, dtype=np.uint8)
    side = size // 4
    travel = size - side - 4
    dx, dy = DIRECTIONS[direction]
    start_x = 2 if dx > 0 else (size - side - 2 if dx < 0 else rng.randint(2, size - side - 2))
    start_y = 2 if dy > 0 else (size - side - 2 if dy < 0 else rng.randint(2, size - side - 2))
    others = [c for c in COLOURS if c != colour]
    # the moving square sweeps a band; static squares go where they overlap neither it nor each other,
    # so the count a viewer sees is the count in the label
    end_x, end_y = start_x + dx * travel, start_y + dy * travel
    band = (
        min(start_x, end_x) - 1,
        min(start_y, end_y) - 1,
        max(start_x, end_x) + side + 1,
        max(start_y, end_y) + side + 1,
    )
    small = side // 2
    boxes: list[tuple[int, int, int, int]] = [band]
    statics = []
    while len(statics) < count - 1:
        sx, sy = rng.randint(0, size - small), rng.randint(0, size - small)
        box = (sx - 1, sy - 1, sx + small + 1, sy + small + 1)
        if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
            boxes.append(box)
            statics.append((sx, sy, rng.choice(others)))
    for f in range(num_frames):
        t = f / max(num_frames - 1, 1)
        for sx, sy, c in statics:
            frames[f, sy : sy + small, sx : sx + small] = COLOURS[c]
        x = int(start_x + dx * t * travel)
        y = int(start_y + dy * t * travel)
        frames[f, y : y + side, x : x + side] = COLOURS[colour]
    return frames


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = 8, index_first: bool = False) -> None:
    """Encode RGB frames [F, H, W, 3] uint8 as an .mp4 file with PyAV.

    `index_first` puts the index (moov atom) before the frames ("faststart", as streamed files have it)."""
    import av

    options = {"movflags": "faststart"} if index_first else {}
    with av.open(str(path), mode="w", options=options) as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 400_000
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _letter(i: int) -> str:
    return chr(65 + i)


def _colour_direction_options(rng: random.Random, colour: str, direction: str) -> tuple[list[str], int]:
    """Four "colour, moving direction" options: the right one, one sharing only its colour, one sharing only its
    direction, one sharing neither; shuffled. Returns the options' contents and the right one's index."""
    other_colours = rng.sample([c for c in COLOURS if c != colour], 2)
    other_directions = rng.sample([d for d in DIRECTIONS if d != direction], 2)
    contents = [(colour, direction), (colour, other_directions[0]), (other_colours[0], direction),
                (other_colours[1], other_directions[1])]  # fmt: skip
    order = list(range(4))
    rng.shuffle(order)
    shuffled = [contents[i] for i in order]
    return [f"{c}, moving {d}" for c, d in shuffled], order.index(0)


def _record(
    task: str, pid: str, path: str, colour: str, direction: str, count: int, rng: random.Random
) -> dict:
    base = {"problem_id": pid, "data_type": "video", "path": path}
    if task == "colour":
        right = list(COLOURS).index(colour)
        return {**base, "problem": "What colour is the moving square?", "problem_type": "multiple choice",
                "options": [f"{_letter(i)}. {c}" for i, c in enumerate(COLOURS)],
                "process": f"The moving square is {colour}, so the answer is {_letter(right)}.",
                "solution": f"<answer>{_letter(right)}</answer>"}  # fmt: skip
    if task == "direction":
        right = list(DIRECTIONS).index(direction)
        return {**base, "problem": "Which direction does the square move?", "problem_type": "multiple choice",
                "options": [f"{_letter(i)}. {d}" for i, d in enumerate(DIRECTIONS)],
                "process": f"The square moves {direction}, so the answer is {_letter(right)}.",
                "solution": f"<answer>{_letter(right)}</answer>"}  # fmt: skip
    if task == "count":
        return {**base, "problem": "How many squares are in the video?", "problem_type": "numerical",
                "options": [], "process": f"I count {count} squares, so the answer is {count}.",
                "solution": f"<answer>{count}</answer>"}  # fmt: skip
    if task == "colour_direction":
        contents, right = _colour_direction_options(rng, colour, direction)
        return {**base, "problem": "Which option describes the moving square?", "problem_type": "multiple choice",
                "options": [f"{_letter(i)}. {c}" for i, c in enumerate(contents)],
                "process": f"The moving square is {colour}. It moves {direction}. "
                           f"So it is {colour}, moving {direction}: the answer is {_letter(right)}.",
                "solution": f"<answer>{_letter(right)}</answer>"}  # fmt: skip
    raise ValueError(f"unknown synthetic task {task!r}; expected one of {TASKS}")


# Squares are size // 4 (moving) and size // 8 (static, count task) pixels wide: below 32 pixels the static
# ones are under 4 pixels and the mpeg4 encoding (2x2 colour subsampling) blurs them past counting.
MIN_SIZE = 32


def _check_arguments(
    num_train: int, num_val: int, num_test: int, tasks: Any, size: int, num_frames: int, fps: int
) -> None:
    """ValueError naming the first argument out of its allowed range."""
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"make_synthetic_data: tasks={tasks!r} must be a non-empty list of tasks {TASKS}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown synthetic task(s) {unknown}; expected a subset of {TASKS}")
    limits = (
        ("num_train", num_train, 1, "the training split needs at least one record"),
        ("num_val", num_val, 0, "0 writes an empty val.json"),
        ("num_test", num_test, 0, "0 writes no test.json"),
        ("size", size, MIN_SIZE, f"clips are size x size pixels; smaller squares blur away below {MIN_SIZE}"),
        ("num_frames", num_frames, 2, "the square must move, and Qwen-VL encodes frames in pairs"),
        ("fps", fps, 1, "frames per second of the written .mp4"),
    )
    for name, value, low, why in limits:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"make_synthetic_data: {name}={value!r} must be an integer >= {low} ({why})")


def _check_decodable(path: Path, num_frames: int, size: int) -> None:
    """Read the clip back with decord, as VideoQADataset will: some frame sizes (e.g. 48 or 72 pixels) come
    back with a wrong channel count from decord's mpeg4 decoding, which would fail only later, in training."""
    try:
        import decord
    except ImportError:  # nothing to check against; the data loader will report it
        return
    expected = (num_frames, size, size, 3)
    try:
        reader = decord.VideoReader(str(path), num_threads=1)
        shape = tuple(reader.get_batch(list(range(len(reader)))).asnumpy().shape)
        got = f"frames of shape {shape}"
    except Exception as e:  # decord raises its own DECORDError
        shape, got = None, type(e).__name__
    if shape != expected:
        path.unlink(missing_ok=True)
        raise ValueError(
            f"make_synthetic_data: size={size} writes clips that decord cannot read back ({got}, expected "
            f"frames of shape {expected}); choose another size, e.g. 56 (the default) or 64"
        )


def make_synthetic_data(
    out_dir: str | Path,
    num_train: int = 32,
    num_val: int = 16,
    seed: int = 0,
    tasks: tuple[str, ...] | list[str] = ("colour",),
    size: int = 56,
    num_frames: int = 8,
    fps: int = 8,
    num_test: int = 0,
) -> Path:
    """Write `videos/*.mp4`, `train.json`, `val.json` and, with `num_test` > 0, `test.json` (Video-R1 format,
    paths relative) to `out_dir`. Tasks alternate within each split (record i asks `tasks[i % len(tasks)]`).

    Keep the splits' roles apart: tune on `val.json` (the development split), report on `test.json`.

    Raises ValueError, before writing anything, for arguments outside their range: `num_train` >= 1,
    `num_val` >= 0, `size` >= MIN_SIZE pixels, `num_frames` >= 2, `fps` >= 1 and a non-empty `tasks`
    subset of TASKS; and, after the first clip, if decord (which the data loader uses) cannot read it back.
    """
    _check_arguments(num_train, num_val, num_test, tasks, size, num_frames, fps)
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    splits = [("train", num_train), ("val", num_val)] + ([("test", num_test)] if num_test else [])
    for split, n in splits:
        records = []
        for i in range(n):
            task = tasks[i % len(tasks)]
            colour, direction = rng.choice(list(COLOURS)), rng.choice(list(DIRECTIONS))
            count = rng.randint(1, 3)
            rel = f"videos/{split}_{i:05d}.mp4"
            write_mp4(out / rel, _clip(rng, size, num_frames, colour, direction, count), fps)
            if split == "train" and i == 0:
                _check_decodable(out / rel, num_frames, size)
            records.append(_record(task, f"{split}-{task}-{i:05d}", rel, colour, direction, count, rng))
        tmp = out / f".{split}.json.tmp"
        tmp.write_text(json.dumps(records, indent=1))
        tmp.replace(out / f"{split}.json")
    return out
