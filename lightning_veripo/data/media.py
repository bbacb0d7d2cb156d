"""Media for video QA: how frames are sampled from a video, decoding them with decord, reading images.

`load_video` returns the frames and the metadata the processors need (`fps`, `frames_indices`): Qwen2.5-VL
derives its temporal grid's seconds from them and Qwen3-VL / Qwen3.5 write a `<t seconds>` marker per frame pair
into the prompt. A file that cannot be read or decoded raises `VideoQAError` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


class VideoQAError(ValueError):
    """A record or its media cannot be used; the message names the file and the record."""


@dataclass
class FrameSampling:
    """How frames are taken from a video (qwen-vl-utils conventions by default).

    Either a fixed `num_frames`, or `fps` frames per second clamped to [min_frames, max_frames]. The count is
    rounded down to a multiple of 2 (Qwen's temporal patch). Each frame is resized by the processor to lie
    within [min_pixels, max_pixels] pixels. A video with fewer frames than that count still gives the count:
    the evenly spaced indices repeat frames (a 1-frame clip gives the same frame `n` times).
    """

    num_frames: int | None = None
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 64
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 256 * 28 * 28

    def frame_indices(self, total_frames: int, video_fps: float) -> list[int]:
        """Evenly spaced frame indices for a video of `total_frames` frames at `video_fps`."""
        if self.num_frames is not None:
            n = self.num_frames
        else:
            n = int(total_frames / max(video_fps, 1e-6) * self.fps)
            n = min(max(n, self.min_frames), self.max_frames)
        n = max(2, n - n % 2)
        return np.linspace(0, total_frames - 1, n).round().astype(int).tolist()


def load_video(path: str, sampling: FrameSampling) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode sampled frames [F, H, W, 3] uint8 with decord, plus the metadata the processor needs."""
    import decord

    try:
        with open(path, "rb") as f:
            if not f.read(1):
                raise VideoQAError(f"{path}: cannot decode video (the file is empty, 0 bytes)")
    except OSError as e:  # decord would report an unreadable file as undecodable
        raise VideoQAError(f"{path}: cannot read video file ({type(e).__name__}: {e.strerror})") from e
    try:
        reader = decord.VideoReader(path, num_threads=1)
        total = len(reader)
        if total == 0:
            raise VideoQAError(f"{path}: video has no frames")
        fps = float(reader.get_avg_fps()) or 1.0
        indices = sampling.frame_indices(total, fps)
        frames = reader.get_batch(indices).asnumpy()
    except VideoQAError:
        raise
    except Exception as e:  # decord raises its own DECORDError / RuntimeError on corrupt files
        raise VideoQAError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from e
    meta = {
        "total_num_frames": total,
        "fps": fps,
        "frames_indices": indices,
        "width": int(frames.shape[2]),
        "height": int(frames.shape[1]),
    }
    return frames, meta


def load_image(path: str) -> Any:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:
        raise VideoQAError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
