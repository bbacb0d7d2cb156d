"""The verifier as a plain function (files, schemas, idempotence) and as a callback in a real Lightning fit
(TensorBoard scalars and text, resume without losing rollouts)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from lightning_veripo.callbacks.verifier import VerifierCallback, checkpoint_rollouts, verify_checkpoint
from lightning_veripo.cli import main
from lightning_veripo.records import Rollout, VideoQARecord
from lightning_veripo.verifier import (
    PairConfig,
    RuleJudge,
    read_pairs,
    read_rollouts,
    read_verdicts,
    run_verifier,
    run_verifier_from_files,
)

OPTIONS = ("A. red", "B. green", "C. blue", "D. yellow")
GROUP = [  # (reasoning, answer, accuracy): one question's rollouts as the rule judge will see them
    ("The square is green in every frame, so the answer is B.", "B", 1.0),
    ("Wait, the first frame is dark; looking again the square is green, so the answer is B.", "B", 1.0),
    ("The square looks blue in the first frame, so the answer is C.", "C", 0.0),
    ("The square looks blue in the first frame, so the answer is C.", "B", 1.0),  # right, but inconsistent
]


def group_rollouts(problem_id: str, step: int) -> list[Rollout]:
    record = VideoQARecord(
        problem_id,
        "What colour is the square?",
        "video",
        "multiple choice",
        "<answer>B</answer>",
        f"{problem_id}.mp4",
        OPTIONS,
    )
    return [
        Rollout(
            record=record,
            completion=f"<think>{think}</think><answer>{answer}</answer>",
            completion_ids=[],
            rewards={"accuracy": acc, "format": 0.5},
            reward=acc + 0.5,
            advantage=0.0,
            group_mean_accuracy=0.75,
            truncated=False,
            step=step,
            sample_index=i,
            prompt=f"prompt {problem_id}",
            sampling={"temperature": 1.0},
        )
        for i, (think, answer, acc) in enumerate(GROUP)
    ]


def solved_rollouts(problem_id: str) -> list[Rollout]:
    return [r for r in group_rollouts(problem_id, 0) if r.accuracy == 1.0][:2]


def without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


# --- run_verifier ------------------------------------------------------------------------------------------


def test_run_verifier_writes_the_four_files_with_their_schemas(tmp_path):
    rollouts = group_rollouts("q1", 0) + solved_rollouts("easy")
    stats = run_verifier(rollouts, RuleJudge(), PairConfig(), tmp_path, progress=False)

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "pairs.jsonl",
        "rollouts.jsonl",
        "stats.json",
        "verdicts.jsonl",
    ]
    assert [(r.record.problem_id, r.sample_index) for r in read_rollouts(tmp_path / "rollouts.jsonl")] == [
        ("easy", 0), ("easy", 1), ("q1", 0), ("q1", 1), ("q1", 2), ("q1", 3)
    ]  # fmt: skip
    verdicts = read_verdicts(tmp_path / "verdicts.jsonl")
    assert set(verdicts[0]) == {
        "problem_id", "step", "sample_index", "consistent", "repetitive", "truncated", "missing_tags",
        "repeated_fraction", "rationale", "raw", "judge", "latency_s", "probability", "addresses_judge",
    }  # fmt: skip
    assert [v["consistent"] for v in verdicts] == [True, True, True, True, True, False]
    pairs = read_pairs(tmp_path / "pairs.jsonl")
    assert [(p.chosen_sample_index, p.rejected_sample_index, p.reason) for p in pairs] == [
        (1, 3, "consistency:inconsistent_correct"),
        (1, 2, "reflection"),
    ]
    assert json.loads((tmp_path / "stats.json").read_text()) == stats
    assert without(stats, "judge_time_s", "wall_time_s") == {
        "num_rollouts": 6,
        "num_questions": 2,
        "judged": 6,
        "unjudged": 0,
        "judge_errors": 0,
        "addresses_judge": 0,
        "consistent_rate": 5 / 6,
        "inconsistent_rate": 1 / 6,
        "decided_by": {"rule": 1.0},
        "repetitive_rate": 0.0,
        "truncated_rate": 0.0,
        "accuracy": 5 / 6,
        "acc_cons_rate": 4 / 6,
        "pairs": 2,
        "pairs_by_reason": {
            "penalty:addresses_judge": 0,
            "consistency:inconsistent_correct": 1,
            "reflection": 1,
            "consistency:wrong_answer": 0,
            "penalty:repetitive": 0,
            "penalty:truncated": 0,
            "penalty:degenerate": 0,
        },
        "questions_with_pairs": 1,
        "questions_skipped": {"all_wrong": 0, "no_chosen": 0, "no_rejected": 1},
        "skipped_problem_ids": {"all_wrong": [], "no_chosen": [], "no_rejected": ["easy"]},
        "always_solved": ["easy"],
        "judge": "rule",
    }


def test_rerunning_the_verifier_gives_the_same_files_apart_from_timings(tmp_path):
    rollouts = group_rollouts("q1", 0) + group_rollouts("q2", 1) + solved_rollouts("easy")
    first, second = tmp_path / "first", tmp_path / "second"
    run_verifier(rollouts, RuleJudge(), PairConfig(seed=3), first, progress=False)
    run_verifier(list(reversed(rollouts)), RuleJudge(), PairConfig(seed=3), second, progress=False)
    for name in ("rollouts.jsonl", "pairs.jsonl"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    untimed = [
        [without(v, "latency_s") for v in read_verdicts(d / "verdicts.jsonl")] for d in (first, second)
    ]
    assert untimed[0] == untimed[1]
    stats = [
        without(json.loads((d / "stats.json").read_text()), "judge_time_s", "wall_time_s")
        for d in (first, second)
    ]
    assert stats[0] == stats[1]


def test_verifier_runs_again_from_its_own_rollouts_file_and_from_the_command_line(tmp_path):
    run_verifier(group_rollouts("q1", 0), None, None, tmp_path / "fit", progress=False)
    pairs_before = (tmp_path / "fit" / "pairs.jsonl").read_bytes()
    stats = run_verifier_from_files(tmp_path / "fit" / "rollouts.jsonl", tmp_path / "fit", progress=False)
    assert stats["num_rollouts"] == 4 and (tmp_path / "fit" / "pairs.jsonl").read_bytes() == pairs_before
    assert (
        main(["verify", str(tmp_path / "fit" / "rollouts.jsonl"), str(tmp_path / "cli"), "--progress=false"])
        == 0
    )
    assert (tmp_path / "cli" / "pairs.jsonl").read_bytes() == pairs_before
    assert not [p for p in (tmp_path / "cli").iterdir() if p.name.startswith(".")], (
        "no temp files left behind"
    )


def test_reading_a_damaged_rollouts_file_names_the_line(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    path.write_text(json.dumps(group_rollouts("q1", 0)[0].to_dict()) + "\n{cut short\n")
    with pytest.raises(ValueError, match=r"rollouts.jsonl:2"):
        read_rollouts(path)


# --- the callback in a real fit ----------------------------------------------------------------------------


class RolloutModule(pl.LightningModule):
    """Stands in for GRPOModule: each step returns a loss and one question's rollouts."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> dict:
        loss = self.layer(batch).pow(2).mean()
        return {"loss": loss, "rollouts": group_rollouts(f"q{self.global_step % 2}", self.global_step)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.randn(16, 2), batch_size=2)


