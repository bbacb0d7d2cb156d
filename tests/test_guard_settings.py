"""The guards' settings round-trip through `veripo iterate`'s YAML and command line (jsonargparse reads
`iterate`'s typed `guards: Guards`), a bad value is refused naming it, and the lab's guard arm gets them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from lightning_veripo.acceptance import Guards
from lightning_veripo.cli import main

REPO = Path(__file__).resolve().parents[1]


def _printed(argv: list[str], capsys, monkeypatch) -> dict:
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", ["demo.yaml", "veripo.yaml"])
def test_the_loop_configs_hold_the_guards(config, capsys, monkeypatch) -> None:
    printed = _printed(["iterate", "--config", f"configs/{config}", "--print_config"], capsys, monkeypatch)
    guards = Guards(**printed["guards"])  # every key a Guards field, every value valid
    assert guards.min_judge_accuracy == 0.8


def test_the_guards_round_trip_through_the_command_line_and_a_printed_config(tmp_path, capsys, monkeypatch):
    args = ["--guards.accept", "no_worse", "--guards.dev_path", "work/demo/data/test.json",
            "--guards.margin_se", "2.0", "--guards.min_judge_accuracy", "0.9", "--guards.dpo_from", "before_grpo",
            "--guards.judge_audit", "mine.jsonl"]  # fmt: skip
    printed = _printed(
        ["iterate", "--config", "configs/demo.yaml", *args, "--print_config"], capsys, monkeypatch
    )
    want = {"accept": "no_worse", "dev_path": "work/demo/data/test.json", "margin_se": 2.0,
            "min_judge_accuracy": 0.9, "judge_audit": "mine.jsonl", "dpo_from": "before_grpo"}  # fmt: skip
    assert printed["guards"] == want
    saved = tmp_path / "printed.yaml"
    saved.write_text(yaml.safe_dump(printed))
    again = _printed(["iterate", "--config", str(saved), "--print_config"], capsys, monkeypatch)
    assert again["guards"] == want


def test_a_guard_value_that_does_not_exist_is_refused(capsys, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_:
        main(["iterate", "--config", "configs/demo.yaml", "--guards.accept", "sometimes", "--print_config"])
    assert exit_.value.code != 0
    assert "sometimes" in capsys.readouterr().err


def test_the_labs_guard_arm_accepts_on_the_development_split_and_the_others_only_score_it() -> None:
    spec = importlib.util.spec_from_file_location("loop_vs_grpo", REPO / "benchmarks" / "loop_vs_grpo.py")
    lab = importlib.util.module_from_spec(spec)
    sys.modules["loop_vs_grpo"] = lab  # its dataclasses look their module up
    spec.loader.exec_module(lab)
    setting = lab.Setting(min_judge_accuracy=0.7, dpo_from="before_grpo")
    dev = lab._dev_path(Path("/d/test.json"))
    assert dev == "/d/val.json" and lab._dev_path(Path("/d/val.json")) is None
    guard = lab.arm_options(setting, "guard", dev)["guards"]
    assert (guard.accept, guard.dev_path, guard.min_judge_accuracy, guard.dpo_from) == (
        "no_worse", "/d/val.json", 0.7, "before_grpo")  # fmt: skip
    for arm in ("grpo", "loop", "nodpo"):
        assert lab.arm_options(setting, arm, dev)["guards"] == Guards(dev_path="/d/val.json")
    # the final policy of an arm is its last kept stage: a rejected last stage does not count
    rows = [{"arm": "guard", "seed": 0, "stage": "iter_1/grpo", "accuracy": 0.5, "accepted": True},
            {"arm": "guard", "seed": 0, "stage": "iter_1/dpo", "accuracy": 0.1, "accepted": False}]  # fmt: skip
    assert lab.final_rows(rows, ("guard",))[("guard", 0)]["accuracy"] == 0.5
