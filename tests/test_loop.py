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
from helpers import DEMO_LOOP_TEST_ARGS, DEMO_SFT_TEST_ARGS

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "--iterations", "1", *DEMO_LOOP_TEST_ARGS,
    "--sft.args", json.dumps(["--trainer.max_steps=100", "--trainer.enable_progress_bar=false", *DEMO_SFT_TEST_ARGS]),
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
    # One question with pairs is enough here: these few GRPO steps cover 6 questions, not the demo's minimum.
    args = _veripo(demo_cwd, *SMALL, "--min_questions_with_pairs", "1")
    run = subprocess.run(args, cwd=demo_cwd, capture_output=True, text=True, timeout=900)
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
    val = json.loads((demo_cwd / "work/demo/data/val.json").read_text())
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["inconsistency_rate"] <= 1.0
        # every stage's greedy answers, on the same questions, averaging to the row's accuracy
        answers = [json.loads(x) for x in (work / row["stage"] / "answers.jsonl").read_text().splitlines()]
        assert [a["problem_id"] for a in answers] == [r["problem_id"] for r in val]
        assert abs(sum(a["accuracy"] for a in answers) / len(answers) - row["accuracy"]) < 1e-6
    assert (work / "sft/adapter/adapter_config.json").is_file()
    tags = _scalar_tags(work / "tensorboard")
    assert {
        "train/sft_loss",
        "train/loss",
        "train/reward",
        "eval/accuracy",
        "eval/inconsistency_rate",
    } <= tags
    # The SFT warm start makes the demo's GRPO rollouts differ in accuracy within groups, so the verifier finds
    # pairs (4 on this config) and the DPO stage really trains on them: a skipped DPO fails here.
    pairs = [json.loads(x) for x in (work / "iter_1/verifier/pairs.jsonl").read_text().splitlines()]
    assert pairs
    dpo = state["finished"][2]
    assert not dpo.get("skipped") and dpo["steps"] >= 1, dpo
    assert (work / "iter_1/dpo/adapter/adapter_config.json").is_file()
    assert {"train/rewards/accuracy", "train/rewards/margin"} <= tags  # logged by the DPO fit
    assert "stage" in run.stdout and "iter_1/grpo" in run.stdout  # the summary table


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the loop exited ({proc.returncode}) before {path} appeared"
        assert time.time() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.02)


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_a_killed_loop_resumes_without_redoing_finished_stages(demo_cwd: Path) -> None:
    """SIGKILL inside the GRPO fit, then inside the DPO fit; each rerun of the same command resumes."""
    longer = [*SMALL, "--grpo.args+=--trainer.max_steps=10", "--dpo.args+=--trainer.max_epochs=4"]
    work = demo_cwd / "work/demo/veripo"
    state_path = work / "state.json"

    def finished() -> list[str]:
        return [s["stage"] for s in json.loads(state_path.read_text())["finished"]]

    def start() -> subprocess.Popen:
        return subprocess.Popen(_veripo(demo_cwd, *longer), cwd=demo_cwd, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip

    proc = start()  # killed once the GRPO fit has written its first checkpoint
    _wait_for(work / "iter_1/grpo/checkpoints/last.ckpt", proc)
    _kill(proc)
    assert finished() == ["sft"]
    sft_adapter = work / "sft/adapter/adapter_model.safetensors"
    sft_mtime = sft_adapter.stat().st_mtime_ns

    proc = start()  # resumes GRPO from its checkpoint; killed inside the DPO fit
    _wait_for(work / "iter_1/dpo/checkpoints/last.ckpt", proc)
    _kill(proc)
    assert finished() == ["sft", "iter_1/grpo"]
    verifier = {p.name: p.read_bytes() for p in (work / "iter_1/verifier").iterdir()}
    rollouts = [json.loads(x) for x in verifier["rollouts.jsonl"].splitlines()]
    assert sorted({r["step"] for r in rollouts}) == list(range(10))  # every step, the resumed ones included
    assert len(rollouts) == 10 * 2 * 8  # none lost or doubled by the interruption
    grpo_adapter = work / "iter_1/grpo/adapter/adapter_model.safetensors"
    grpo_mtime = grpo_adapter.stat().st_mtime_ns

    run = subprocess.run(
        _veripo(demo_cwd, *longer), cwd=demo_cwd, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert finished() == ["sft", "iter_1/grpo", "iter_1/dpo"]
    assert sft_adapter.stat().st_mtime_ns == sft_mtime  # the finished stages were not redone
    assert grpo_adapter.stat().st_mtime_ns == grpo_mtime
    assert {p.name: p.read_bytes() for p in (work / "iter_1/verifier").iterdir()} == verifier
    state = json.loads(state_path.read_text())
    assert state["finished"][2]["steps"] == 4 * -(-len(verifier["pairs.jsonl"].splitlines()) // 4)
    assert [r["stage"] for r in map(json.loads, (work / "metrics.jsonl").read_text().splitlines())] == [
        "sft", "iter_1/grpo", "iter_1/dpo"]  # fmt: skip
    assert not list(work.rglob(".*.tmp"))  # nothing half-written


@pytest.mark.slow
def test_soak_several_iterations_keep_memory_flat_and_files_consistent(demo_cwd: Path) -> None:
    """Four VerIPO iterations in one process: resident memory after each GRPO stage must not keep growing."""
    iterations = 4
    args = [*SMALL, "--iterations", str(iterations), "--discard_solved_fraction", "0.5"]
    run = subprocess.run(_veripo(demo_cwd, *args), cwd=demo_cwd, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-4000:]
    work = demo_cwd / "work/demo/veripo"
    state = json.loads((work / "state.json").read_text())
    expected = ["sft"] + [f"iter_{k}/{s}" for k in range(1, iterations + 1) for s in ("grpo", "dpo")]
    assert [s["stage"] for s in state["finished"]] == expected
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # one TensorBoard axis across the stages
    for k in range(1, iterations + 1):
        verifier = work / f"iter_{k}/verifier"
        stats = json.loads((verifier / "stats.json").read_text())
        rollouts = (verifier / "rollouts.jsonl").read_text().splitlines()
        assert (
            stats["num_rollouts"]
            == len(rollouts)
            == len((verifier / "verdicts.jsonl").read_text().splitlines())
        )
        assert stats["pairs"] == len((verifier / "pairs.jsonl").read_text().splitlines())
        if k > 1:  # the next GRPO fit skipped the questions picked from the always-solved ones
            dropped = set(json.loads((work / f"iter_{k - 1}/exclude_ids.json").read_text()))
            assert not dropped & {json.loads(x)["record"]["problem_id"] for x in rollouts}
    rss = {r["stage"]: r["rss_mb"] for r in rows}
    grpo = [rss[f"iter_{k}/grpo"] for k in range(1, iterations + 1)]
    # the first iteration warms caches (allocator, tokenizer, decord); afterwards growth must stay small
    assert grpo[-1] - grpo[1] < 150, f"RSS after each GRPO stage (MiB): {grpo}"
    assert not list(work.rglob(".*.tmp"))
