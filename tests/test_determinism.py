"""Same command, same machine, same adapters: two identical `veripo fit` runs of the demo's GRPO stage (sampling,
rewards, the clipped loss, the optimiser) end with bit-identical trainable weights, and so do runs at 1 and at 2
torch threads. A run with another seed ends elsewhere, so the comparison can fail.

Why it matters: README's demo table is exact for one machine's kernels. What moves it between machines is the CPU
kernel set torch dispatches to (AVX-512 / AVX2 / none: measured, 40 SFT steps differ by ~1e-6 between them and the
demo's table then differs by several points), not the thread count (README, "What the demo prints").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import DEMO_FIT_TEST_ARGS

from lightning_veripo.tiny import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
# One epoch of 3 steps of 2 prompts x 4 rollouts of 8 tokens (its end writes the checkpoint): every part of a
# GRPO step, including sampling at temperature 1
QUICK = [*DEMO_FIT_TEST_ARGS, "--data.init_args.synthetic.num_train=6", "--trainer.max_steps=-1",
         "--trainer.max_epochs=1", "--trainer.val_check_interval=1.0", "--trainer.check_val_every_n_epoch=1", "--model.init_args.num_generations=4", "--model.init_args.max_new_tokens=8",
         "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.logger=false",
         "--trainer.enable_progress_bar=false",
         # a reward that differs between random completions, so every step moves the adapter
         "--model.init_args.rewards.names=[rewards_for_tests.completion_chars]"]  # fmt: skip


def grpo_adapter(cwd: Path, threads: int, *extra: str) -> dict[str, torch.Tensor]:
    """Run the demo's GRPO stage for 3 steps in `cwd` at `threads` torch threads; its trainable tensors."""
    shutil.copytree(REPO / "configs", cwd / "configs")
    exe = Path(sys.executable).parent / "veripo"
    threads_env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env = {**os.environ, **threads_env, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), *sys.path])}
    args = ["fit", "--config", "configs/demo_grpo.yaml", *QUICK, *extra]
    result = subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    (checkpoint,) = (cwd / "work").glob("**/*.ckpt")
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys() and a, (sorted(a)[:5], sorted(b)[:5])
    return [name for name in a if not torch.equal(a[name], b[name])]


@pytest.mark.slow
def test_two_identical_runs_and_two_thread_counts_give_identical_adapters_and_another_seed_does_not(
    tmp_path: Path,
) -> None:
    first = grpo_adapter(tmp_path / "first", threads=1)
    again = grpo_adapter(tmp_path / "again", threads=1)
    two_threads = grpo_adapter(tmp_path / "two_threads", threads=2)
    other_seed = grpo_adapter(tmp_path / "other_seed", 1, "--seed_everything=1")

    assert any("lora" in name for name in first), sorted(first)[:5]
    assert all(first[name].abs().sum() > 0 for name in first if "lora_B" in name)  # trained, not its init
    assert differing(first, again) == []
    assert differing(first, two_threads) == []
    # the seed draws the prompts and the samples, so the adapters trained on them differ
    assert [name for name in first if "lora_B" in name and name not in differing(first, other_seed)] == []


def test_building_the_tiny_model_keeps_the_callers_random_state(tmp_path: Path) -> None:
    """`make_tiny_if_missing` builds the model inside a run that `seed_everything` already seeded: drawing the
    weights from the model's own seed must not reset the run's (it did: every seed then trained alike)."""
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    make_tiny_model(tmp_path / "model", size="tiny")
    assert torch.equal(torch.rand(4), expected)
    # and the weights are still the seed's own
    again = make_tiny_model(tmp_path / "again", size="tiny")
    first = (tmp_path / "model" / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == first
