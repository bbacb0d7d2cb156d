"""`veripo fit --config configs/demo_grpo.yaml` end to end: the real command in a subprocess, its TensorBoard
scalars and rollout panel, its trainable-only checkpoint, resuming from it, and its config errors; `veripo test`
on a loop stage's checkpoint (the policy a checkpoint belongs to); `veripo --help` and the command's errors.

The demo config builds the tiny model and the synthetic data under work/demo/ on first use, so each run happens
in a temporary directory holding a copy of `configs/`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import DEMO_FIT_TEST_ARGS, DEMO_LOOP_TEST_ARGS, DEMO_SFT_TEST_ARGS
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_veripo.backbone import VideoLLM
from lightning_veripo.cli import COMMANDS, VeripoCLI, main
from lightning_veripo.grpo import GRPOModule
from lightning_veripo.lora import LoRAConfig
from lightning_veripo.policy import POLICY_KEY, PolicyMismatchError, check_policy
from lightning_veripo.tiny import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
VERSION_DIR = Path("work/demo/grpo/tensorboard")
# Small enough for CI: steps of 2 prompts x 4 rollouts of 8 tokens, validation every 2 steps.
QUICK = ["--trainer.val_check_interval", "2", "--model.init_args.num_generations", "4",
         "--model.init_args.max_new_tokens", "8", "--trainer.enable_progress_bar", "false", *DEMO_FIT_TEST_ARGS]  # fmt: skip
SCALARS = [
    "train/loss", "train/reward", "train/reward_std",
    "train/rewards/accuracy", "train/rewards/accuracy_std", "train/rewards/format", "train/rewards/format_std",
    "train/accuracy", "train/advantage_std", "train/clip_ratio_low", "train/clip_ratio_high", "train/kl",
    "train/completion_length", "train/completion_length_min", "train/completion_length_max",
    "train/truncated_fraction", "train/groups_dropped", "train/gen_tokens_per_s",
    "train/time_generate_s", "train/time_score_s", "train/time_optimise_s",
    "val/accuracy", "val/reasoning_tokens", "val/format_rate", "val/inconsistency_rate",
]  # fmt: skip


def veripo(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the installed `veripo` command (the one beside this Python) and capture its output."""
    exe = Path(sys.executable).parent / "veripo"
    command = [str(exe)] if exe.exists() else [shutil.which("veripo") or "veripo"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _expect_success(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory in which `veripo fit --config configs/demo_grpo.yaml` ran 4 steps (version_0)."""
    cwd = tmp_path_factory.mktemp("demo_grpo")
    shutil.copytree(REPO / "configs", cwd / "configs")
    _expect_success(
        veripo("fit", "--config", "configs/demo_grpo.yaml", *QUICK, "--trainer.max_steps", "4", cwd=cwd)
    )
    return cwd


def _events(version: Path) -> EventAccumulator:
    events = EventAccumulator(str(version), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _checkpoint(version: Path) -> Path:
    checkpoints = sorted((version / "checkpoints").glob("*.ckpt"))
    assert len(checkpoints) == 1, checkpoints
    return checkpoints[0]


@pytest.mark.slow
def test_demo_fit_logs_every_training_and_validation_scalar(demo_run: Path) -> None:
    events = _events(demo_run / VERSION_DIR / "version_0")
    logged = set(events.Tags()["scalars"])
    assert not set(SCALARS) - logged, sorted(set(SCALARS) - logged)
    for tag in SCALARS:
        values = [e.value for e in events.Scalars(tag)]
        assert values and all(math.isfinite(v) for v in values), (tag, values)
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1, 2, 3]
    assert len(events.Scalars("val/accuracy")) == 2  # after steps 2 and 4


@pytest.mark.slow
def test_demo_fit_writes_a_rollout_text_panel(demo_run: Path) -> None:
    events = _events(demo_run / VERSION_DIR / "version_0")
    # torch's SummaryWriter.add_text files the panel under "<tag>/text_summary" (TensorBoard shows "<tag>").
    tags = [t for t in events.Tags()["tensors"] if t.partition("/text_summary")[0] == "train/rollouts"]
    assert tags, events.Tags()["tensors"]
    panel = events.Tensors(tags[0])[0]
    assert panel.step == 0  # log_rollouts_every_n_steps: 5 -> the first step's rollouts
    text = panel.tensor_proto.string_val[0].decode()
    assert text.startswith("| problem | reward | advantage | completion |")
    assert "train-colour-" in text


@pytest.mark.slow
def test_demo_checkpoint_holds_only_the_lora_weights(demo_run: Path) -> None:
    checkpoint = torch.load(
        _checkpoint(demo_run / VERSION_DIR / "version_0"), map_location="cpu", weights_only=False
    )
    assert checkpoint["global_step"] == 4
    # The same module as the demo config builds: its trainable parameters are exactly the adapter's.
    backbone = VideoLLM(str(demo_run / "work/demo/tiny-model"), lora=LoRAConfig(r=8, alpha=16)).load()
    trainable = {name for name, p in GRPOModule(backbone).named_parameters() if p.requires_grad}
    assert set(checkpoint["state_dict"]) == trainable
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)


@pytest.mark.slow
def test_demo_fit_resumes_from_its_checkpoint(demo_run: Path) -> None:
    ckpt = _checkpoint(demo_run / VERSION_DIR / "version_0")
    # Other tests on the same run (`veripo test`) may add version directories before this one runs, so the
    # resumed run's directory is the one it created, not a number assumed from the order the tests run in.
    before = set((demo_run / VERSION_DIR).iterdir())
    _expect_success(veripo("fit", "--config", "configs/demo_grpo.yaml", *QUICK, "--trainer.max_steps", "6",
                           "--ckpt_path", str(ckpt), cwd=demo_run))  # fmt: skip

    created = [v for v in set((demo_run / VERSION_DIR).iterdir()) - before if (v / "checkpoints").is_dir()]
    assert len(created) == 1, sorted(created)
    version = created[0]
    checkpoint = torch.load(_checkpoint(version), map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 6
    assert [e.step for e in _events(version).Scalars("train/loss")] == [4, 5]


def test_print_config_shows_every_grpo_knob(tmp_path: Path) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    result = veripo("fit", "--config", "configs/demo_grpo.yaml", "--print_config", cwd=tmp_path, timeout=120)
    _expect_success(result)
    assert "class_path: lightning_veripo.grpo.GRPOModule" in result.stdout
    for knob in (
        "num_generations: 8",
        "epsilon_high:",
        "loss_type: dapo",
        "dynamic_sampling: true",
        "temporal:",
    ):
        assert knob in result.stdout, knob
    assert not (tmp_path / "work").exists()  # printing the config builds nothing


@pytest.mark.parametrize(
    ("knob", "value", "named"),
    [("loss_type", "nope", "loss_type='nope'"), ("los_type", "dapo", "'los_type' is not accepted")],
    ids=["bad-value", "misspelled-key"],
)
def test_an_invalid_knob_fails_with_a_message_naming_it(
    tmp_path: Path, knob: str, value: str, named: str
) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    result = veripo("fit", "--config", "configs/demo_grpo.yaml", f"--model.init_args.{knob}", value,
                    cwd=tmp_path, timeout=120)  # fmt: skip
    assert result.returncode != 0
    assert named in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "work").exists()  # it stops before building anything


@pytest.mark.slow
def test_veripo_test_evaluates_a_trained_checkpoint_on_a_test_file(demo_run: Path) -> None:
    ckpt = _checkpoint(demo_run / VERSION_DIR / "version_0")
    result = veripo("test", "--config", "configs/demo_grpo.yaml", *QUICK, "--ckpt_path", str(ckpt),
                    "--data.init_args.test_path", "work/demo/data/val.json", cwd=demo_run)  # fmt: skip
    _expect_success(result)
    for metric in ("test/accuracy", "test/format_rate", "test/reasoning_tokens", "test/inconsistency_rate"):
        assert metric in result.stdout, result.stdout[-3000:]
    missing = veripo(
        "test", "--config", "configs/demo_grpo.yaml", *QUICK, "--ckpt_path", str(ckpt), cwd=demo_run
    )
    assert missing.returncode != 0 and "test_path" in missing.stderr  # no test file configured: said so


# --- which policy a checkpoint belongs to ------------------------------------------------------------------
# A checkpoint holds only the trainable weights (a stage's adapter); the loop's stages sit on the base model
# with the earlier stages' adapters merged in. `veripo test` on such a checkpoint with a stand-alone config
# used to evaluate another policy and report 0.0 everywhere, silently.


def _adapter(tiny_model_dir: Path, out: Path, seed: int) -> Path:
    backbone = VideoLLM(str(tiny_model_dir), lora=LoRAConfig(r=4, alpha=8)).load()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in backbone.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return backbone.save_pretrained(out)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return _adapter(tiny_model_dir, root / "a", 1), _adapter(tiny_model_dir, root / "b", 2)


def test_a_policy_is_its_base_and_its_merged_adapters_by_content_in_order(tiny_model_dir, adapters, tmp_path):
    a, b = adapters

    def policy(*merged: Path, base: Path = tiny_model_dir) -> dict:
        return VideoLLM(str(base), merge_adapters=[str(m) for m in merged]).policy_identity()

    check_policy(policy(a, b), policy(a, b))
    moved = shutil.copytree(a, tmp_path / "moved")  # the same adapter elsewhere is the same policy
    check_policy(policy(a, b), policy(moved, b))

    flag = "--model.init_args.backbone.init_args.merge_adapters="
    for built in (policy(), policy(a), policy(b, a), policy(a, b, b)):
        with pytest.raises(PolicyMismatchError) as refused:
            check_policy(policy(a, b), built)
        assert f"'{flag}{json.dumps([str(a.resolve()), str(b.resolve())])}'" in str(refused.value)
        assert "model_name_or_path" not in str(refused.value)

    other_base = make_tiny_model(tmp_path / "other", hidden_size=32)
    with pytest.raises(PolicyMismatchError, match=f"model_name_or_path={tiny_model_dir.resolve()}"):
        check_policy(policy(a), policy(a, base=other_base))


def test_a_checkpoint_records_its_policy_and_refuses_another_on_load(tiny_model_dir, adapters, tmp_path):
    a, _ = adapters

    def module(*merged: Path) -> GRPOModule:
        lora = LoRAConfig(r=4, alpha=8)
        return GRPOModule(VideoLLM(str(tiny_model_dir), lora=lora, merge_adapters=[str(m) for m in merged]))

    trained = module(a)
    trained.configure_model()
    checkpoint = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(checkpoint)
    assert checkpoint[POLICY_KEY] == trained.backbone.policy_identity()
    assert [m["resolved"] for m in checkpoint[POLICY_KEY]["merge_adapters"]] == [str(a.resolve())]

    module(shutil.copytree(a, tmp_path / "copy")).on_load_checkpoint(checkpoint)  # same policy: loads
    with pytest.raises(PolicyMismatchError, match="merge_adapters="):
        module().on_load_checkpoint(checkpoint)
    del checkpoint[POLICY_KEY]  # a checkpoint written before policies were recorded: loads, with a warning
    with pytest.warns(UserWarning, match="records no policy"):
        module().on_load_checkpoint(checkpoint)


LOOP = ["iterate", "--config", "configs/demo.yaml", "--iterations", "1", "--grpo_only", "true", *DEMO_LOOP_TEST_ARGS,
        "--sft.args", json.dumps(["--trainer.max_steps=100", "--trainer.enable_progress_bar=false", *DEMO_SFT_TEST_ARGS]),
        "--grpo.args", json.dumps(["--trainer.max_steps=2", "--trainer.limit_val_batches=0",
                                   "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false"])]  # fmt: skip


def _test_metrics(stdout: str) -> dict[str, float]:
    """The `test/...` rows of the metrics table `veripo test` prints."""
    return {k: float(v) for k, v in re.findall(r"(test/\S+)\s*│\s*([-+0-9.eE]+)\s*│", stdout)}


@pytest.mark.slow
def test_veripo_test_on_a_loop_stage_checkpoint_refuses_another_policy_or_reproduces_the_loop(tmp_path):
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    _expect_success(veripo(*LOOP, cwd=tmp_path, timeout=900))
    work = tmp_path / "work/demo/veripo"
    row = next(
        r
        for r in map(json.loads, (work / "metrics.jsonl").read_text().splitlines())
        if r["stage"] == "iter_1/grpo"
    )
    assert row["format_rate"] > 0  # a figure an unmerged policy (format rate 0) could not have given
    command = ["test", "--config", "configs/demo_grpo.yaml",
               "--ckpt_path", str(work / "iter_1/grpo/checkpoints/last.ckpt"),
               "--data.init_args.test_path", "work/demo/data/val.json",
               "--data.init_args.val_batch_size=16", *DEMO_FIT_TEST_ARGS[:2]]  # fmt: skip  # (the loop's eval_batch_size; its tiny model)

    refused = veripo(*command, cwd=tmp_path)  # the command: demo_grpo.yaml merges nothing
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert not _test_metrics(refused.stdout)  # no table of zeros
    fix = re.search(r"'(--model\.init_args\.backbone\.init_args\.merge_adapters=\[.*?\])'", refused.stderr)
    assert fix and json.loads(fix.group(1).partition("=")[2]) == [str((work / "sft/adapter").resolve())], (
        refused.stderr
    )

    matched = veripo(*command, fix.group(1), cwd=tmp_path)  # what the message says to add
    _expect_success(matched)
    metrics = _test_metrics(matched.stdout)
    expected = {f"test/{k}": v for k, v in row.items() if f"test/{k}" in metrics}
    assert {"test/accuracy", "test/format_rate", "test/inconsistency_rate"} <= expected.keys()
    assert metrics == pytest.approx(expected, abs=1e-6)


# --- the command itself ------------------------------------------------------------------------------------


def test_veripo_help_lists_every_command_with_one_line_each(tmp_path: Path) -> None:
    result = veripo("--help", cwd=tmp_path, timeout=120)
    _expect_success(result)
    listed = re.findall(r"^  (\S+)\s{2,}(\S.*)$", result.stdout, flags=re.MULTILINE)
    commands = [name for name, _ in listed if not name.startswith("veripo")]
    assert commands == [
        "fit",
        "validate",
        "test",
        "predict",
        "iterate",
        "evaluate",
        "make-tiny-model",
        "make-synthetic-data",
        "verify",
    ]
    assert "veripo COMMAND --help" in result.stdout


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_listed_command_has_its_own_help(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    usage = capsys.readouterr().out
    assert usage.startswith("usage: veripo") and command in usage.split("\n", 1)[0]


def test_a_typo_under_iterate_points_to_iterate_help(tmp_path: Path) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    result = veripo("iterate", "--config", "configs/demo.yaml", "--iteratons", "1", cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "--iteratons" in result.stderr
    assert "run: veripo iterate --help" in result.stderr and "run: veripo --help" not in result.stderr
    assert not (tmp_path / "work").exists()  # it stops before building anything


def test_an_unknown_or_missing_command_is_named_with_the_list_of_commands(
    capsys: pytest.CaptureFixture,
) -> None:
    assert main(["itrate"]) == 2
    assert "unknown command 'itrate' (did you mean 'iterate'?)" in capsys.readouterr().err
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "no command given" in err and "make-synthetic-data" in err


def test_an_error_in_a_loop_stage_arguments_points_to_fit_help(tmp_path: Path) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
        VeripoCLI(
            args=["--config", str(tmp_path / "configs/demo_grpo.yaml"), "--trainer.max_stepz=3"], run=False
        )
    assert "run: veripo fit --help" in err.getvalue() and "max_stepz" in err.getvalue()
