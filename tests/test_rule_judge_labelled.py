"""The rule judge on the hand-labelled rollouts (lightning_veripo/verifier/data/labelled_rollouts.jsonl, the
loop's default judge audit): the set covers what it
should, and the judge keeps the accuracy measured by benchmarks/judge_accuracy.py (see benchmarks/RESULTS.md,
"judge_accuracy"). The judge is deterministic, so the floors are the measured counts, not a margin below them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from lightning_veripo.records import PROBLEM_TYPES
from lightning_veripo.verifier import RuleJudge
from lightning_veripo.verifier.audit import LABELLED_ROLLOUTS

DATA = Path(__file__).parent / "data"


def _module(name: str, path: Path):
    """A script outside the package (the benchmark, the set's generator), imported by path."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the benchmark's own conversion of a labelled row to the judge's input, so test and benchmark judge the same items
judge_accuracy = _module("judge_accuracy", Path(__file__).parents[1] / "benchmarks" / "judge_accuracy.py")
ROWS = [json.loads(line) for line in LABELLED_ROLLOUTS.read_text().splitlines() if line]

# Measured on 244 items: per problem type, (items judged right, counting an abstention as wrong unless the
# label is "cannot tell"; decided items judged right; items labelled inconsistent that were caught).
MEASURED = {
    "multiple choice": (132, 126, 55),
    "numerical": (34, 30, 12),
    "OCR": (25, 22, 9),
    "free-form": (19, 17, 5),
    "regression": (23, 20, 9),
}


@pytest.fixture(scope="module")
def verdicts() -> dict[str, bool | None]:
    out = RuleJudge().judge([judge_accuracy.judge_item(r) for r in ROWS])
    return {r["id"]: v.consistent for r, v in zip(ROWS, out, strict=True)}


def test_the_labelled_set_covers_every_problem_type_and_every_label():
    assert len(ROWS) >= 200 and len({r["id"] for r in ROWS}) == len(ROWS)
    for problem_type in PROBLEM_TYPES:
        labels = {r["label"] for r in ROWS if r["problem_type"] == problem_type}
        assert labels == {True, False, None}, problem_type
    cases = {r["case"].split(":")[0].split(",")[0] for r in ROWS}
    assert {"letter-only", "content-only", "both", "self-correction", "no-conclusion"} <= cases


def test_the_labelled_set_is_what_its_generator_writes():
    assert _module("make_labelled_rollouts", DATA / "make_labelled_rollouts.py").ITEMS == ROWS


@pytest.mark.parametrize("problem_type", list(MEASURED))
def test_rule_judge_keeps_its_measured_accuracy(verdicts, problem_type):
    rows = [r for r in ROWS if r["problem_type"] == problem_type]
    right = sum(verdicts[r["id"]] == r["label"] for r in rows)
    decided_right = sum(verdicts[r["id"]] is not None and verdicts[r["id"]] == r["label"] for r in rows)
    caught = sum(r["label"] is False and verdicts[r["id"]] is False for r in rows)
    wrong = [(r["id"], r["reasoning"], r["answer"], r["label"], verdicts[r["id"]]) for r in rows]
    wrong = [w for w in wrong if w[3] != w[4]]
    measured_right, measured_decided_right, measured_caught = MEASURED[problem_type]
    assert right >= measured_right and decided_right >= measured_decided_right, wrong
    assert caught >= measured_caught, wrong


def test_rule_judge_catches_every_labelled_inconsistent_multiple_choice_rollout(verdicts):
    inconsistent = [r for r in ROWS if r["problem_type"] == "multiple choice" and r["label"] is False]
    assert [(r["reasoning"], r["answer"]) for r in inconsistent if verdicts[r["id"]] is not False] == []
