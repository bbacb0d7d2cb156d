"""The loop's guards, by value and without a fit: the acceptance rule's margin and decisions, the settings'
checks, the judge audit's numbers on the shipped labelled rollouts (against benchmarks/judge_accuracy.py's own
metrics), the gate that skips DPO below `min_judge_accuracy` or warns that a judge is unaudited, and the kept
policy that state.json's entries leave."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from judges_for_tests import Contrarian

from lightning_veripo.acceptance import Guards, decide, margin
from lightning_veripo.data.synthetic import make_synthetic_data
from lightning_veripo.judge_gate import JudgeGate
from lightning_veripo.loop_state import LoopState
from lightning_veripo.verifier import RuleJudge
from lightning_veripo.verifier.audit import (
    LABELLED_ROLLOUTS,
    audit_judge,
    labelled_slice,
    read_labelled,
    target_slice,
)

REPO = Path(__file__).resolve().parents[1]


def _judge_accuracy():
    spec = importlib.util.spec_from_file_location("judge_accuracy", REPO / "benchmarks" / "judge_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_margin_is_binomial_standard_errors_and_at_least_one_question():
    assert margin(0.7, 64, 1.0) == pytest.approx(math.sqrt(0.7 * 0.3 / 64))  # 0.0573
    assert margin(0.7, 64, 2.0) == pytest.approx(2 * 0.057282196)
    assert margin(1.0, 50, 1.0) == pytest.approx(1 / 50)  # no spread at p0 = 1: one question of slack
    assert margin(0.5, 10_000, 1.0) == pytest.approx(0.005)


def test_no_worse_keeps_a_stage_within_the_margin_and_rejects_one_beyond_it():
    guards = Guards(accept="no_worse", dev_path="dev.json")
    # 0.891 -> 0.766 on 64 questions (the demo's iter_2/dpo of the issue): margin 0.039, rejected
    d = decide(guards, 0.891, 0.766, 64)
    assert not d.accepted and d.margin == pytest.approx(0.039, abs=5e-4)
    assert "rejected: dev accuracy 0.766 vs 0.891" in d.reason()
    assert decide(guards, 0.891, 0.86, 64).accepted  # 0.031 worse: within one standard error
    assert decide(guards, 0.5, 0.9, 64).accepted
    assert decide(Guards(), 0.891, 0.0, 64).accepted  # accept: always is the loop as it was


def test_settings_that_cannot_work_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="accept=no_worse needs dev_path"):
        Guards(accept="no_worse")
    with pytest.raises(ValueError, match=r"min_judge_accuracy=1.5 must be in \[0, 1\]"):
        Guards(min_judge_accuracy=1.5)
    with pytest.raises(ValueError, match="dpo_from='sft' must be grpo or before_grpo"):
        Guards(dpo_from="sft")
    with pytest.raises(ValueError, match="is val_path, the split the table reports"):
        Guards(accept="no_worse", dev_path="data/val.json").check_dev_path("data/./val.json")


def test_the_shipped_set_is_sliced_to_the_target_task_questions(tmp_path: Path):
    rows = read_labelled(LABELLED_ROLLOUTS)
    assert len(rows) == 244
    make_synthetic_data(tmp_path / "d", 4, 4, tasks=["colour"])
    sliced, source = target_slice(None, str(tmp_path / "d" / "val.json"))
    assert source == str(LABELLED_ROLLOUTS)
    assert len(sliced) == 88 and {r["question"] for r in sliced} == {"What colour is the moving square?"}
    assert len(labelled_slice(rows, {"How many squares are in the video?"})) == 36
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"problem": "Who wrote this film?", "path": "x.mp4"}]))
    assert target_slice(None, str(other))[0] == []


@pytest.mark.parametrize("judge", [RuleJudge(), Contrarian()], ids=["rules", "contrarian"])
def test_the_audit_numbers_are_the_benchmark_metrics_of_the_same_verdicts(judge):
    rows = labelled_slice(read_labelled(LABELLED_ROLLOUTS), {"What colour is the moving square?"})
    audit = audit_judge(judge, rows, "x", min_judge_accuracy=0.8)
    bench = _judge_accuracy()
    verdicts = [v.consistent for v in judge.judge([bench.judge_item(r) for r in rows])]
    reference = bench.metrics([r["label"] for r in rows], verdicts, 0.0)
    assert audit.n == reference["n"] == 88
    assert audit.accuracy == pytest.approx(reference["accuracy_decided"])
    assert audit.accuracy_strict == pytest.approx(reference["accuracy_strict"])
    assert audit.false_alarm_rate == pytest.approx(reference["false_alarm_rate"])
    assert audit.abstention_rate == pytest.approx(reference["abstention_rate"])
    if isinstance(judge, Contrarian):  # every verdict "inconsistent": right exactly on the rows labelled so
        assert audit.accuracy == pytest.approx(sum(r["label"] is False for r in rows) / 88, abs=1e-4)
        assert audit.false_alarm_rate == 1.0 and not audit.passed
    else:
        assert audit.accuracy >= 0.95 and audit.passed


def test_a_labelled_file_missing_a_field_is_refused_naming_the_line(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "options": [], "reasoning": "r", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .* missing label"):
        read_labelled(bad)


def test_the_gate_skips_dpo_below_the_threshold_and_records_the_audit(tmp_path: Path, capsys):
    make_synthetic_data(tmp_path / "d", 4, 4, tasks=["colour"])
    verifier = tmp_path / "iter_1" / "verifier"
    verifier.mkdir(parents=True)
    (verifier / "stats.json").write_text(json.dumps({"pairs": 3}))
    gate = JudgeGate(Guards(min_judge_accuracy=0.8), Contrarian(), str(tmp_path / "d" / "val.json"))
    why = gate.check("iter_1", verifier, tmp_path / "tb", step=5)
    assert why is not None and "below min_judge_accuracy=0.8" in why and "88 labelled rollouts" in why
    stats = json.loads((verifier / "stats.json").read_text())
    assert stats["pairs"] == 3 and stats["judge_audit"]["passed"] is False and stats["judge_audit"]["n"] == 88
    printed = capsys.readouterr()
    assert "judge audit on 88 labelled rollouts" in printed.out + printed.err
    assert (
        JudgeGate(Guards(min_judge_accuracy=0.8), RuleJudge(), str(tmp_path / "d" / "val.json")).check(
            "iter_1", verifier, tmp_path / "tb", step=5
        )
        is None
    )


def test_a_task_without_labelled_rollouts_is_warned_about_once_and_not_gated(tmp_path: Path, capsys):
    other = tmp_path / "val.json"
    other.write_text(json.dumps([{"problem": "Who wrote this film?", "path": "x.mp4"}]))
    gate = JudgeGate(Guards(min_judge_accuracy=0.99), Contrarian(), str(other))
    verifier = tmp_path / "v"
    verifier.mkdir()
    assert gate.check("iter_1", verifier, tmp_path / "tb", 0) is None
    assert gate.check("iter_2", verifier, tmp_path / "tb", 0) is None
    out = capsys.readouterr()
    assert (out.out + out.err).count("judge is unaudited") == 1
    assert not (verifier / "stats.json").exists()


def test_the_kept_policy_skips_rejected_stages_and_follows_a_dpo_from_before_grpo(tmp_path: Path):
    state = LoopState(tmp_path)
    state.mark("sft", "sft/adapter")
    state.mark("iter_1/grpo", "iter_1/grpo/adapter", accepted=False, policy=["sft/adapter"])
    assert state.adapters() == ["sft/adapter"]
    state.mark("iter_1/dpo", "iter_1/dpo/adapter", accepted=True)
    state.mark("iter_2/grpo", "iter_2/grpo/adapter")
    # a DPO stage from the policy before iter_2/grpo replaces the GRPO policy
    state.mark(
        "iter_2/dpo", "iter_2/dpo/adapter", policy=["sft/adapter", "iter_1/dpo/adapter", "iter_2/dpo/adapter"]
    )
    state.mark("iter_3/dpo", None, skipped="why")
    assert state.adapters() == ["sft/adapter", "iter_1/dpo/adapter", "iter_2/dpo/adapter"]
    state.remember_dev(["sft/adapter"], {"accuracy": 0.5, "n": 8})
    assert LoopState(tmp_path).dev_score(["sft/adapter"]) == {"accuracy": 0.5, "n": 8}
    assert LoopState(tmp_path).adapters() == state.adapters()
