"""`veripo iterate` end to end on the embedded demo, through the real command, with small step counts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "--iterations", "1",
    "--sft.args", json.dumps(["--trainer.max_steps=60", "--trainer.enable_progress_bar=false"]),
    "--grpo.args", json.dumps(["--trainer.max_steps=3", "--trainer.limit_val_batches=0",
                               "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
                               "--data.init_args.synthetic.num_train=16", "--data.init_args.synthetic.num_val=8"]),
    "--dpo.args", json.dumps(["--trainer.max_epochs=1", "--trainer.enable_progress_bar=false"]),
]  # fmt: skip


def _veripo(cwd: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "lightning_veripo.cli", "iterate", "--config", "configs/demo.yaml", *args]


@pytest.fixture
def demo_cwd(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    return tmp_path


def _scalar_tags(log_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in log_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


@pytest.mark.slow
def test_iterate_runs_the_demo_loop_and_writes_the_work_directory(demo_cwd: Path) -> None:
    run = subprocess.run(_veripo(demo_cwd, *SMALL), cwd=demo_cwd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    work = demo_cwd / "work/demo/veripo"
    state = json.loads((work / "state.json").read_text())
    assert [s["stage"] for s in state["finished"]] == ["sft", "iter_1/grpo", "iter_1/dpo"]
    for name in ("rollouts.jsonl", "verdicts.jsonl", "pairs.jsonl", "stats.json"):
        assert (work / "iter_1/verifier" / name).is_file()
    rollouts = (work / "iter_1/verifier/rollouts.jsonl").read_text().splitlines()
    assert len(rollouts) == 3 * 2 * 8  # steps x prompts per step x G
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows][:2] == ["sft", "iter_1/grpo"]
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["inconsistency_rate"] <= 1.0
    assert (work / "sft/adapter/adapter_config.json").is_file()
    tags = _scalar_tags(work / "tensorboard")
    assert {"train/sft_loss", "train/loss", "train/reward", "eval/accuracy", "eval/inconsistency_rate"} <= tags
    pairs = (work / "iter_1/verifier/pairs.jsonl").read_text().splitlines()
    if pairs:  # the DPO fit ran on them and logged its tags
        assert {"train/rewards/accuracy", "train/rewards/margin"} <= tags
    else:
        assert state["finished"][2]["skipped"] == "the verifier built no preference pairs"
    assert "stage" in run.stdout and "iter_1/grpo" in run.stdout  # the summary table


@pytest.mark.slow
def test_a_killed_loop_resumes_without_redoing_finished_stages(demo_cwd: Path) -> None:
    proc = subprocess.Popen(_veripo(demo_cwd, *SMALL), cwd=demo_cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    state_path = demo_cwd / "work/demo/veripo/state.json"
    deadline = time.time() + 600
    while time.time() < deadline and not state_path.exists():  # sft finished: now inside the GRPO fit
        time.sleep(0.5)
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = json.loads(state_path.read_text())
    assert [s["stage"] for s in first["finished"]] == ["sft"]
    sft_adapter = demo_cwd / "work/demo/veripo/sft/adapter/adapter_model.safetensors"
    before = sft_adapter.stat().st_mtime_ns

    run = subprocess.run(_veripo(demo_cwd, *SMALL), cwd=demo_cwd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    final = json.loads(state_path.read_text())
    assert [s["stage"] for s in final["finished"]] == ["sft", "iter_1/grpo", "iter_1/dpo"]
    assert sft_adapter.stat().st_mtime_ns == before  # the finished stage was not redone
    assert not list((demo_cwd / "work/demo/veripo").rglob(".*.tmp"))  # nothing half-written