def trainer(root: Path, max_steps: int, **kw) -> pl.Trainer:
    options = dict(
        default_root_dir=root,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    return pl.Trainer(**(options | kw))


def test_callback_judges_the_fit_rollouts_and_logs_to_tensorboard(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="grpo")
    callback = VerifierCallback(progress=False)
    trainer(tmp_path, 3, logger=logger, callbacks=[callback]).fit(RolloutModule())

    out = Path(logger.log_dir) / "verifier"
    assert callback.resolved_out_dir == out
    assert {p.name for p in out.iterdir()} == {
        "rollouts.jsonl",
        "verdicts.jsonl",
        "pairs.jsonl",
        "stats.json",
    }
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["num_rollouts"], stats["num_questions"], stats["pairs"]) == (
        12,
        2,
        6,
    )  # q0 (steps 0, 2): 4 pairs, q1: 2

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {
        "verifier/inconsistent_rate",
        "verifier/pairs",
        "verifier/pairs/reflection",
        "verifier/skipped/all_wrong",
        "verifier/judge_errors",
    }
    assert expected <= scalars
    assert events.Scalars("verifier/judge_errors")[-1].value == 0.0  # the rule judge never fails
    assert events.Scalars("verifier/inconsistent_rate")[-1].value == pytest.approx(0.25)
    assert events.Scalars("verifier/pairs")[-1].step == 3
    assert "verifier/pairs/text_summary" in events.Tags()["tensors"]
    text = events.Tensors("verifier/pairs/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "consistency:inconsistent_correct" in text and "**Chosen**" in text


def test_resumed_fit_keeps_the_rollouts_from_before_the_interruption(tmp_path):
    ckpts = tmp_path / "ckpt"
    every_step = dict(dirpath=ckpts, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    first = trainer(
        tmp_path,
        2,
        enable_checkpointing=True,
        callbacks=[VerifierCallback(progress=False), ModelCheckpoint(**every_step)],
    )
    first.fit(RolloutModule())

    resumed = VerifierCallback(progress=False)  # a fresh process would build a fresh callback
    second = trainer(
        tmp_path, 3, enable_checkpointing=True, callbacks=[resumed, ModelCheckpoint(**every_step)]
    )
    second.fit(RolloutModule(), ckpt_path=ckpts / "step=2.ckpt")
    assert resumed.resolved_out_dir == tmp_path / "verifier"
    rollouts = read_rollouts(tmp_path / "verifier" / "rollouts.jsonl")
    assert sorted({r.step for r in rollouts}) == [0, 1, 2] and len(rollouts) == 12

    # Resuming a finished fit trains nothing: on_train_end is skipped and the files stay as they are.
    stats_before = (tmp_path / "verifier" / "stats.json").read_bytes()
    done = VerifierCallback(progress=False)
    trainer(tmp_path, 3, callbacks=[done]).fit(RolloutModule(), ckpt_path=ckpts / "step=3.ckpt")
    assert done.stats is None and (tmp_path / "verifier" / "stats.json").read_bytes() == stats_before


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after the hook that raises it runs (not even `except Exception`)."""


class KillAtTrainEnd(pl.Callback):
    """Listed before the VerifierCallback: the process dies after the last checkpoint, before the verifier."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        raise Killed


def untimed_files(out: Path) -> dict[str, object]:
    """The verifier's files without their timing fields (everything else must match byte for byte)."""
    return {
        "rollouts.jsonl": (out / "rollouts.jsonl").read_bytes(),
        "pairs.jsonl": (out / "pairs.jsonl").read_bytes(),
        "verdicts.jsonl": [without(v, "latency_s") for v in read_verdicts(out / "verdicts.jsonl")],
        "stats.json": without(json.loads((out / "stats.json").read_text()), "judge_time_s", "wall_time_s"),
    }


def checkpointed_fit(root: Path, max_steps: int, callbacks: list, ckpt_path: Path | None = None) -> None:
    every_step = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True)
    fit = trainer(root, max_steps, enable_checkpointing=True, callbacks=[*callbacks, every_step])
    fit.fit(RolloutModule(), ckpt_path=ckpt_path)


@pytest.mark.parametrize("written", ["nothing", "all but stats.json"])
def test_a_kill_before_the_verifier_finished_is_repaired_by_resuming_the_finished_fit(tmp_path, written):
    uninterrupted = tmp_path / "uninterrupted"
    checkpointed_fit(uninterrupted, 3, [VerifierCallback(progress=False)])
    expected = untimed_files(uninterrupted / "verifier")

    killed = tmp_path / "killed"
    with pytest.raises(Killed):
        checkpointed_fit(killed, 3, [KillAtTrainEnd(), VerifierCallback(progress=False)])
    assert not (killed / "verifier").exists()
    if written == "all but stats.json":  # killed inside run_verifier, which writes stats.json last
        run_verifier(
            read_rollouts(uninterrupted / "verifier" / "rollouts.jsonl"), None, None, killed / "verifier"
        )
        (killed / "verifier" / "stats.json").unlink()

    # The same command again: the fit resumes at its last step, trains nothing, and the verifier runs.
    resumed = VerifierCallback(progress=False)
    checkpointed_fit(killed, 3, [resumed], ckpt_path=killed / "ckpt" / "last.ckpt")
    assert resumed.stats is not None and resumed.stats["num_rollouts"] == 12
    assert untimed_files(killed / "verifier") == expected

    # Once the files are complete, resuming again leaves them alone.
    stats_before = (killed / "verifier" / "stats.json").read_bytes()
    again = VerifierCallback(progress=False)
    checkpointed_fit(killed, 3, [again], ckpt_path=killed / "ckpt" / "last.ckpt")
    assert again.stats is None and (killed / "verifier" / "stats.json").read_bytes() == stats_before


def test_verify_checkpoint_rebuilds_the_files_from_a_checkpoint_alone(tmp_path):
    checkpointed_fit(tmp_path, 3, [VerifierCallback(progress=False)])
    assert [r.step for r in checkpoint_rollouts(tmp_path / "ckpt" / "last.ckpt")] == [0] * 4 + [1] * 4 + [
        2
    ] * 4
    stats = verify_checkpoint(tmp_path / "ckpt" / "last.ckpt", tmp_path / "again", progress=False)
    assert stats["num_rollouts"] == 12
    assert untimed_files(tmp_path / "again") == untimed_files(tmp_path / "verifier")
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        verify_checkpoint(tmp_path / "missing.ckpt", tmp_path / "again")
    without_callback = tmp_path / "plain"
    checkpointed_fit(without_callback, 1, [])
    with pytest.raises(ValueError, match="holds 0 VerifierCallback states"):
        checkpoint_rollouts(without_callback / "ckpt" / "last.ckpt")


def test_callback_out_dir_can_be_set_and_missing_rollouts_are_warned_about(tmp_path):
    class NoRollouts(RolloutModule):
        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.layer(batch).pow(2).mean()

    callback = VerifierCallback(out_dir=str(tmp_path / "here"), progress=False)
    with pytest.warns(UserWarning, match="returned no 'rollouts'"):
        trainer(tmp_path, 2, callbacks=[callback]).fit(NoRollouts())
    assert json.loads((tmp_path / "here" / "stats.json").read_text())["num_rollouts"] == 0


DDP_SCRIPT = """
import os
import sys
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from lightning_veripo.callbacks.verifier import VerifierCallback
from lightning_veripo.records import Rollout, VideoQARecord

class RankRollouts(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        record = VideoQARecord(f"rank{self.global_rank}", "Which?", "video", "multiple choice", "<answer>B</answer>")
        rollouts = [
            Rollout(record, f"<think>so the answer is {a}</think><answer>{a}</answer>", [],
                    {"accuracy": float(a == "B")}, 0.0, 0.0, 0.5, False, self.global_step, i)
            for i, a in enumerate("BC")
        ]
        return {"loss": self.layer(batch).pow(2).mean(), "rollouts": rollouts}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(torch.randn(16, 2), batch_size=2)

def fit(max_steps, ckpt_path=None):
    every_step = ModelCheckpoint(dirpath=f"{root}/ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = pl.Trainer(
        default_root_dir=root, max_steps=max_steps, accelerator="cpu", devices=2, strategy="ddp", logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[VerifierCallback(progress=False), every_step],
    )
    trainer.fit(RankRollouts(), ckpt_path=ckpt_path)

root = sys.argv[1]
fit(1)
fit(2, f"{root}/ckpt/step=1.ckpt")  # rank 1's step-0 rollouts live only in the checkpoint now
if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # as if killed after the last checkpoint, before the verifier
    os.rename(f"{root}/verifier", f"{root}/verifier_uninterrupted")
fit(2, f"{root}/ckpt/step=2.ckpt")  # finished: trains nothing, judges the restored rollouts of both ranks
if torch.distributed.is_initialized():  # shut gloo's threads down before the interpreter exits (once, in CI,
    torch.distributed.destroy_process_group()  # both ranks aborted at exit with "terminate called ..." without it)
"""


@pytest.mark.slow
def test_under_ddp_every_rank_rollouts_reach_the_verifier_and_survive_a_resume(tmp_path):
    # A fit, a resumed fit, and a resume of the finished fit after its verifier files were lost, in a script:
    # Lightning's DDP launcher re-runs it as rank 1 (gloo on CPU).
    script = tmp_path / "fit_ddp.py"
    script.write_text(DDP_SCRIPT)

    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rollouts = read_rollouts(tmp_path / "verifier" / "rollouts.jsonl")
    assert sorted({(r.record.problem_id, r.step) for r in rollouts}) == [
        ("rank0", 0), ("rank0", 1), ("rank1", 0), ("rank1", 1)
    ]  # fmt: skip
    assert len(rollouts) == 8
    assert untimed_files(tmp_path / "verifier") == untimed_files(tmp_path / "verifier_uninterrupted")


def test_a_rollouts_dict_is_an_independent_copy_of_every_field() -> None:
    import dataclasses

    rollout = group_rollouts("q0", 3)[0]
    rollout.completion_ids = [5, 6, 7]
    rollout.sampling = {"temperature": 1.0, "frames": [0, 4, 8]}
    d = rollout.to_dict()
    assert d == dataclasses.asdict(rollout) | {"record": rollout.record.to_dict()}
    assert Rollout.from_dict(json.loads(json.dumps(d))) == dataclasses.replace(
        rollout, sampling={"temperature": 1.0, "frames": [0, 4, 8]}
    )
    d["completion_ids"].append(8)
    d["rewards"]["accuracy"] = -1.0
    d["sampling"]["frames"].append(12)
    assert rollout.completion_ids == [5, 6, 7] and rollout.rewards["accuracy"] == 1.0
    assert rollout.sampling["frames"] == [0, 4, 8]


def test_saving_a_checkpoint_does_not_encode_the_fits_rollouts_again(tmp_path, monkeypatch):
    """A checkpoint is saved after every step: each rollout is encoded once, when it arrives, not at every save
    (which made the checkpoints of a 64-step fit cost as much CPU as its training)."""
    calls = []
    original = Rollout.to_dict
    monkeypatch.setattr(Rollout, "to_dict", lambda self: calls.append(self.step) or original(self))
    checkpointed_fit(tmp_path, 3, [VerifierCallback(progress=False)])
    encoded_for_checkpoints = len(calls) - 12  # the verifier's rollouts.jsonl writes each rollout once too
    assert encoded_for_checkpoints == 12  # 3 steps x 4 rollouts, each once, though 6 checkpoints were saved
    assert [r.step for r in checkpoint_rollouts(tmp_path / "ckpt" / "last.ckpt")] == [0] * 4 + [1] * 4 + [
        2
    ] * 4


@pytest.mark.parametrize("form", ["rollouts_jsonl", "rollouts"])
def test_a_checkpoint_that_holds_the_rollouts_themselves_still_resumes(tmp_path, form):
    """Checkpoints of earlier versions hold the rollouts in the state (JSON lines, before that a list of
    dicts) and no spool: they load, resume, and the resumed fit judges them all."""
    checkpointed_fit(tmp_path, 2, [VerifierCallback(progress=False)])
    path = tmp_path / "ckpt" / "last.ckpt"
    spool = tmp_path / "rollouts" / "rank0.jsonl"
    lines = spool.read_text().splitlines(keepends=True)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("VerifierCallback")]
    old = "".join(lines) if form == "rollouts_jsonl" else [json.loads(line) for line in lines]
    checkpoint["callbacks"][key] = {form: old}
    torch.save(checkpoint, path)
    spool.unlink()
    assert [r.step for r in checkpoint_rollouts(path)] == [0] * 4 + [1] * 4
    resumed = VerifierCallback(progress=False)
    checkpointed_fit(tmp_path, 3, [resumed], ckpt_path=path)
    assert resumed.stats is not None and resumed.stats["num_rollouts"] == 12
    assert [r.step for r in checkpoint_rollouts(path)] == [0] * 4 + [1] * 4 + [2] * 4  # saved in the new form
    assert "spool" in torch.load(path, weights_only=True)["callbacks"][key]


