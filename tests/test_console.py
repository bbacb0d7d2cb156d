"""The console of `veripo iterate`: a header per stage, skipped stages and why, evaluation progress, the summary
and where the results are; none of the library noise that repeats at every stage. Run through the real command."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import RichProgressBar

from lightning_veripo.console import StepsRichProgressBar, fix_progress_bar, quiet

REPO = Path(__file__).resolve().parents[1]
WORK = "work/demo/veripo"
# The tiny model (whatever size the demo config picks), few steps, a small evaluation set, progress bars on (the
# SFT bar is where `Epoch 12/-2` showed), and DPO skipped for sure (too few questions with pairs), so the run
# shows a skipped stage with its reason.
FAST_YAML = "base_model: work/demo/tiny-model\ntiny_size: tiny\n"
FAST = [
    "--iterations", "1", "--eval_base", "true", "--evaluation.num_samples", "0", "--min_questions_with_pairs", "1000",
    "--sft.args", json.dumps(["--trainer.max_steps=12", "--data.init_args.synthetic.num_train=16",
                              "--data.init_args.synthetic.num_val=8"]),
    "--grpo.args", json.dumps(["--trainer.max_steps=2", "--trainer.limit_val_batches=0",
                               "--trainer.num_sanity_val_steps=0", "--data.init_args.synthetic.num_train=16",
                               "--data.init_args.synthetic.num_val=8"]),
]  # fmt: skip
NOISE = [
    "args parameter is intended to run from within Python",  # LightningCLI, with the whole argument list
    "litlogger",  # Lightning's tips
    "litmodels",
    "Using ModelCheckpoint with manual optimization",  # and its example:
    "self.saved_models[batch_idx]",
    "save_embedding_layers",  # peft, when the SFT adapter (which targets lm_head) is saved
    "but have no `validation_step`",  # by design in the SFT stage
    "module(s) in eval mode at the start of training",  # the frozen vision tower
    "You have overridden `transfer_batch_to_device`",  # the modules move their own batches
    "LeafSpec",  # deprecations inside Lightning and transformers
    "is_gradient_checkpointing",
    "batchs",  # plurals
    "epoches",
]


def _iterate(cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lightning_veripo.cli", "iterate", "--config", "configs/demo.yaml",
               "--config", "fast.yaml", *FAST]  # fmt: skip
    run = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def _lines(text: str) -> list[str]:
    """Output lines, a progress bar's carriage-return updates each on its own line."""
    return [line for line in re.split(r"[\r\n]+", text) if line.strip()]


@pytest.mark.slow
def test_iterate_prints_a_header_per_stage_progress_the_summary_and_where_the_results_are(
    tmp_path: Path,
) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    (tmp_path / "fast.yaml").write_text(FAST_YAML)
    run = _iterate(tmp_path)
    err, out = _lines(run.stderr), run.stdout

    def first(prefix: str) -> int:
        found = [i for i, line in enumerate(err) if line.startswith(prefix)]
        assert found, f"no line starting {prefix!r} in stderr:\n" + "\n".join(err[-80:])
        return found[0]

    # a header per fit (what runs, for how long), in order, each before the lines Lightning prints for it
    sft = first("== [1/3] sft: SFT fit of configs/demo_sft.yaml: 12 steps")
    assert err[sft + 1].strip() == "from:  work/demo/tiny-model"
    assert err[sft + 2].strip().startswith("data:  work/demo/data/train.json")
    assert err[sft + 3].strip() == f"into:  {WORK}/sft"
    assert sft < first("GPU available:")
    base = first("== base: the starting checkpoint")
    grpo = first("== [2/3] iter_1/grpo: GRPO fit of configs/demo_grpo.yaml: 2 steps")
    assert err[grpo + 1].strip() == "from:  work/demo/tiny-model + the adapters of sft"
    assert err[grpo + 2].strip().endswith("x 8 rollouts")
    verifier = first("== iter_1/verifier: judged 32 rollouts of 4 questions:")
    dpo = first("== [3/3] iter_1/dpo skipped: the verifier's pairs cover")
    assert err[dpo].endswith("fewer than min_questions_with_pairs=1000")
    assert sft < base < grpo < verifier < dpo
    # evaluation after every stage, with a progress bar and a one-line result
    assert sum(line.strip() == "evaluating on work/demo/data/val.json (greedy)" for line in err) == 3
    assert any(re.match(r"evaluate: 100%\|.*\| 8/8 ", line) for line in err)
    for stage in ("base", "sft", "iter_1/grpo"):
        assert any(line.strip().startswith(f"{stage}: accuracy ") for line in err), stage
    # the summary table and where everything is, on stdout
    assert "evaluation on work/demo/data/val.json after each stage:" in out
    header = next(line for line in out.splitlines() if line.startswith("stage"))
    for column in ("accuracy", "sampled acc", "format", "think tokens", "inconsistent", "acc-cons", "wall s"):
        assert column in header
    for stage in ("base", "sft", "iter_1/grpo"):
        assert re.search(rf"^{re.escape(stage)}\s+\|", out, flags=re.MULTILINE), stage
    assert "(always answering the most common answer scores " in out
    assert f"results in {WORK}:" in out
    assert f"{WORK}/metrics.jsonl" in out and f"{WORK}/state.json" in out
    assert out.rstrip().endswith(f"TensorBoard: tensorboard --logdir {WORK}/tensorboard")
    # the SFT bar (bounded by max_steps only) reads "Epoch N", not "Epoch N/-2"
    assert re.search(r"Epoch \d+ ", out) and not re.search(r"Epoch \d+/-", out)
    # no noise
    for noise in NOISE:
        assert noise not in run.stderr and noise not in run.stdout, noise

    # the same command again: every stage says it was done before, and why DPO was skipped; nothing runs
    again = _iterate(tmp_path)
    err = _lines(again.stderr)
    state = f"({WORK}/state.json)"
    assert f"== base: finished in an earlier run {state}" in err
    assert f"== [1/3] sft: finished in an earlier run {state}" in err
    assert f"== [2/3] iter_1/grpo: finished in an earlier run {state}" in err
    assert any(line.startswith(f"== [3/3] iter_1/dpo: skipped in an earlier run {state}: the verifier's pairs")
               for line in err)  # fmt: skip
    assert not any("GPU available" in line or line.startswith("evaluate:") for line in err)
    assert "(always answering the most common answer scores " in again.stdout


