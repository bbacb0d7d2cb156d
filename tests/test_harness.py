"""`benchmarks/harness.py`, what the benchmark scripts share: step statistics with warm-up and repeats, the
resident-set high-water mark, worker processes, the JSON report and its table cells, TRL's common settings."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch
from trl import DPOConfig, GRPOConfig

from benchmarks import harness
from lightning_veripo.lora import LoRAConfig


def _timings(step: list[float], cpu: list[float], iters: list[float]) -> harness.Timings:
    """Timings as a run of len(step) steps leaves them (the clocks' readings given, not measured)."""
    t = harness.Timings(harness.VisionCounter())
    t.step, t.cpu, t.iter = step, cpu, iters
    t.load = [0.5] * len(step)
    t.vision_calls, t.vision_patches = [1] * len(step), [16] * len(step)
    t.rss_before_train = 100.0
    return t


def test_summary_leaves_the_warmup_steps_out_of_the_statistics() -> None:
    t = _timings(step=[9.0, 1.0, 4.0, 2.0], cpu=[8.0, 0.5, 3.0, 1.5], iters=[1.5, 4.5, 2.5])

    s = harness.summary(t, warmup=1, extra={"impl": "x"})

    assert s["steps_timed"] == 3 and s["warmup_step_s"] == [9.0]
    assert s["step_s"] == [1.0, 4.0, 2.0]
    assert s["step_median_s"] == 2.0 and s["step_min_s"] == 1.0
    assert s["cpu_median_s"] == statistics.median([0.5, 3.0, 1.5])
    # iter[i] spans the end of step i to the end of step i + 1: all three end at a timed step
    assert s["iter_s"] == [1.5, 4.5, 2.5] and s["iter_median_s"] == 2.5
    assert s["peak_minus_before_train_mib"] == pytest.approx(s["peak_rss_mib"] - 100.0)
    assert s["step_peak_above_start_max_mib"] is None  # step peaks were not asked for
    assert s["impl"] == "x"


def test_summary_with_two_warmup_steps_drops_the_interval_that_ends_at_a_warmup_step() -> None:
    t = _timings(step=[9.0, 8.0, 1.0, 3.0], cpu=[1.0] * 4, iters=[7.0, 1.2, 3.1])

    s = harness.summary(t, warmup=2, extra={})

    assert s["iter_s"] == [1.2, 3.1] and s["step_median_s"] == 2.0


def test_pool_pools_the_steps_of_repeated_runs_and_keeps_the_largest_peaks() -> None:
    runs = []
    for steps, peak in (([1.0, 3.0], 500.0), ([2.0, 10.0], 700.0)):
        s = harness.summary(_timings(step=[5.0, *steps], cpu=[1.0] * 3, iters=steps), 1, {})
        s.update(peak_rss_mib=peak, peak_minus_before_train_mib=peak - 100, scored_sequence_tokens_padded=40,
                 mean_completion_tokens=8.0, vision_input="4 frames")  # fmt: skip
        runs.append(s)

    pooled = harness.pool(runs)

    assert pooled["step_median_s"] == statistics.median([1.0, 3.0, 2.0, 10.0])
    assert pooled["step_min_s"] == 1.0
    assert pooled["peak_rss_mib"] == 700.0 and pooled["peak_minus_before_train_mib"] == 600.0
    assert pooled["loadavg_1min_at_step_start"] == [0.5] * 6
    assert harness.mean_load(runs) == 0.5
    assert pooled["runs"] is runs and pooled["vision_input"] == "4 frames"


def test_timings_measure_each_step_and_count_the_vision_calls_inside_it() -> None:
    tower = torch.nn.Linear(4, 4)
    counter = harness.VisionCounter()
    counter.attach(tower)
    t = harness.Timings(counter)
    for rows in (3, 5):
        t.begin()
        time.sleep(0.05)
        tower(torch.zeros(rows, 4))
        tower(torch.zeros(rows, 4))
        t.end()

    assert len(t.step) == 2 and all(x >= 0.05 for x in t.step)
    assert len(t.iter) == 1 and t.iter[0] >= t.step[1]
    assert t.vision_calls == [2, 2] and t.vision_patches == [6, 10]
    assert t.rss_before_train > 0


def test_a_steps_peak_above_its_start_sees_memory_it_touched_and_freed() -> None:
    if not harness.reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs: the high-water mark cannot be reset on this system")
    t = harness.Timings(harness.VisionCounter(), step_peaks=True)
    for size in (0, 96 * 2**20):
        t.begin()
        block = b"\x01" * size  # written, so resident
        del block
        t.end()

    assert t.step_peak[1] > 80  # MiB: the 96 MiB block, gone again by the step's end
    assert t.step_peak[0] < t.step_peak[1] - 60
    assert harness.hwm_mib() >= harness.rss_mib() - 1  # the mark is at least the resident set now


def test_run_worker_returns_the_workers_json_with_its_wall_time(tmp_path: Path) -> None:
    out = tmp_path / "w.json"
    code = f"import json, pathlib; pathlib.Path({str(out)!r}).write_text(json.dumps({{'x': 3}}))"

    result = harness.run_worker([sys.executable, "-c", code], out, "worker w")

    assert result["x"] == 3 and result["process_wall_s"] > 0


def test_a_failing_worker_stops_the_benchmark_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit, match=r"trl with 4 frames failed \(exit 3\)"):
        harness.run_worker(
            [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
            tmp_path / "x",
            "trl with 4 frames",
        )
    assert "boom" in capsys.readouterr().err  # the worker's output, for the reason


def test_write_json_makes_the_folder_and_writes_paths_as_text(tmp_path: Path) -> None:
    path = harness.write_json(tmp_path / "a" / "b.json", {"model_dir": tmp_path, "n": [1, 2]})

    assert json.loads(path.read_text()) == {"model_dir": str(tmp_path), "n": [1, 2]}


def test_table_cells() -> None:
    assert harness.fmt(None, ".2f") == "-" and harness.fmt(1.234, ".2f") == "1.23"
    assert harness.fmt(None, ".1f", "x") == "-" and harness.fmt(2.0, ".1f", "x") == "2.0x"
    assert harness.ratio(6.0, 3.0) == 2.0 and harness.ratio(6.0, 0.0) is None
    assert (
        harness.markdown_table(["a", "b"], [[1, "x"], [2, "y"]])
        == "| a | b |\n|---|---|\n| 1 | x |\n| 2 | y |"
    )


@pytest.mark.parametrize(
    ("size", "frames", "trl_frames", "message"),
    [(100, [4], "matched", "--size must be a multiple of 28"), (112, [6], "matched", "--frames must be even"),
     (112, [3], "all", "--frames must be even")],
)  # fmt: skip
def test_check_frames_rejects_what_qwen_or_trl_cannot_match(
    size: int, frames: list[int], trl_frames: str, message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit):
        harness.check_frames(argparse.ArgumentParser(), size, frames, trl_frames)
    assert message in capsys.readouterr().err
    harness.check_frames(
        argparse.ArgumentParser(), 112, [2, 4, 8, 6 if trl_frames == "all" else 16], trl_frames
    )


def test_the_worker_arguments_parse_with_their_defaults() -> None:
    p = harness.parser("Title.\n\nMore.")
    harness.add_worker_arguments(p, threads=1)

    a = p.parse_args([])

    assert (a.threads, a.omp_wait_policy, a.seed, a.trl_frames) == (1, "PASSIVE", 0, "matched")
    assert p.description == "Title."


def test_trls_configs_take_the_shared_cpu_arguments_and_our_lora(tmp_path: Path) -> None:
    for config in (GRPOConfig, DPOConfig):
        args = config(output_dir=str(tmp_path), **harness.TRL_CPU_ARGS)
        assert args.use_cpu and not args.bf16 and not args.gradient_checkpointing
    peft = harness.trl_lora(8)
    ours = LoRAConfig(r=8, alpha=16)
    assert (peft.r, peft.lora_alpha, peft.lora_dropout) == (ours.r, ours.alpha, ours.dropout)
    assert set(peft.target_modules) == set(ours.target_modules)


def test_scored_length_records_the_sequences_a_trainer_scores() -> None:
    class Model(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
            return input_ids

    model, scored = Model(), harness.ScoredLength()
    scored.attach(model)
    assert scored.last is None
    model(input_ids=torch.zeros(2, 7))  # generation: no labels, not scored
    model(input_ids=torch.zeros(2, 9), labels=torch.zeros(2, 9))

    assert scored.lengths == [9] and scored.last == 9


def test_prepare_builds_the_tiny_model_and_clips_once(tmp_path: Path) -> None:
    model_dir, data_dir = harness.prepare(tmp_path, max_frames=4, n_records=2, size=56, seed=0)
    stamp = (model_dir / "config.json").stat().st_mtime_ns

    again = harness.prepare(tmp_path, max_frames=4, n_records=2, size=56, seed=0)

    assert again == (model_dir, data_dir) and (model_dir / "config.json").stat().st_mtime_ns == stamp
    assert len(harness.train_records(data_dir, 5)) == 2
