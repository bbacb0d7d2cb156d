"""`veripo iterate` with every stage under the FSDP2 overlay on 2 CPU processes (gloo): the loop stays one
process, each stage's fit runs as a `veripo fit` child whose launcher starts the ranks
(`lightning_veripo.stage_processes`), the loop judges the ranks' spooled rollouts and evaluates the trained
weights in its own process.

The base model is the tiny one with the warm-start adapter merged in (its GRPO groups mix right and wrong
answers, so the verifier finds pairs and the DPO stage runs); each stage takes 2 steps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lightning_veripo.backbone import VideoLLM
from lightning_veripo.loop import _ensure_verifier_files
from lightning_veripo.verifier.run import read_rollouts

REPO = Path(__file__).resolve().parents[1]
G, PROMPTS_PER_RANK, STEPS = 4, 2, 2
SHARDED = ["--config", str(REPO / "configs/strategies/fsdp2.yaml"), "--trainer.accelerator=cpu",
           "--trainer.devices=2", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
           "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", f"--trainer.max_steps={STEPS}",
           "--model.init_args.backbone.init_args.lora.dropout=0.0"]  # fmt: skip


def _loop_config(tmp_path: Path, base: Path, synthetic_dir: Path) -> Path:
    data = [f"--data.init_args.train_path={synthetic_dir / 'train.json'}", "--data.init_args.val_path=null",
            "--data.init_args.synthetic=null", "--data.init_args.shuffle=false",
            f"--data.init_args.batch_size={PROMPTS_PER_RANK}"]  # fmt: skip
    config = {
        "base_model": str(base),
        "work_dir": str(tmp_path / "work"),
        "val_path": str(synthetic_dir / "val.json"),
        "iterations": 1,
        "min_questions_with_pairs": 1,
        "sft": {"config": str(REPO / "configs/demo_sft.yaml"), "args": [*SHARDED, *data]},
        "grpo": {
            "config": str(REPO / "configs/demo_grpo.yaml"),
            "args": [
                *SHARDED,
                *data,
                f"--model.init_args.num_generations={G}",
                "--model.init_args.max_new_tokens=24",
                "--model.init_args.advantage_scale=batch",
                "--model.init_args.log_rollouts_every_n_steps=0",
            ],  # fmt: skip
        },
        "dpo": {
            "config": str(REPO / "configs/demo_dpo.yaml"),
            "args": [
                *SHARDED,
                "--trainer.max_epochs=-1",
                "--data.init_args.batch_size=1",
                "--data.init_args.shuffle=false",
            ],  # fmt: skip
        },
        "evaluation": {
            "frames": {"num_frames": 4, "min_pixels": 3136, "max_pixels": 3136},
            "max_new_tokens": 24,
            "batch_size": 4,
            "num_samples": 0,
        },  # fmt: skip
    }
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _iterate(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lightning_veripo.cli", "iterate", "--config", str(config)]
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=1500, env=dict(os.environ)
    )


@pytest.fixture(scope="module")
def warm_base(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, warm_adapter: Path) -> Path:
    """The tiny model with the warm-start adapter merged into its weights, saved as a base checkpoint."""
    merged = VideoLLM(str(tiny_model_dir), merge_adapters=[str(warm_adapter)])
    merged.load()
    return merged.save_pretrained(tmp_path_factory.mktemp("warm_base"))


@pytest.fixture(scope="module")
def sharded_loop(tmp_path_factory: pytest.TempPathFactory, warm_base: Path, synthetic_dir: Path) -> Path:
    """The work directory of one `veripo iterate`: sft, GRPO, verifier, DPO, each fit on 2 FSDP2 processes."""
    tmp = tmp_path_factory.mktemp("sharded_loop")
    done = _iterate(_loop_config(tmp, warm_base, synthetic_dir), tmp)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-8000:]}"
    (tmp / "stdout.txt").write_text(done.stdout)
    return tmp / "work"


@pytest.mark.slow
def test_sharded_loop_finishes_every_stage_and_dpo_runs_on_the_verifiers_pairs(sharded_loop: Path) -> None:
    state = json.loads((sharded_loop / "state.json").read_text())
    stages = ["sft", "iter_1/grpo", "iter_1/dpo"]
    assert [s["stage"] for s in state["finished"]] == stages
    assert not any("skipped" in s or "rejected" in s for s in state["finished"]), state["finished"]
    rows = [json.loads(line) for line in (sharded_loop / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == stages
    assert [r["step"] for r in rows] == [STEPS, 2 * STEPS, 3 * STEPS]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["train_s"] > 0 for r in rows)
    for stage in stages:  # each fit was sharded: a distributed checkpoint of 2 shards
        last = sharded_loop / stage / "checkpoints" / "last.ckpt"
        assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"], stage
    pairs = (sharded_loop / "iter_1" / "verifier" / "pairs.jsonl").read_text().splitlines()
    assert pairs, "the DPO stage ran, so the verifier found pairs"


@pytest.mark.slow
def test_sharded_loop_judges_the_rollouts_of_both_ranks_once(sharded_loop: Path, synthetic_dir: Path) -> None:
    out = sharded_loop / "iter_1" / "verifier"
    rollouts = read_rollouts(out / "rollouts.jsonl")
    assert len(rollouts) == STEPS * 2 * PROMPTS_PER_RANK * G
    assert len({(r.step, r.record.problem_id, r.sample_index) for r in rollouts}) == len(rollouts)
    ids = [str(r["problem_id"]) for r in json.loads((synthetic_dir / "train.json").read_text())]
    world = 2 * PROMPTS_PER_RANK
    assert sorted({r.record.problem_id for r in rollouts if r.step == 0}) == sorted(ids[:world])
    spools = sharded_loop / "iter_1" / "grpo" / "rollouts"
    spooled = [len((spools / f"rank{rank}.jsonl").read_text().splitlines()) for rank in (0, 1)]
    assert spooled == [STEPS * PROMPTS_PER_RANK * G] * 2  # each rank spooled its own share
    assert len((out / "verdicts.jsonl").read_text().splitlines()) == len(rollouts)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_rollouts"] == len(rollouts) and stats["pairs"] > 0


@pytest.mark.slow
def test_sharded_loop_adapters_hold_the_sharded_fits_weights_and_load_into_one_process(
    sharded_loop: Path, warm_base: Path, tmp_path: Path
) -> None:
    """Each adapter the loop exported holds exactly the trained weights of that fit's distributed checkpoint
    (read here by torch's own converter), and the three load as the final policy in one process."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    stages = ("sft", "iter_1/grpo", "iter_1/dpo")
    for stage in stages:
        saved = load_file(sharded_loop / stage / "adapter" / "adapter_model.safetensors")
        dcp_to_torch_save(sharded_loop / stage / "checkpoints" / "last.ckpt", tmp_path / "full.pt")
        trained = torch.load(tmp_path / "full.pt", weights_only=True)["state_dict"]
        # backbone.model.<peft name>.lora_B.default.weight -> <peft name>.lora_B.weight
        names = {k: k.removeprefix("backbone.model.").replace(".default", "") for k in trained}
        assert set(names.values()) == {k for k in saved if "lora_" in k}, stage
        for key, name in names.items():
            torch.testing.assert_close(saved[name], trained[key], rtol=0, atol=0)
        assert any("lora_B" in k and v.abs().max() > 0 for k, v in saved.items()), f"{stage} did not train"
    policy = VideoLLM(str(warm_base), merge_adapters=[str(sharded_loop / s / "adapter") for s in stages])
    assert policy.load() is not None


@pytest.mark.slow
def test_verifier_files_removed_after_a_sharded_grpo_stage_are_rebuilt_from_its_checkpoint(
    sharded_loop: Path, tmp_path: Path
) -> None:
    """The loop's recovery (`_ensure_verifier_files`) judges the rollouts the distributed checkpoint counts in
    the ranks' spools again: the same files as the run's."""
    copy = tmp_path / "iter_1"
    shutil.copytree(sharded_loop / "iter_1" / "grpo", copy / "grpo")
    _ensure_verifier_files(copy, None, None)
    for name in ("rollouts.jsonl", "pairs.jsonl"):
        assert (copy / "verifier" / name).read_bytes() == (
            sharded_loop / "iter_1" / "verifier" / name
        ).read_bytes()


@pytest.mark.slow
def test_sharded_loop_run_again_skips_the_finished_stages(
    sharded_loop: Path, warm_base: Path, synthetic_dir: Path
) -> None:
    tmp = sharded_loop.parent
    state = (sharded_loop / "state.json").read_text()
    checkpoints = {p: p.stat().st_mtime_ns for p in sharded_loop.rglob("*.distcp")}
    again = _iterate(_loop_config(tmp, warm_base, synthetic_dir), tmp)
    assert again.returncode == 0, again.stderr[-4000:]
    for stage in ("sft", "iter_1/grpo", "iter_1/dpo"):
        assert f"{stage}: finished in an earlier run" in again.stderr + again.stdout, stage
    assert (sharded_loop / "state.json").read_text() == state
    assert checkpoints  # and no fit wrote one again:
    assert {p: p.stat().st_mtime_ns for p in sharded_loop.rglob("*.distcp")} == checkpoints


@pytest.mark.slow
def test_sigterm_to_the_loop_stops_the_sharded_fit_at_a_checkpoint_and_the_same_command_resumes_it(
    tmp_path: Path, warm_base: Path, synthetic_dir: Path
) -> None:
    """SIGTERM to the loop process (not to the ranks) while the sft stage fits in its child: the child finishes
    its step and checkpoint and stops its ranks, the loop exits 143 naming the step; the same command resumes
    the fit from that distributed checkpoint and goes on (GRPO only, 1 step, to keep it short)."""
    config = _loop_config(tmp_path, warm_base, synthetic_dir)
    loop = yaml.safe_load(config.read_text())
    loop["sft"]["args"].append("--trainer.max_steps=8")
    loop["grpo"]["args"].append("--trainer.max_steps=1")
    loop["grpo_only"] = True
    config.write_text(yaml.safe_dump(loop))
    command = [sys.executable, "-m", "lightning_veripo.cli", "iterate", "--config", str(config)]
    run = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = tmp_path / "work" / "sft" / "checkpoints" / "epoch=0-step=1.ckpt" / "meta.pt"
    deadline = time.monotonic() + 600
    while not first.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=600)
    assert run.returncode == 143, err[-4000:]
    stopped = re.search(r"stopped by SIGTERM in sft at step (\d+) \(its last checkpoint\)", err)
    assert stopped, err[-3000:]
    step = int(stopped.group(1))
    assert 1 <= step < 8
    last = tmp_path / "work" / "sft" / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    state_path = tmp_path / "work" / "state.json"
    assert not state_path.exists() or json.loads(state_path.read_text())["finished"] == []
    again = _iterate(config, tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    said = again.stdout + again.stderr
    assert (
        f"(resuming from {last})" in said and f"Restoring states from the checkpoint path at {last}" in said
    )
    state = json.loads(state_path.read_text())
    assert [(s["stage"], s["steps"]) for s in state["finished"]] == [("sft", 8), ("iter_1/grpo", 1)]
