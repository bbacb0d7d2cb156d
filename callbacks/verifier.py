"""VerifierCallback: record a GRPO fit's rollouts and run the Rollout-Aware Verifier when training ends.

Contract with the GRPO module: `training_step` returns `{"loss": tensor, "rollouts": list[Rollout]}`. The
callback appends them to a per-rank spool file as they arrive (`lightning_veripo.spool`), and a checkpoint
holds only where each rank's spool stood, so a checkpoint costs the same at step 10 and at step 10,000 and a
resumed fit cuts the spool back to its checkpoint (nothing doubled, nothing lost). In `on_train_end` -- while
the model is still on its device, before `strategy.teardown()` -- every rank syncs its spool, rank zero streams
them all into `run_verifier` (judge, pairs, atomic files) and logs the stats as `verifier/*` scalars plus a few
pairs as a Markdown text panel in TensorBoard. No rollout crosses ranks; every rank reaches every collective.

A fit resumed from a checkpoint of its last step trains nothing and Lightning skips `on_train_end`; if the
process that wrote that checkpoint was killed before the verifier finished (no `stats.json` in `out_dir`),
`on_fit_end` runs the verifier on the spooled rollouts the checkpoint counts, so the files are the same as an
uninterrupted fit's. `verify_checkpoint` does the same from a checkpoint file, without a fit. Checkpoints of
earlier versions (the rollouts themselves in the state) still resume: their rollouts start the spool.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_veripo.loggers import logged_step
from lightning_veripo.records import Rollout
from lightning_veripo.spool import RolloutSpool, SpoolMark, read_spool, spool_path
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


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class VerifierCallback(pl.Callback):
    """Judge the fit's rollouts and write VerIPO preference pairs at the end of training.

    Args:
        judge: the consistency judge; None means `RuleJudge()` (offline, deterministic).
        pair_config: pair-building thresholds; None means `PairConfig()`.
        out_dir: where rollouts.jsonl, verdicts.jsonl, pairs.jsonl and stats.json go; None means
            `<trainer.log_dir or default_root_dir>/verifier`.
        spool_dir: where the fit's rollouts are spooled as they arrive (`rank<r>.jsonl`, one per rank); None
            means `<trainer.default_root_dir>/rollouts`. A resume must find it where the checkpoint was made.
        log_pairs_to_tensorboard: how many pairs to show in the TensorBoard text panel (0 for none).
        judge_batch_size: rollouts per judge call (and progress-bar step).
        progress: show a progress bar while judging.
    """

    def __init__(
        self,
        judge: Judge | None = None,
        pair_config: PairConfig | None = None,
        out_dir: str | None = None,
        spool_dir: str | None = None,
        log_pairs_to_tensorboard: int = 4,
        judge_batch_size: int = 64,
        progress: bool = True,
    ) -> None:
        self.judge = judge if judge is not None else RuleJudge()
        self.pair_config = pair_config if pair_config is not None else PairConfig()
        self.out_dir = out_dir
        self.spool_dir = spool_dir
        self.log_pairs_to_tensorboard = log_pairs_to_tensorboard
        self.judge_batch_size = judge_batch_size
        self.progress = progress
        self.stats: dict[str, Any] | None = None
        self.resolved_out_dir: Path | None = None
        self.resolved_spool_dir: Path | None = None
        self._spool: RolloutSpool | None = None
        self._marks: list[SpoolMark] = []  # every rank's spool at the last sync (rank zero reads them all)
        self._restored_state: dict[str, Any] | None = None
        self._trained = False
        self._restored = False
        self._warned_no_rollouts = False
        self._spool_pending = False  # on_fit_start left the spool to open once the checkpoint is restored

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # a callback reused for another fit starts empty; a resume restores after this
            self.stats, self._trained, self._restored, self._restored_state = None, False, False, None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Open this rank's spool where the restored checkpoint left it (a new fit: empty). Strategies that
        restore a checkpoint after their setup (ModelParallelStrategy / FSDP2, DeepSpeed) restore callbacks
        after `on_fit_start`: there the spool is opened at `on_train_start` (or `on_fit_end`), once the
        checkpoint's marks are known, instead of being cut back to nothing here."""
        # not even the checkpoint path is known yet here (Lightning runs resume_start after the setup)
        self._spool_pending = trainer.strategy.restore_checkpoint_after_setup
        if not self._spool_pending:
            self._open_spool(trainer)

    def _open_spool(self, trainer: pl.Trainer) -> None:
        self._spool_pending = False
        spool_dir = Path(self.spool_dir or Path(trainer.default_root_dir) / "rollouts").resolve()
        self.resolved_spool_dir = spool_dir
        rank, world = trainer.global_rank, trainer.world_size
        self._spool = RolloutSpool(spool_path(spool_dir, rank))
        state = self._restored_state
        if state is not None and "spool" in state:
            marks = [SpoolMark(**m) for m in state["spool"]["ranks"]]
            if len(marks) != world:
                raise RuntimeError(
                    f"VerifierCallback: the checkpoint's rollouts are spooled by {len(marks)} ranks in "
                    f"{spool_dir}; resume it on {len(marks)} processes (this run has {world})."
                )
            self._spool.open(marks[rank])
        else:
            self._spool.open()
            if (
                state is not None and rank == 0
            ):  # a checkpoint of an earlier version: its rollouts start the spool
                self._spool.append(_state_rollouts(state))
        self._sync(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._spool_pending:
            self._open_spool(trainer)
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
        assert self._spool is not None
        self._spool.append(r if isinstance(r, Rollout) else Rollout.from_dict(r) for r in rollouts)

    def _sync(self, trainer: pl.Trainer | None = None) -> list[SpoolMark]:
        """fsync this rank's spool and learn every rank's mark (two ints a rank: a collective all ranks reach)."""
        assert self._spool is not None
        mark = self._spool.sync()
        _, world = _rank_world()
        if world == 1:
            self._marks = [mark]
        else:
            marks: list[Any] = [None] * world
            dist.all_gather_object(marks, (mark.bytes, mark.count))
            self._marks = [SpoolMark(*m) for m in marks]
        return self._marks

    def spooled_rollouts(self) -> Iterator[Rollout]:
        """Every rank's rollouts up to the last sync, streamed from the spool files (rank zero's view)."""
        assert self.resolved_spool_dir is not None
        return itertools.chain.from_iterable(
            read_spool(spool_path(self.resolved_spool_dir, r), m) for r, m in enumerate(self._marks)
        )

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
        marks = self._sync(trainer)  # a collective: every rank's spool is on disk before rank zero reads it
        error: BaseException | None = None
        if trainer.is_global_zero:
            if not sum(m.count for m in marks):
                rank_zero_warn("VerifierCallback: no rollouts were collected; writing empty verifier files.")
            try:
                self.stats = run_verifier(
                    self.spooled_rollouts(),
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
        if self._spool_pending:  # a finished fit resumed under a strategy that restores after setup
            self._open_spool(trainer)
        try:
            self._on_fit_end(trainer)
        finally:
            if self._spool is not None:
                self._spool.close()

    def _on_fit_end(self, trainer: pl.Trainer) -> None:
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
                f"Re-run it on the checkpoint with lightning_veripo.callbacks.verifier.verify_checkpoint."
            )

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._spool is not None:
            self._spool.close()

    def _finish_restored_fit(self, trainer: pl.Trainer) -> None:
        """A fit resumed from its last step trained nothing here: run the verifier on the restored rollouts
        unless a finished run of it (its `stats.json`) is already in `out_dir`. Every rank takes part."""
        out_dir = self._out_dir(trainer)
        finished = (out_dir / STATS_FILE).is_file() if trainer.is_global_zero else None
        if trainer.strategy.broadcast(finished, src=0):
            return
        rank_zero_info(
            f"VerifierCallback: the fit resumed at its last step and {out_dir / STATS_FILE} is missing (the "
            f"run that trained it stopped before the verifier finished): judging the "
            f"{sum(m.count for m in self._marks)} rollouts the checkpoint counts in {self.resolved_spool_dir}."
        )
        self._verify(trainer)

    def state_dict(self) -> dict[str, Any]:
        # Lightning saves rank zero's callback state only; checkpoint saving runs on all ranks (it is
        # collective), so the gather of every rank's mark in _sync is reached by all.
        if self._spool is None:  # a checkpoint saved outside a fit
            return {}
        marks = self._sync()
        return {
            "spool": {
                "dir": str(self.resolved_spool_dir),
                "ranks": [{"bytes": m.bytes, "count": m.count} for m in marks],
            }
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_state = dict(state_dict)
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


def checkpoint_rollouts(ckpt_path: str | Path, spool_dir: str | Path | None = None) -> Iterator[Rollout]:
    """The rollouts (every rank's) a VerifierCallback counted in a Lightning checkpoint file, streamed from its
    spool (`spool_dir`, default: the directory the checkpoint recorded), or held in the state of an older one.
    The file is loaded weights-only: a checkpoint's pickle cannot run code here."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint file to read the VerifierCallback's rollouts from")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
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
    state = states[0]
    del checkpoint
    if "spool" not in state:
        return iter(_state_rollouts(state))
    directory = Path(spool_dir if spool_dir is not None else state["spool"]["dir"])
    marks = [SpoolMark(**m) for m in state["spool"]["ranks"]]
    return itertools.chain.from_iterable(read_spool(spool_path(directory, r), m) for r, m in enumerate(marks))


def _state_rollouts(state: dict[str, Any]) -> list[Rollout]:
    """The rollouts of a VerifierCallback state of an earlier version: JSON lines (`rollouts_jsonl`), or the
    list of dicts of the versions before that (`rollouts`)."""
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
    spool_dir: str | Path | None = None,
) -> dict[str, Any]:
    """`run_verifier` on the rollouts of a checkpoint (e.g. a GRPO fit's last one, when the process was killed
    before the verifier wrote its files); the files equal those the fit would have written. Returns the stats."""
    return run_verifier(
        checkpoint_rollouts(ckpt_path, spool_dir),
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
