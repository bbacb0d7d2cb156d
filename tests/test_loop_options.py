"""`veripo iterate` options of the effectiveness lab: a base row, sampled evaluation, a minimum of questions with
pairs before DPO, the majority baseline, training time apart from evaluation, an evaluation judge apart from the
verifier's; and the tiny model's size presets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from judges_for_tests import Contrarian

from lightning_veripo.tiny import SIZES, make_tiny_model

REPO = Path(__file__).resolve().parents[1]


def test_size_presets_set_the_decoder_and_an_unknown_one_is_refused(tmp_path: Path) -> None:
    from transformers import AutoConfig

    make_tiny_model(tmp_path / "small", size="small")
    text = AutoConfig.from_pretrained(tmp_path / "small").get_text_config()
    assert (text.hidden_size, text.num_hidden_layers) == (
        SIZES["small"]["hidden_size"],
        SIZES["small"]["num_layers"],
    )
    with pytest.raises(ValueError, match=r"unknown size='huge'; expected one of \['small', 'tiny'\]"):
        make_tiny_model(tmp_path / "huge", size="huge")
    assert not (tmp_path / "huge").exists()


def test_iterate_evaluates_the_base_and_skips_dpo_below_the_minimum_of_questions_with_pairs(
    tmp_path: Path,
) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    quiet = ["--trainer.enable_progress_bar=false"]
    args = [
        "--iterations", "1", "--eval_base", "true", "--evaluation.num_samples", "2", "--min_questions_with_pairs", "1000",
        "--evaluation.judge", json.dumps({"class_path": "judges_for_tests.Contrarian"}),
        "--sft.args", json.dumps(["--trainer.max_steps=60", *quiet]),
        "--grpo.args", json.dumps(["--trainer.max_steps=2", "--trainer.limit_val_batches=0", *quiet,
                                   "--trainer.num_sanity_val_steps=0", "--data.init_args.synthetic.num_train=8",
                                   "--data.init_args.synthetic.num_val=8"]),
    ]  # fmt: skip
    command = [
        sys.executable,
        "-m",
        "lightning_veripo.cli",
        "iterate",
        "--config",
        "configs/demo.yaml",
        *args,
    ]
    tests_on_path = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **tests_on_path},
    )
    assert run.returncode == 0, run.stderr[-4000:]
    work = tmp_path / "work/demo/veripo"
    # evaluation.judge scores the evaluations, the verifier keeps its own judge (the demo's rules)
    graded = [json.loads(x) for x in (work / "sft/answers.jsonl").read_text().splitlines()]
    assert graded and all(a["rationale"] == Contrarian.REASON for a in graded)
    verdicts = [json.loads(x) for x in (work / "iter_1/verifier/verdicts.jsonl").read_text().splitlines()]
    assert verdicts and not any(v["rationale"] == Contrarian.REASON for v in verdicts)
    state = json.loads((work / "state.json").read_text())
    assert [s["stage"] for s in state["finished"]] == ["base", "sft", "iter_1/grpo", "iter_1/dpo"]
    covered = len(
        {json.loads(x)["record"]["problem_id"] for x in (work / "iter_1/verifier/pairs.jsonl").open()}
    )
    assert state["finished"][-1]["skipped"] == (
        f"the verifier's pairs cover {covered} question(s), fewer than min_questions_with_pairs=1000"
    )
    assert "iter_1/dpo skipped" in run.stderr
    # a skipped DPO stage still leaves the data filter to the next GRPO fit (the lab's `nodpo` ablation rests on it)
    solved = json.loads((work / "iter_1/verifier/stats.json").read_text())["always_solved"]
    dropped = json.loads((work / "iter_1/exclude_ids.json").read_text())
    assert set(dropped) <= set(solved) and len(dropped) == int(len(solved) * 0.8)
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["base", "sft", "iter_1/grpo"]
    for row in rows:
        # every completion was judged by the Contrarian
        assert row["inconsistency_rate"] == row["sampled_inconsistency_rate"] == 1.0
        assert 0.0 <= row["sampled_accuracy"] <= row["pass_at_k"] <= 1.0
        assert 0.0 <= row["train_s"] <= row["wall_s"]
    assert rows[0]["step"] == 0 and rows[0]["wall_s"] == 0.0
    answers = [r["solution"] for r in json.loads((tmp_path / "work/demo/data/val.json").read_text())]
    majority = max(answers.count(a) for a in answers) / len(answers)
    assert f"(always answering the most common answer scores {majority:.3f})" in run.stdout
