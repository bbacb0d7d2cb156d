"""A learnable synthetic video-QA task written as real .mp4 files and Video-R1-format JSON.

Each clip shows coloured squares on a grey background; one of them moves. The questions can only be answered
from the frames: the colour of the moving square (multiple choice), the direction it moves (multiple choice,
needs more than one frame) and the number of squares (numerical). Chance accuracy is 25% / 25% / 33%.
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
TASKS = ("colour", "direction", "count")


def _clip(rng: random.Random, size: int, num_frames: int, colour: str, direction: str, count: int) -> np.ndarray:
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
    band = (min(start_x, end_x) - 1, min(start_y, end_y) - 1, max(start_x, end_x) + side + 1,
            max(start_y, end_y) + side + 1)
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


def _record(task: str, pid: str, path: str, colour: str, direction: str, count: int) -> dict:
    if task == "colour":
        names = list(COLOURS)
        return {"problem_id": pid, "problem": "What colour is the moving square?", "data_type": "video",
                "problem_type": "multiple choice",
                "options": [f"{chr(65 + i)}. {c}" for i, c in enumerate(names)],
                "solution": f"<answer>{chr(65 + names.index(colour))}</answer>", "path": path}
    if task == "direction":
        names = list(DIRECTIONS)
        return {"problem_id": pid, "problem": "Which direction does the square move?", "data_type": "video",
                "problem_type": "multiple choice",
                "options": [f"{chr(65 + i)}. {d}" for i, d in enumerate(names)],
                "solution": f"<answer>{chr(65 + names.index(direction))}</answer>", "path": path}
    if task == "count":
        return {"problem_id": pid, "problem": "How many squares are in the video?", "data_type": "video",
                "problem_type": "numerical", "options": [], "solution": f"<answer>{count}</answer>", "path": path}
    raise ValueError(f"unknown synthetic task {task!r}; expected one of {TASKS}")


# Squares are size // 4 (moving) and size // 8 (static, count task) pixels wide: below 32 pixels the static
# ones are under 4 pixels and the mpeg4 encoding (2x2 colour subsampling) blurs them past counting.
MIN_SIZE = 32


def _check_arguments(num_train: int, num_val: int, tasks: Any, size: int, num_frames: int, fps: int) -> None:
    """ValueError naming the first argument out of its allowed range."""
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"make_synthetic_data: tasks={tasks!r} must be a non-empty list of tasks {TASKS}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown synthetic task(s) {unknown}; expected a subset of {TASKS}")
    limits = (
        ("num_train", num_train, 1, "the training split needs at least one record"),
        ("num_val", num_val, 0, "0 writes an empty val.json"),
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
) -> Path:
    """Write `videos/*.mp4`, `train.json` and `val.json` (Video-R1 format, paths relative) to `out_dir`.

    Raises ValueError, before writing anything, for arguments outside their range: `num_train` >= 1,
    `num_val` >= 0, `size` >= MIN_SIZE pixels, `num_frames` >= 2, `fps` >= 1 and a non-empty `tasks`
    subset of TASKS; and, after the first clip, if decord (which the data loader uses) cannot read it back.
    """
    _check_arguments(num_train, num_val, tasks, size, num_frames, fps)
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in (("train", num_train), ("val", num_val)):
        records = []
        for i in range(n):
            task = tasks[i % len(tasks)]
            colour, direction = rng.choice(list(COLOURS)), rng.choice(list(DIRECTIONS))
            count = rng.randint(1, 3)
            rel = f"videos/{split}_{i:05d}.mp4"
            write_mp4(out / rel, _clip(rng, size, num_frames, colour, direction, count), fps)
            if split == "train" and i == 0:
                _check_decodable(out / rel, num_frames, size)
            records.append(_record(task, f"{split}-{task}-{i:05d}", rel, colour, direction, count))
        tmp = out / f".{split}.json.tmp"
        tmp.write_text(json.dumps(records, indent=1))
        tmp.replace(out / f"{split}.json")
    return out
