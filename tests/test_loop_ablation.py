"""`benchmarks/loop_ablation.py`: the 2 x 2 of the loop's DPO stages and data filter, from two lab runs."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("loop_ablation", REPO / "benchmarks" / "loop_ablation.py")
ablation = importlib.util.module_from_spec(_spec)
sys.modules["loop_ablation"] = ablation
_spec.loader.exec_module(ablation)

# per seed, the final greedy accuracy of each cell
ACCURACY = {
    0: {"grpo": 0.70, "nodpo": 0.60, "loop0": 0.80, "loop": 0.75},
    1: {"grpo": 0.50, "nodpo": 0.55, "loop0": 0.45, "loop": 0.65},
    2: {"grpo": 0.90, "nodpo": 0.80, "loop0": 0.90, "loop": 0.85},
}


def _runs(setting: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    def row(arm: str, seed: int, stage: str, acc: float) -> dict[str, Any]:
        return {"arm": arm, "seed": seed, "stage": stage, **{k: acc for k in ablation.KEYS}}

    filtered, unfiltered = [], []
    for seed, cells in ACCURACY.items():
        for arm in ("grpo", "nodpo", "loop"):
            filtered.append(row(arm, seed, "sft", 0.0))  # earlier stages never count
            last = "iter_2/dpo" if arm == "loop" else "iter_2/grpo"
            filtered.append(row(arm, seed, last, cells[arm]))
        unfiltered += [row("loop", seed, "iter_1/dpo", 0.0), row("loop", seed, "iter_2/dpo", cells["loop0"])]
        unfiltered.append(row("grpo", seed, "iter_2/grpo", 0.0))  # a copied GRPO arm there is not a cell
    base = {"iterations": 2, "grpo_lr": 1e-3}
    return (
        {"setting": {**base, "discard_solved_fraction": 0.8}, "rows": filtered},
        {"setting": {**base, "discard_solved_fraction": 0.0, **(setting or {})}, "rows": unfiltered},
    )


def test_the_effects_are_the_two_by_two_contrasts_per_seed_with_t_intervals() -> None:
    out = ablation.effects(ablation.cells(*_runs()))
    assert out["seeds"] == [0, 1, 2]
    assert out["final_stage"] == {"grpo": "iter_2/grpo", "nodpo": "iter_2/grpo", "loop0": "iter_2/dpo",
                                  "loop": "iter_2/dpo"}  # fmt: skip
    acc = out["accuracy"]
    expected = {
        "dpo": [((c["loop"] - c["nodpo"]) + (c["loop0"] - c["grpo"])) / 2 for c in ACCURACY.values()],
        "filter": [((c["nodpo"] - c["grpo"]) + (c["loop"] - c["loop0"])) / 2 for c in ACCURACY.values()],
        "interaction": [(c["loop"] - c["nodpo"]) - (c["loop0"] - c["grpo"]) for c in ACCURACY.values()],
        "loop - grpo": [c["loop"] - c["grpo"] for c in ACCURACY.values()],
    }
    for name, values in expected.items():
        assert acc[name]["per_seed"] == pytest.approx(values, abs=1e-4), name
        mean = sum(values) / 3
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
        assert acc[name]["mean"] == pytest.approx(mean, abs=1e-4)
        assert acc[name]["ci95"] == pytest.approx(4.303 * sd / math.sqrt(3), abs=1e-4)
    # by hand: seed 0 (0.15 + 0.10) / 2, seed 1 (0.10 - 0.05) / 2, seed 2 (0.05 + 0.00) / 2
    assert acc["dpo"]["per_seed"] == pytest.approx([0.125, 0.025, 0.025])
    assert acc["cells"]["loop0"] == pytest.approx((0.80 + 0.45 + 0.90) / 3, abs=1e-4)


@pytest.mark.parametrize(
    ("unfiltered_setting", "message"),
    [
        ({"grpo_lr": 2e-3}, r"differ in more than discard_solved_fraction: \['grpo_lr'\]"),
        ({"discard_solved_fraction": 0.5}, "UNFILTERED none"),
    ],
)
def test_runs_that_are_not_the_two_halves_of_the_ablation_are_refused(
    unfiltered_setting: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ablation.cells(*_runs(unfiltered_setting))


def test_the_command_writes_every_split_and_names_a_split_it_cannot_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    filtered, unfiltered = _runs()
    paths = [tmp_path / "f.json", tmp_path / "u.json"]
    for path, run in zip(paths, (filtered, unfiltered), strict=True):
        path.write_text(json.dumps(run))
    out = tmp_path / "ablation.json"
    assert ablation.main(["--split", "test", *map(str, paths), "--split", "val", *map(str, paths),
                          "--out", str(out)]) == 0  # fmt: skip
    written = json.loads(out.read_text())
    assert written["test"] == written["val"] and written["test"]["seeds"] == [0, 1, 2]
    assert "dpo" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        ablation.main(["--split", "test", str(paths[1]), str(paths[0]), "--out", str(out)])  # swapped
    assert "--split test: FILTERED must drop solved questions" in capsys.readouterr().err
