"""`veripo fit --config configs/demo_grpo.yaml` end to end: the real command in a subprocess, its TensorBoard
scalars and rollout panel, its trainable-only checkpoint, resuming from it, and its config errors.

The demo config builds the tiny model and the synthetic data under work/demo/ on first use, so each run happens
in a temporary directory holding a copy of `configs/`.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_veripo.backbone import LoRAConfig, VideoLLM
from lightning_veripo.grpo import GRPOModule

REPO = Path(__file__).resolve().parents[1]
VERSION_DIR = Path("work/demo/grpo/tensorboard")
# Small enough for CI: steps of 2 prompts x 4 rollouts of 8 tokens, validation every 2 steps.
QUICK = ["--trainer.val_check_interval", "2", "--model.init_args.num_generations", "4",
         "--model.init_args.max_new_tokens", "8", "--trainer.enable_progress_bar", "false"]  # fmt: skip
SCALARS = [
    "train/loss", "train/reward", "train/reward_std",
    "train/rewards/accuracy", "train/rewards/accuracy_std", "train/rewards/format", "train/rewards/format_std",
    "train/accuracy", "train/advantage_std", "train/clip_ratio_low", "train/clip_ratio_high", "train/kl",
    "train/completion_length", "train/completion_length_min", "train/completion_length_max",
    "train/truncated_fraction", "train/groups_dropped", "train/gen_tokens_per_s",
    "train/time_generate_s", "train/time_score_s", "train/time_optimise_s",
    "val/accuracy", "val/reasoning_tokens", "val/format_rate", "val/inconsistency_rate",
]  # fmt: skip


def veripo(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the installed `veripo` command (the one beside this Python) and capture its output."""
    exe = Path(sys.executable).parent / "veripo"
    command = [str(exe)] if exe.exists() else [shutil.which("veripo") or "veripo"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _expect_success(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory in which `veripo fit --config configs/demo_grpo.yaml` ran 4 steps (version_0)."""
    cwd = tmp_path_factory.mktemp("demo_grpo")
    shutil.copytree(REPO / "configs", cwd / "configs")
    _expect_success(veripo("fit", "--config", "configs/demo_grpo.yaml", *QUICK, "--trainer.max_steps", "4", cwd=cwd))
    return cwd


def _events(version: Path) -> EventAccumulator:
    events = EventAccumulator(str(version), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _checkpoint(version: Path) -> Path:
    checkpoints = sorted((version / "checkpoints").glob("*.ckpt"))
    assert len(checkpoints) == 1, checkpoints
    return checkpoints[0]


@pytest.mark.slow
def test_demo_fit_logs_every_training_and_validation_scalar(demo_run: Path) -> None:
    events = _events(demo_run / VERSION_DIR / "version_0")
    logged = set(events.Tags()["scalars"])
    assert not set(SCALARS) - logged, sorted(set(SCALARS) - logged)
    for tag in SCALARS:
        values = [e.value for e in events.Scalars(tag)]
        assert values and all(math.isfinite(v) for v in values), (tag, values)
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1, 2, 3]
    assert len(events.Scalars("val/accuracy")) == 2  # after steps 2 and 4


@pytest.mark.slow
def test_demo_fit_writes_a_rollout_text_panel(demo_run: Path) -> None:
    events = _events(demo_run / VERSION_DIR / "version_0")
    # torch's SummaryWriter.add_text files the panel under "<tag>/text_summary" (TensorBoard shows "<tag>").
    tags = [t for t in events.Tags()["tensors"] if t.partition("/text_summary")[0] == "train/rollouts"]
    assert tags, events.Tags()["tensors"]
    panel = events.Tensors(tags[0])[0]
    assert panel.step == 0  # log_rollouts_every_n_steps: 5 -> the first step's rollouts
    text = panel.tensor_proto.string_val[0].decode()
    assert text.startswith("| problem | reward | advantage | completion |")
    assert "train-colour-" in text


@pytest.mark.slow
def test_demo_checkpoint_holds_only_the_lora_weights(demo_run: Path) -> None:
    checkpoint = torch.load(_checkpoint(demo_run / VERSION_DIR / "version_0"), map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4
    # The same module as the demo config builds: its trainable parameters are exactly the adapter's.
    backbone = VideoLLM(str(demo_run / "work/demo/tiny-model"), lora=LoRAConfig(r=8, alpha=16)).load()
    trainable = {name for name, p in GRPOModule(backbone).named_parameters() if p.requires_grad}
    assert set(checkpoint["state_dict"]) == trainable
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)


@pytest.mark.slow
def test_demo_fit_resumes_from_its_checkpoint(demo_run: Path) -> None:
    ckpt = _checkpoint(demo_run / VERSION_DIR / "version_0")
    _expect_success(veripo("fit", "--config", "configs/demo_grpo.yaml", *QUICK, "--trainer.max_steps", "6",
                           "--ckpt_path", str(ckpt), cwd=demo_run))  # fmt: skip

    version = demo_run / VERSION_DIR / "version_1"
    checkpoint = torch.load(_checkpoint(version), map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 6
    assert [e.step for e in _events(version).Scalars("train/loss")] == [4, 5]


def test_print_config_shows_every_grpo_knob(tmp_path: Path) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    result = veripo("fit", "--config", "configs/demo_grpo.yaml", "--print_config", cwd=tmp_path, timeout=120)
    _expect_success(result)
    assert "class_path: lightning_veripo.grpo.GRPOModule" in result.stdout
    for knob in ("num_generations: 8", "epsilon_high:", "loss_type: dapo", "dynamic_sampling: true", "temporal:"):
        assert knob in result.stdout, knob
    assert not (tmp_path / "work").exists()  # printing the config builds nothing


@pytest.mark.parametrize(
    ("knob", "value", "named"),
    [("loss_type", "nope", "loss_type='nope'"), ("los_type", "dapo", "'los_type' is not accepted")],
    ids=["bad-value", "misspelled-key"],
)
def test_an_invalid_knob_fails_with_a_message_naming_it(tmp_path: Path, knob: str, value: str, named: str) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    result = veripo("fit", "--config", "configs/demo_grpo.yaml", f"--model.init_args.{knob}", value,
                    cwd=tmp_path, timeout=120)  # fmt: skip
    assert result.returncode != 0
    assert named in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "work").exists()  # it stops before building anything


@pytest.mark.slow
def test_veripo_test_evaluates_a_trained_checkpoint_on_a_test_file(demo_run: Path) -> None:
    ckpt = _checkpoint(demo_run / VERSION_DIR / "version_0")
    result = veripo("test", "--config", "configs/demo_grpo.yaml", *QUICK, "--ckpt_path", str(ckpt),
                    "--data.init_args.test_path", "work/demo/data/val.json", cwd=demo_run)  # fmt: skip
    _expect_success(result)
    for metric in ("test/accuracy", "test/format_rate", "test/reasoning_tokens", "test/inconsistency_rate"):
        assert metric in result.stdout, result.stdout[-3000:]
    missing = veripo("test", "--config", "configs/demo_grpo.yaml", *QUICK, "--ckpt_path", str(ckpt), cwd=demo_run)
    assert missing.returncode != 0 and "test_path" in missing.stderr  # no test file configured: said so
