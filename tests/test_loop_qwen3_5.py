"""`veripo iterate` on a tiny Qwen3.5 (Gated-DeltaNet linear attention + full attention): SFT, GRPO with the
shared prefill over its hybrid cache, the verifier and DPO, through the real command, with the smallest step
counts. These 3 GRPO steps may find no pairs on this model (then the DPO stage is skipped, saying why); a DPO fit
on Qwen3.5 is `test_archs.py::test_qwen3_5_dpo_fit_moves_the_policy_and_not_the_reference`. The other
architectures' loop is `test_loop.py` (Qwen2.5-VL)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DEMO_LOOP_TEST_ARGS, DEMO_SFT_TEST_ARGS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_iterate_runs_sft_grpo_verifier_and_dpo_on_a_tiny_qwen3_5(tmp_path: Path) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    args = [  # the loop builds the tiny Qwen3.5 itself (`tiny_arch`)
        sys.executable, "-m", "lightning_veripo.cli", "iterate", "--config", "configs/demo.yaml",
        "--iterations", "1", *DEMO_LOOP_TEST_ARGS, "--tiny_arch", "qwen3_5",
        "--sft.args", json.dumps(["--trainer.max_steps=100", "--trainer.enable_progress_bar=false",
                                  *DEMO_SFT_TEST_ARGS]),
        "--grpo.args", json.dumps(["--trainer.max_steps=3", "--trainer.limit_val_batches=0",
                                   "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
                                   "--data.init_args.synthetic.num_train=16", "--data.init_args.synthetic.num_val=8"]),
        "--dpo.args", json.dumps(["--trainer.max_epochs=1", "--trainer.enable_progress_bar=false"]),
    ]  # fmt: skip
    run = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=1200)

    print(run.stdout)  # the loop's summary table, with `pytest -s`
    assert run.returncode == 0, run.stderr[-4000:]
    assert "building the offline tiny model (qwen3_5, tiny)" in run.stderr
    assert "one prefill per rollout row" not in run.stderr  # the shared prefill ran on the hybrid cache
    config = json.loads((tmp_path / "work/demo/tiny-model/config.json").read_text())
    assert config["model_type"] == "qwen3_5"
    work = tmp_path / "work/demo/veripo"
    state = json.loads((work / "state.json").read_text())
    assert [s["stage"] for s in state["finished"]] == ["sft", "iter_1/grpo", "iter_1/dpo"]
    rollouts = (work / "iter_1/verifier/rollouts.jsonl").read_text().splitlines()
    assert len(rollouts) == 3 * 2 * 8  # steps x prompts per step x G
    assert (work / "iter_1/verifier/verdicts.jsonl").is_file()
    dpo = state["finished"][2]
    if (work / "iter_1/verifier/pairs.jsonl").read_text().strip():
        assert not dpo.get("skipped") and dpo["steps"] >= 1, dpo
        assert (work / "iter_1/dpo/adapter/adapter_config.json").is_file()
    else:
        assert dpo["skipped"] and any(
            "iter_1/dpo" in x and "skipped" in x for x in run.stderr.splitlines()
        ), dpo
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["sft", "iter_1/grpo", "iter_1/dpo"][: len(rows)] and len(rows) >= 2
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)  # each stage evaluated
    assert (
        rows[0]["format_rate"] == 1.0
    )  # the warm start taught the tiny Qwen3.5 the answer format (no looping)