def test_quiet_drops_the_listed_noise_and_keeps_every_other_warning() -> None:
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    handler = Keep()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            with quiet():
                for message in (
                    "LightningCLI's args parameter is intended to run from within Python like ...",
                    "Using ModelCheckpoint with manual optimization and every_n_train_steps, ...",
                    "Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.",
                    "The number of training batches (8) is smaller than the logging interval",
                ):
                    warnings.warn(message, stacklevel=1)
                logger.warning("💡 Tip: For seamless cloud logging ... try installing [litlogger](...)")
                logger.warning("💡 Tip: For seamless cloud uploads ... try installing [litmodels](...)")
                logger.warning("GPU available: False, used: False")
            message = "LightningCLI's args parameter is intended to run from within Python (outside quiet)"
            warnings.warn(message, stacklevel=1)
    finally:
        logger.removeHandler(handler)
    assert [str(w.message) for w in shown] == [
        "The number of training batches (8) is smaller than the logging interval",
        "LightningCLI's args parameter is intended to run from within Python (outside quiet)",
    ]
    assert records == ["GPU available: False, used: False"]


def test_the_progress_bar_of_a_fit_bounded_by_steps_does_not_read_epoch_minus_two() -> None:
    bar = StepsRichProgressBar()
    # padded to the length of "Validation", as Lightning does
    for max_epochs, expected in ((-1, "Epoch 12  "), (None, "Epoch 12  "), (20, "Epoch 12/19")):
        bar._trainer = SimpleNamespace(max_epochs=max_epochs)
        assert bar._get_train_description(12) == expected
    # the default rich bar of a trainer becomes this one, its settings kept; a subclass is left alone
    trainer = Trainer(
        max_steps=5, logger=False, enable_checkpointing=False, callbacks=[RichProgressBar(leave=True)]
    )
    fix_progress_bar(trainer)
    bars = [c for c in trainer.callbacks if isinstance(c, RichProgressBar)]
    assert len(bars) == 1 and type(bars[0]) is StepsRichProgressBar and bars[0]._leave

    class Mine(RichProgressBar):
        pass

    trainer = Trainer(max_steps=5, logger=False, enable_checkpointing=False, callbacks=[Mine()])
    fix_progress_bar(trainer)
    assert [type(c) for c in trainer.callbacks if isinstance(c, RichProgressBar)] == [Mine]


def test_plural() -> None:
    from lightning_veripo.console import plural

    assert [plural(1, "epoch", "epochs"), plural(2, "epoch", "epochs"), plural(2, "batch"), plural(3, "step")] == [
        "1 epoch", "2 epochs", "2 batches", "3 steps"]  # fmt: skip


def test_the_verifier_line_says_how_many_rollouts_a_failing_judge_lost(tmp_path, capsys):
    from lightning_veripo.loop import _say_verifier

    stats = {"num_rollouts": 16, "num_questions": 2, "pairs": 3, "questions_with_pairs": 1, "judge_errors": 0}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    _say_verifier("iter_1/verifier", tmp_path)
    quiet_run = capsys.readouterr().err
    assert "judged 16 rollouts of 2 questions: 3 preference pairs over 1 question" in quiet_run
    assert "judge failed" not in quiet_run

    (tmp_path / "stats.json").write_text(json.dumps({**stats, "judge_errors": 10}))
    _say_verifier("iter_1/verifier", tmp_path)
    lost = capsys.readouterr().err
    assert (
        f"10 rollouts unjudged because the judge failed (the error is in {tmp_path / 'verdicts.jsonl'})"
        in lost
    )