def test_a_checkpoint_holds_where_the_spool_stood_and_a_resume_cuts_what_came_after(tmp_path):
    """A run killed after its step-2 checkpoint and during step 3 left step 3's rollouts in the spool: the
    resume from step 2 cuts them off and makes them again, so the spool holds each rollout once."""
    checkpointed_fit(tmp_path, 2, [VerifierCallback(progress=False)])
    step_2 = tmp_path / "step2.ckpt"
    shutil.copy(tmp_path / "ckpt" / "last.ckpt", step_2)
    checkpointed_fit(tmp_path, 3, [VerifierCallback(progress=False)], ckpt_path=step_2)
    spool = tmp_path / "rollouts" / "rank0.jsonl"
    three_steps = spool.read_bytes()
    assert len(three_steps.splitlines()) == 12

    state = torch.load(step_2, weights_only=True)["callbacks"]
    callback_state = next(v for k, v in state.items() if k.startswith("VerifierCallback"))
    (mark,) = callback_state["spool"]["ranks"]
    assert mark == {"count": 8, "bytes": len(b"".join(three_steps.splitlines(keepends=True)[:8]))}
    assert len(repr(callback_state)) < 300  # where the spool stood, not the rollouts

    (tmp_path / "verifier" / "stats.json").unlink()
    resumed = VerifierCallback(progress=False)
    checkpointed_fit(tmp_path, 3, [resumed], ckpt_path=step_2)
    assert spool.read_bytes() == three_steps  # step 3 once, not twice
    assert resumed.stats is not None and resumed.stats["num_rollouts"] == 12
