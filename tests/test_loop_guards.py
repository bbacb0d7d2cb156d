"""The loop's guards end to end, through the real `veripo iterate` on the tiny demo: a GRPO stage made worse on
purpose (its adapter overwritten with large random weights when the fit ends, tests/corrupt_for_tests.py) is
rejected on the development slice and the next stage starts from the kept policy; a verifier judge that fails
its audit on the task's labelled rollouts (judges_for_tests.Contrarian) has every DPO stage skipped, saying why,
while the loop goes on; the same command again changes nothing (the decisions are in state.json)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DEMO_LOOP_TEST_ARGS, DEMO_SFT_TEST_ARGS
from test_loop import SMALL, _scalar_tags

from lightning_veripo.data.synthetic import make_synthetic_data

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar=false"]


@pytest.mark.slow
def test_a_corrupted_grpo_stage_is_rejected_and_an_unfit_judge_skips_dpo(tmp_path: Path) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    # the demo's data, written first with a test split: the development slice the acceptance scores on
    make_synthetic_data(tmp_path / "work/demo/data", 32, 16, num_test=16)
    args = [
        sys.executable, "-m", "lightning_veripo.cli", "iterate", "--config", "configs/demo.yaml",
        "--iterations", "2", *DEMO_LOOP_TEST_ARGS,
        "--sft.args", json.dumps(["--trainer.max_steps=100", *QUIET, *DEMO_SFT_TEST_ARGS]),
        "--grpo.args", json.dumps(["--trainer.max_steps=2", "--trainer.limit_val_batches=0", *QUIET,
                                   "--trainer.num_sanity_val_steps=0",
                                   "--trainer.callbacks+=corrupt_for_tests.CorruptAdapter"]),
        "--judge", json.dumps({"class_path": "judges_for_tests.Contrarian"}),
        "--evaluation.judge", json.dumps({"class_path": "lightning_veripo.verifier.judges.RuleJudge"}),
        "--guards.accept", "no_worse", "--guards.dev_path", "work/demo/data/test.json",
        "--guards.min_judge_accuracy", "0.8",
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    work = tmp_path / "work/demo/veripo"
    state = json.loads((work / "state.json").read_text())
    entries = {s["stage"]: s for s in state["finished"]}
    assert list(entries) == ["sft", "iter_1/grpo", "iter_1/dpo", "iter_2/grpo", "iter_2/dpo"]
    sft = entries["sft"]["adapter"]
    dev = state["dev"]
    start = dev[json.dumps([sft])]
    assert start["n"] == 16 and start["accuracy"] >= 0.15  # the warm start answers some dev questions right
    for it in ("iter_1", "iter_2"):
        grpo = entries[f"{it}/grpo"]
        broken = dev[json.dumps([sft, grpo["adapter"]])]
        # rejected by the rule, on the numbers it recorded: worse than the kept policy by more than the margin
        margin = max((start["accuracy"] * (1 - start["accuracy"]) / 16) ** 0.5, 1 / 16)
        assert broken["accuracy"] < start["accuracy"] - margin
        assert (
            grpo["accepted"] is False and grpo["policy"] == [sft] and grpo["rejected"].startswith("rejected")
        )
        assert (work / it / "grpo/adapter/adapter_config.json").is_file()  # kept on disk
        # the audit failed: DPO skipped with the judge's accuracy, and recorded in the verifier's stats
        assert "below min_judge_accuracy=0.8" in entries[f"{it}/dpo"]["skipped"]
        audit = json.loads((work / it / "verifier/stats.json").read_text())["judge_audit"]
        assert audit["passed"] is False and audit["n"] > 0 and audit["false_alarm_rate"] == 1.0
    # iter_2's GRPO fit started from the kept policy, the warm start alone
    assert "+ the adapters of sft\n" in run.stderr + run.stdout
    assert "the adapters of sft, iter_1/grpo" not in run.stderr + run.stdout
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("accepted") for r in rows] == [None, False, False]
    assert "REJECTED" in run.stdout and "judge audit on" in run.stderr + run.stdout
    assert {"audit/accuracy", "audit/accuracy_strict", "eval/dev_accuracy"} <= _scalar_tags(
        work / "tensorboard"
    )
    # the same command again: every stage (and decision) from state.json, nothing re-made
    before = (work / "state.json").read_text()
    again = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 0, again.stderr[-4000:]
    assert (work / "state.json").read_text() == before
    assert "iter_1/grpo: finished in an earlier run" in again.stderr + again.stdout


@pytest.mark.slow
def test_dpo_from_before_grpo_starts_dpo_from_the_policy_that_grpo_started_from(tmp_path: Path) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    args = [sys.executable, "-m", "lightning_veripo.cli", "iterate", "--config", "configs/demo.yaml", *SMALL,
            "--min_questions_with_pairs", "1", "--guards.dpo_from", "before_grpo"]  # fmt: skip
    run = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    work = tmp_path / "work/demo/veripo"
    entries = {s["stage"]: s for s in json.loads((work / "state.json").read_text())["finished"]}
    sft, grpo, dpo = (entries[s]["adapter"] for s in ("sft", "iter_1/grpo", "iter_1/dpo"))
    assert grpo and dpo, entries  # the verifier found pairs, so DPO trained
    # DPO's fit merged the warm start only (its reference: the policy before GRPO), and replaced the GRPO policy
    header = (run.stderr + run.stdout).split("iter_1/dpo: DPO fit")[1]
    assert header.split("\n")[1].strip().endswith("+ the adapters of sft")
    assert entries["iter_1/dpo"]["policy"] == [sft, dpo]
    config = json.loads((work / "iter_1/dpo/adapter/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
