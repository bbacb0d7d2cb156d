"""VerifierCallback: record a GRPO fit's rollouts and run the Rollout-Aware Verifier when training ends.

Contract with the GRPO module: `training_step` returns `{"loss": tensor, "rollouts": list[Rollout]}`. The
callback keeps the rollouts (also in checkpoints, so a resumed fit loses none), and in `on_train_end` —
while the model is still on its device, before `strategy.teardown()` — gathers them from every rank, lets
rank zero run `run_verifier` (judge, pairs, atomic files), and logs the stats as `verifier/*` scalars plus a
few pairs as a Markdown text panel in TensorBoard. Every rank reaches every collective: none sits in a
rank-zero branch.

A fit resumed from a checkpoint of its last step trains nothing and Lightning skips `on_train_end`; if the
process that wrote that checkpoint was killed before the verifier finished (no `stats.json` in `out_dir`),
`on_fit_end` runs the verifier on the rollouts the checkpoint restored, so the files are the same as an
uninterrupted fit's. `verify_checkpoint` does the same from a checkpoint file, without a fit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_veripo.loggers import logged_step
from lightning_veripo.records import Rollout
from lightning_veripo.verifier.judges import RuleJudge
from lightning_veripo.verifier.pairs import REASONS, PairConfig, PreferencePair
from lightning_veripo.verifier.protocol import Judge
from lightning_veripo.verifier.run import PAIRS_FILE, STATS_FILE, read_pairs, run_verifier

SCALAR_STATS = (
    "num_rollouts",
    "num_questions",
    "judged",
    "unjudged",
    "judge_errors",
    "consistent_rate",
    "inconsistent_rate",
    "repetitive_rate",
    "truncated_rate",
    "accuracy",
    "acc_cons_rate",
    "pairs",
    "questions_with_pairs",
    "wall_time_s",
)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_rollouts(local: list[Rollout]) -> list[Rollout]:
    """Every rank's rollouts, on every rank (a collective: all ranks must call it)."""
    if not _distributed():
        return list(local)
    shards: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shards, [r.to_dict() for r in local])
    return [Rollout.from_dict(d) for shard in shards for d in shard]


