"""A `veripo iterate` killed at any boundary, then run again with the same command, ends exactly as an
uninterrupted run: the same state.json, the same verifier files and pairs, the same adapters and metrics, and
the stages finished before the kill are not redone.

The kills are events, not timings. The uninterrupted run (one tiny demo loop) leaves every file each stage
writes; a kill at a boundary is simulated as the issue's reproduction does: take a copy of that work directory
and delete what a process killed there would not have written yet (the stages from there on in state.json and
metrics.jsonl, and their files). One more test kills a real run at the hook itself (`on_train_end` of the GRPO
fit, after its last checkpoint and before the verifier). Every run happens in the same directory, so the
absolute paths inside the files (videos, adapters) are the same in each.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import DEMO_LOOP_TEST_ARGS, DEMO_SFT_TEST_ARGS
from kill_run import arm
from safetensors.torch import load_file

from lightning_veripo.callbacks.verifier import VerifierCallback
from lightning_veripo.cli import main

REPO = Path(__file__).resolve().parents[1]
WORK = Path("work/demo/veripo")
STAGES = ["sft", "iter_1/grpo", "iter_1/dpo"]
# One iteration of the demo loop, small: the SFT warm start long enough that GRPO's groups hold right and
# wrong answers (so the verifier builds pairs and DPO runs), GRPO 3 steps, DPO two epochs of one pair a
# step (shuffled: a kill at the epoch boundary must resume in the same order).
ARGS = [
    "iterate", "--config", "configs/demo.yaml", "--iterations", "1", *DEMO_LOOP_TEST_ARGS,
    "--sft.args", json.dumps(["--trainer.max_steps=100", "--trainer.enable_progress_bar=false", *DEMO_SFT_TEST_ARGS]),
    "--grpo.args", json.dumps(["--trainer.max_steps=3", "--trainer.limit_val_batches=0",
                               "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false"]),
    "--dpo.args", json.dumps(["--trainer.max_epochs=2", "--trainer.enable_progress_bar=false",
                              "--data.init_args.batch_size=1"]),
]  # fmt: skip


def run_loop(cwd: Path) -> None:
    """`veripo iterate ...` in `cwd` (in this process: the command's own entry point, minus the imports)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        assert main(list(ARGS)) == 0


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(run, uninterrupted): `run` is where every loop runs; `uninterrupted` keeps a copy of a whole run."""
    root = tmp_path_factory.mktemp("boundaries")
    run, uninterrupted = root / "run", root / "uninterrupted"
    run.mkdir()
    shutil.copytree(REPO / "configs", run / "configs")
    run_loop(run)
    shutil.copytree(run, uninterrupted)
    stages = [s["stage"] for s in read_state(uninterrupted)["finished"]]
    assert stages == STAGES and (uninterrupted / WORK / "iter_1/dpo/adapter").is_dir(), (
        f"the uninterrupted run must reach DPO for the test to mean anything (stages: {stages})"
    )
    yield run, uninterrupted


def read_state(cwd: Path) -> dict:
    return json.loads((cwd / WORK / "state.json").read_text())


def fresh_copy(dirs: tuple[Path, Path]) -> Path:
    run, uninterrupted = dirs
    shutil.rmtree(run)
    shutil.copytree(uninterrupted, run)
    return run


def kill(cwd: Path, unfinished_from: str | None, remove: list[str]) -> None:
    """Make `cwd` what a process killed at a boundary leaves: the stages from `unfinished_from` on are not in
    state.json or metrics.jsonl (they are written last, after a stage's fit, adapter and evaluation), and
    the paths under the work dir in `remove` were never written."""
    work = cwd / WORK
    if unfinished_from is not None:
        keep = STAGES[: STAGES.index(unfinished_from)]
        state = read_state(cwd)
        state["finished"] = [s for s in state["finished"] if s["stage"] in keep]
        (work / "state.json").write_text(json.dumps(state, indent=1))
        rows = [
            x for x in (work / "metrics.jsonl").read_text().splitlines() if json.loads(x)["stage"] in keep
        ]
        (work / "metrics.jsonl").write_text("".join(f"{x}\n" for x in rows))
    for name in remove:
        path = work / name
        assert path.exists(), f"{path} was not written by the uninterrupted run"
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def outcome(cwd: Path) -> dict:
    """What a run leaves that must not depend on interruptions (timings and resident memory aside)."""
    work = cwd / WORK
    verifier = work / "iter_1/verifier"
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    state = read_state(cwd)
    adapters = {
        s["stage"]: load_file(Path(cwd, s["adapter"], "adapter_model.safetensors"))
        for s in state["finished"]
        if s.get("adapter")
    }
    return {
        "state": state,
        "metrics": [{k: v for k, v in r.items() if not k.endswith("_s") and k != "rss_mb"} for r in rows],
        "rollouts": (verifier / "rollouts.jsonl").read_text(),
        "pairs": (verifier / "pairs.jsonl").read_text(),
        "verdicts": [
            without(json.loads(x), "latency_s")
            for x in (verifier / "verdicts.jsonl").read_text().splitlines()
        ],
        "stats": without(json.loads((verifier / "stats.json").read_text()), "judge_time_s", "wall_time_s"),
        "exclude_ids": json.loads((work / "iter_1/exclude_ids.json").read_text()),
        "adapters": adapters,
    }


def assert_same(got: dict, expected: dict) -> None:
    assert got["state"] == expected["state"]
    assert got["metrics"] == expected["metrics"]
    for key in ("rollouts", "pairs", "verdicts", "stats", "exclude_ids"):
        assert got[key] == expected[key], key
    assert got["adapters"].keys() == expected["adapters"].keys()
    for stage, tensors in expected["adapters"].items():
        assert got["adapters"][stage].keys() == tensors.keys(), stage
        different = [k for k, v in tensors.items() if not torch.equal(got["adapters"][stage][k], v)]
        assert not different, (stage, different[:3])


def adapter_times(cwd: Path) -> dict[str, int]:
    return {
        str(p.relative_to(cwd)): p.stat().st_mtime_ns for p in (cwd / WORK).rglob("adapter_model.safetensors")
    }


GRPO_LATER = ["iter_1/dpo", "iter_1/exclude_ids.json"]
BOUNDARIES = {  # name: (first stage not yet in state.json, what a kill there left unwritten)
    "sft-last-checkpoint": ("sft", ["sft/adapter", "iter_1"]),
    "sft-finished": ("iter_1/grpo", ["iter_1"]),
    "grpo-last-checkpoint": ("iter_1/grpo", ["iter_1/grpo/adapter", "iter_1/verifier", *GRPO_LATER]),
    # run_verifier writes rollouts, verdicts, pairs, then stats.json: killed just before the last write
    "grpo-inside-verifier": (
        "iter_1/grpo",
        ["iter_1/grpo/adapter", "iter_1/verifier/stats.json", *GRPO_LATER],
    ),
    "grpo-verifier-written": ("iter_1/grpo", ["iter_1/grpo/adapter", *GRPO_LATER]),
    "grpo-finished": ("iter_1/dpo", GRPO_LATER),
    "dpo-last-checkpoint": ("iter_1/dpo", ["iter_1/dpo/adapter", "iter_1/exclude_ids.json"]),
    "dpo-finished": (None, ["iter_1/exclude_ids.json"]),
    "loop-finished": (None, []),
    # not a kill: the verifier's files removed by hand after GRPO finished; the loop judges the checkpoint again
    "grpo-finished-verifier-removed": ("iter_1/dpo", ["iter_1/verifier", *GRPO_LATER]),
}


@pytest.mark.slow
@pytest.mark.parametrize("boundary", list(BOUNDARIES))
def test_a_kill_at_a_boundary_then_the_same_command_ends_as_the_uninterrupted_run(dirs, boundary):
    run = fresh_copy(dirs)
    kill(run, *BOUNDARIES[boundary])
    before = adapter_times(run)

    run_loop(run)

    assert_same(outcome(run), outcome(dirs[1]))
    after = adapter_times(run)
    assert {k: after[k] for k in before} == before  # the stages finished before the kill were not redone
    assert not list((run / WORK).rglob(".*.tmp"))  # nothing half-written


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after the hook that raises it runs (not even `except Exception`)."""


@pytest.mark.slow
def test_a_run_killed_between_grpo_last_checkpoint_and_the_verifier_recovers_its_dpo_stage(dirs, monkeypatch):
    """The issue's report, with a real kill: the GRPO fit's last checkpoint is written, then the process dies
    as `on_train_end` starts. Running the command again must not record DPO as skipped."""
    run = fresh_copy(dirs)
    kill(run, *BOUNDARIES["sft-finished"])

    def die(self, trainer, pl_module):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(VerifierCallback, "on_train_end", die)
        with pytest.raises(Killed):
            run_loop(run)
    assert (run / WORK / "iter_1/grpo/checkpoints/last.ckpt").is_file()
    assert not (run / WORK / "iter_1/verifier").exists()
    assert [s["stage"] for s in read_state(run)["finished"]] == ["sft"]

    run_loop(run)

    assert_same(outcome(run), outcome(dirs[1]))
    assert not any("skipped" in s for s in read_state(run)["finished"])


@pytest.mark.slow
def test_without_the_verifier_files_or_a_checkpoint_the_loop_stops_instead_of_skipping_dpo(dirs):
    run = fresh_copy(dirs)
    kill(run, "iter_1/dpo", ["iter_1/verifier", "iter_1/grpo/checkpoints", *GRPO_LATER])
    with pytest.raises(FileNotFoundError, match=r"stats.json is missing.*Remove iter_1/grpo from state.json"):
        run_loop(run)
    assert [s["stage"] for s in read_state(run)["finished"]] == ["sft", "iter_1/grpo"]  # no "skipped" DPO
    assert not (run / WORK / ".veripo.lock").exists()  # a run that raised released its work directory


# Kills inside a stage, not at its boundary: a real signal at a chosen step of a fit or batch of an evaluation
# (tests/kill_run.py), then the same command. SIGTERM is handled by the run (it exits 143 saying where it
# stopped), so it is sent in this process; SIGKILL kills a `veripo` subprocess (the one whose lock the next run
# must take over).
LOCK = WORK / ".veripo.lock"


class Unhandled(Exception):
    """SIGTERM reached the test's own handler: the run did not handle it (it would have died silently)."""


def unhandled(signum: int, frame: object) -> None:
    raise Unhandled("SIGTERM was not handled by the run")


def run_loop_killed(cwd: Path, monkeypatch: pytest.MonkeyPatch, stage: str, when: str) -> int:
    """The loop in `cwd` in this process, sent SIGTERM at `when` of `stage`; returns the command's exit code."""
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        with monkeypatch.context() as patch:
            patch.chdir(cwd)
            arm(patch, signal.SIGTERM, stage, when)
            return main(list(ARGS))
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_loop_sigkilled(cwd: Path, stage: str, when: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "tests/kill_run.py"), "KILL", stage, when, "--", *ARGS]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


def finished_stages(cwd: Path) -> list[str]:
    return [s["stage"] for s in read_state(cwd)["finished"]]


@pytest.mark.slow
def test_sigterm_inside_the_grpo_fit_exits_143_saying_where_and_the_same_command_resumes_to_the_same_run(
    dirs, monkeypatch, capsys
):
    run = fresh_copy(dirs)
    kill(run, *BOUNDARIES["sft-finished"])

    assert run_loop_killed(run, monkeypatch, "iter_1/grpo", "step:2") == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM in iter_1/grpo at step 2" in err and "the same command resumes" in err
    assert finished_stages(run) == ["sft"] and not (run / LOCK).exists()
    assert torch.load(run / WORK / "iter_1/grpo/checkpoints/last.ckpt", weights_only=True)["global_step"] == 2

    run_loop(run)
    assert_same(outcome(run), outcome(dirs[1]))


@pytest.mark.slow
def test_sigkill_inside_the_grpo_fit_then_the_same_command_takes_the_lock_over_and_ends_as_the_uninterrupted_run(
    dirs,
):
    run = fresh_copy(dirs)
    kill(run, *BOUNDARIES["sft-finished"])

    killed = run_loop_sigkilled(run, "iter_1/grpo", "step:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert json.loads((run / LOCK).read_text())["pid"] != os.getpid()  # the dead run's lock is left behind
    assert torch.load(run / WORK / "iter_1/grpo/checkpoints/last.ckpt", weights_only=True)["global_step"] == 1

    with pytest.warns(UserWarning, match="taking over the lock of a run that is gone"):
        run_loop(run)
    assert_same(outcome(run), outcome(dirs[1]))
    assert not (run / LOCK).exists()


@pytest.mark.slow
def test_sigterm_at_the_end_of_a_dpo_epoch_resumes_the_next_epoch_in_the_uninterrupted_order(
    dirs, monkeypatch, capsys
):
    """DPO's 4 pairs, one a step, 2 epochs: stopped after step 4, the resumed fit draws the second epoch's order
    from the random state its checkpoint restored, as the uninterrupted fit did at that point."""
    run = fresh_copy(dirs)
    kill(run, *BOUNDARIES["grpo-finished"])
    assert [s["steps"] for s in read_state(dirs[1])["finished"] if s["stage"] == "iter_1/dpo"] == [8]

    assert run_loop_killed(run, monkeypatch, "iter_1/dpo", "step:4") == 143
    assert "stopped by SIGTERM in iter_1/dpo at step 4" in capsys.readouterr().err
    assert finished_stages(run) == ["sft", "iter_1/grpo"]

    run_loop(run)
    assert_same(outcome(run), outcome(dirs[1]))


@pytest.mark.slow
def test_sigterm_inside_an_evaluation_exits_143_and_the_same_command_redoes_it_to_the_same_answers(
    dirs, monkeypatch, capsys
):
    run = fresh_copy(dirs)
    kill(run, *BOUNDARIES["grpo-finished"])
    answers = (dirs[1] / WORK / "iter_1/dpo/answers.jsonl").read_text()

    assert run_loop_killed(run, monkeypatch, "iter_1/dpo", "eval:1") == 143
    assert (
        "stopped by SIGTERM in iter_1/dpo (evaluating); the same command resumes" in capsys.readouterr().err
    )
    assert finished_stages(run) == ["sft", "iter_1/grpo"]
    assert not (run / WORK / "iter_1/dpo/answers.jsonl").exists()

    run_loop(run)
    assert_same(outcome(run), outcome(dirs[1]))
    assert (run / WORK / "iter_1/dpo/answers.jsonl").read_text() == answers