class VerifierCallback(pl.Callback):
    """Judge the fit's rollouts and write VerIPO preference pairs at the end of training.

    Args:
        judge: the consistency judge; None means `RuleJudge()` (offline, deterministic).
        pair_config: pair-building thresholds; None means `PairConfig()`.
        out_dir: where rollouts.jsonl, verdicts.jsonl, pairs.jsonl and stats.json go; None means
            `<trainer.log_dir or default_root_dir>/verifier`.
        log_pairs_to_tensorboard: how many pairs to show in the TensorBoard text panel (0 for none).
        judge_batch_size: rollouts per judge call (and progress-bar step).
        progress: show a progress bar while judging.
    """

    def __init__(
        self,
        judge: Judge | None = None,
        pair_config: PairConfig | None = None,
        out_dir: str | None = None,
        log_pairs_to_tensorboard: int = 4,
        judge_batch_size: int = 64,
        progress: bool = True,
    ) -> None:
        self.judge = judge if judge is not None else RuleJudge()
        self.pair_config = pair_config if pair_config is not None else PairConfig()
        self.out_dir = out_dir
        self.log_pairs_to_tensorboard = log_pairs_to_tensorboard
        self.judge_batch_size = judge_batch_size
        self.progress = progress
        self.rollouts: list[Rollout] = []
        self._rollout_lines: list[str] = []  # self.rollouts as JSON lines, the form checkpoints hold
        self.stats: dict[str, Any] | None = None
        self.resolved_out_dir: Path | None = None
        self._trained = False
        self._restored = False
        self._warned_no_rollouts = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # a callback reused for another fit starts empty; a resume restores after this
            self.rollouts, self.stats, self._trained, self._restored = [], None, False, False
            self._rollout_lines = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trained = True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        rollouts = outputs.get("rollouts") if isinstance(outputs, Mapping) else None
        if rollouts is None:
            if not self._warned_no_rollouts:
                rank_zero_warn(
                    f"VerifierCallback: {type(pl_module).__name__}.training_step returned no 'rollouts'; the "
                    "verifier needs `return {'loss': loss, 'rollouts': rollouts}` (a list of Rollout)."
                )
                self._warned_no_rollouts = True
            return
        added = [r if isinstance(r, Rollout) else Rollout.from_dict(r) for r in rollouts]
        self.rollouts.extend(added)
        # encoded once here: a checkpoint is saved after every step, and converting the whole fit's rollouts
        # at each save made a 64-step fit's checkpoints cost as much CPU as its training
        self._rollout_lines.extend(map(_rollout_line, added))

    def _out_dir(self, trainer: pl.Trainer) -> Path:
        # trainer.log_dir is a collective: every rank runs it.
        out_dir = (
            Path(self.out_dir)
            if self.out_dir
            else Path(trainer.log_dir or trainer.default_root_dir) / "verifier"
        )
        self.resolved_out_dir = out_dir
        return out_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._verify(trainer)

    def _verify(self, trainer: pl.Trainer) -> None:
        out_dir = self._out_dir(trainer)
        # The gather is a collective: every rank runs it.
        rollouts = _all_rollouts(self.rollouts)
        error: BaseException | None = None
        if trainer.is_global_zero:
            if not rollouts:
                rank_zero_warn("VerifierCallback: no rollouts were collected; writing empty verifier files.")
            try:
                self.stats = run_verifier(
                    rollouts,
                    self.judge,
                    self.pair_config,
                    out_dir,
                    judge_batch_size=self.judge_batch_size,
                    progress=self.progress,
                )
                self._log(trainer, self.stats, out_dir)
            except Exception as err:  # re-raised below, after the other ranks have been told
                error = err
        # The broadcast doubles as the barrier after rank zero's writes, and lets every rank fail together
        # instead of waiting forever for a rank zero that raised.
        failure = trainer.strategy.broadcast(
            None if error is None else f"{type(error).__name__}: {error}", src=0
        )
        if error is not None:
            raise error
        if failure is not None:
            raise RuntimeError(f"VerifierCallback failed on rank 0: {failure}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._trained:
            if self._restored:
                self._finish_restored_fit(trainer)
            return
        if not trainer.is_global_zero or self.resolved_out_dir is None:
            return
        stats_path = self.resolved_out_dir / STATS_FILE
        if not stats_path.is_file():
            raise RuntimeError(
                f"VerifierCallback: training ran but {stats_path} is missing, so the verifier did not finish. "
                f"Re-run it on the saved rollouts with lightning_veripo.verifier.run_verifier_from_files."
            )

    def _finish_restored_fit(self, trainer: pl.Trainer) -> None:
        """A fit resumed from its last step trained nothing here: run the verifier on the restored rollouts
        unless a finished run of it (its `stats.json`) is already in `out_dir`. Every rank takes part."""
        out_dir = self._out_dir(trainer)
        finished = (out_dir / STATS_FILE).is_file() if trainer.is_global_zero else None
        if trainer.strategy.broadcast(finished, src=0):
            return
        rank_zero_info(
            f"VerifierCallback: the fit resumed at its last step and {out_dir / STATS_FILE} is missing (the "
            f"run that trained it stopped before the verifier finished): judging the {len(self.rollouts)} "
            "rollouts restored from the checkpoint."
        )
        self._verify(trainer)

    def state_dict(self) -> dict[str, Any]:
        # Lightning saves rank zero's callback state only, so gather every rank's rollouts into it. Checkpoint
        # saving runs on all ranks (trainer.save_checkpoint is collective), so this collective is reached by all.
        # One string of JSON lines: a checkpoint after every step then copies it instead of re-encoding every
        # rollout of the fit so far.
        local = "".join(self._rollout_lines)
        if not _distributed():
            return {"rollouts_jsonl": local}
        shards: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(shards, local)
        return {"rollouts_jsonl": "".join(shards)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rollouts = _state_rollouts(state_dict)
        # The checkpoint holds every rank's rollouts; rank zero, which judges them all, takes them.
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.rollouts = rollouts if rank == 0 else []
        self._rollout_lines = [_rollout_line(r) for r in self.rollouts]
        self._restored = True

    def _log(self, trainer: pl.Trainer, stats: dict[str, Any], out_dir: Path) -> None:
        if not trainer.loggers:
            return
        scalars = {f"verifier/{k}": float(stats[k]) for k in SCALAR_STATS if stats.get(k) is not None}
        for reason, n in stats["pairs_by_reason"].items():
            scalars[f"verifier/pairs/{reason.replace(':', '/')}"] = float(n)
        for reason, n in stats["questions_skipped"].items():
            scalars[f"verifier/skipped/{reason}"] = float(n)
        scalars["verifier/always_solved"] = float(len(stats["always_solved"]))
        text = None
        if self.log_pairs_to_tensorboard > 0 and any(
            isinstance(lg, TensorBoardLogger) for lg in trainer.loggers
        ):
            text = pairs_markdown(read_pairs(out_dir / PAIRS_FILE), self.log_pairs_to_tensorboard, stats)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
            if text is not None and isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(
                    "verifier/pairs", text, global_step=logged_step(logger, trainer.global_step)
                )
            logger.save()


def checkpoint_rollouts(ckpt_path: str | Path) -> list[Rollout]:
    """The rollouts (every rank's) a VerifierCallback kept in a Lightning checkpoint file."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint file to read the VerifierCallback's rollouts from")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    name = VerifierCallback.__qualname__
    states = [
        state
        for key, state in checkpoint.get("callbacks", {}).items()
        if key == name or key.startswith(name + "{")
    ]
    if len(states) != 1:
        raise ValueError(
            f"{path} holds {len(states)} {name} states (expected 1): was the fit run with one VerifierCallback?"
        )
    return _state_rollouts(states[0])


def _rollout_line(rollout: Rollout) -> str:
    """One rollout as a line of the checkpoint state's `rollouts_jsonl`."""
    return json.dumps(rollout.to_dict()) + "\n"


def _state_rollouts(state: dict[str, Any]) -> list[Rollout]:
    """The rollouts of a VerifierCallback state: JSON lines (`rollouts_jsonl`), or the list of dicts that
    checkpoints written before that form hold (`rollouts`)."""
    if "rollouts_jsonl" in state:
        return [Rollout.from_dict(json.loads(line)) for line in state["rollouts_jsonl"].split("\n") if line]
    return [Rollout.from_dict(d) for d in state.get("rollouts", [])]


def verify_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path,
    judge: Judge | None = None,
    pair_config: PairConfig | None = None,
    judge_batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """`run_verifier` on the rollouts of a checkpoint (e.g. a GRPO fit's last one, when the process was killed
    before the verifier wrote its files); the files equal those the fit would have written. Returns the stats."""
    return run_verifier(
        checkpoint_rollouts(ckpt_path),
        judge,
        pair_config,
        out_dir,
        judge_batch_size=judge_batch_size,
        progress=progress,
    )


def _excerpt(text: str, limit: int = 800) -> str:
    text = text.replace("```", "'''")  # keep the fence intact
    return text if len(text) <= limit else text[: limit // 2] + "\n…\n" + text[-limit // 2 :]


def pairs_markdown(pairs: list[PreferencePair], limit: int, stats: dict[str, Any]) -> str:
    """A Markdown panel of up to `limit` pairs, one of each reason first, so a reader sees every kind."""
    firsts = [next((p for p in pairs if p.reason == reason), None) for reason in REASONS]
    shown = [p for p in firsts if p is not None]
    shown = (shown + [p for p in pairs if all(p is not q for q in shown)])[:limit]
    lines = [f"**{len(shown)} of {stats['pairs']} pairs** · judge `{stats.get('judge', '?')}`"]
    for i, p in enumerate(shown, 1):
        lines += [
            f"### {i}. `{p.problem_id}` — {p.reason}",
            f"**Question:** {_excerpt(p.record.problem, 400)}",
            f"**Chosen** (step {p.chosen_step}, sample {p.chosen_sample_index}):",
            f"```\n{_excerpt(p.chosen)}\n```",
            f"**Rejected** (step {p.rejected_step}, sample {p.rejected_sample_index}):",
            f"```\n{_excerpt(p.rejected)}\n```",
        ]
    return "\n\n".join(lines)
