"""A loop stage whose trainer needs several processes (the FSDP2 or DDP overlay with `devices` > 1): its fit runs
as `python -m lightning_veripo.cli fit <the stage's arguments>` in a child process, whose Lightning launcher starts
the ranks, while the loop stays one process that owns the work directory, state.json and the evaluations.

In one process the loop hands a fit Python objects; across processes they become arguments and files:

    every-step checkpoint   `--trainer.callbacks+=ModelCheckpoint` (a distributed directory under FSDP2)
    the verifier            the ranks spool their rollouts (`RolloutSpooler`: VerifierCallback's spool, no
                            judging); the loop judges them afterwards with its own judge, whatever object it is
    the trained policy      loaded from the fit's last checkpoint into the loop's unsharded module, which then
                            exports the adapter and is evaluated as an in-process fit's would be
    the step count          the checkpoint's `global_step`
    resume                  `--ckpt_path=<stage>/checkpoints/last.ckpt` when it exists
    SIGTERM                 forwarded to the child (Lightning there finishes the step and its checkpoint, and
                            stops the other ranks); the loop then stops as after an in-process fit
    console                 the child's output goes to the loop's terminal
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed.checkpoint as dcp

from lightning_veripo import preemption
from lightning_veripo.callbacks.verifier import VerifierCallback
from lightning_veripo.records import Rollout
from lightning_veripo.spool import SpoolMark, read_spool, spool_path
from lightning_veripo.verifier.run import run_verifier


class RolloutSpooler(VerifierCallback):
    """VerifierCallback's per-rank rollout spool, resumable with the fit's checkpoints, and no judging: the
    process that started the fit judges the spooled rollouts (`judge_spooled_rollouts`)."""

    def _verify(self, trainer: pl.Trainer) -> None:
        self._sync(trainer)  # every rank's spool on disk (a collective) is all the fit leaves

    def _on_fit_end(self, trainer: pl.Trainer) -> None:
        return None


def processes(trainer: pl.Trainer) -> int:
    """How many processes the trainer's fit runs in (devices x nodes)."""
    return trainer.num_devices * trainer.num_nodes


def fit_in_processes(
    name: str, cli: Any, args: list[str], stage_dir: Path, callbacks: list[Any]
) -> tuple[Any, int]:
    """Fit the stage in a child `veripo fit` (its launcher starts the ranks); the trained weights are then loaded
    into `cli.model` (unsharded, in this process) and a VerifierCallback among `callbacks` judges the ranks'
    rollouts. Returns the module and the fit's optimizer steps, as `run_stage` does."""
    if cli.trainer.num_nodes > 1:
        raise ValueError(
            f"{name}: num_nodes={cli.trainer.num_nodes}: the loop starts a sharded stage on this node only; "
            "launch `veripo fit` on every node (torchrun) for a multi-node fit"
        )
    verifiers = [c for c in callbacks if isinstance(c, VerifierCallback)]
    others = [type(c).__name__ for c in callbacks if not isinstance(c, VerifierCallback)]
    if others or len(verifiers) > 1:
        raise ValueError(
            f"{name}: a fit in {processes(cli.trainer)} processes takes the loop's callbacks as arguments, and "
            f"only one VerifierCallback is known: {others or 'two VerifierCallbacks'}"
        )
    ckpt_dir, spool_dir = stage_dir / "checkpoints", stage_dir / "rollouts"
    last = ckpt_dir / "last.ckpt"
    callback = "--trainer.callbacks"
    command = [
        sys.executable, "-m", "lightning_veripo.cli", "fit", *args,
        f"{callback}+=lightning.pytorch.callbacks.ModelCheckpoint", f"{callback}.init_args.dirpath={ckpt_dir}",
        f"{callback}.init_args.save_last=true", f"{callback}.init_args.every_n_train_steps=1",
        *([f"{callback}+={RolloutSpooler.__module__}.RolloutSpooler", f"{callback}.init_args.spool_dir={spool_dir}",
           f"{callback}.init_args.progress=false"] if verifiers else []),
        *([f"--ckpt_path={last}"] if last.exists() else []),
    ]  # fmt: skip
    with preemption.fitting_in(subprocess.Popen(command), last) as child:
        code = child.wait()
    if code != 0:
        raise RuntimeError(
            f"{name}: the fit in {processes(cli.trainer)} processes exited with code {code} (its output is above); "
            f"the same command resumes it from {last}"
        )
    steps = load_trained_weights(cli.model, last)
    if verifiers:
        judge_spooled_rollouts(verifiers[0], last, spool_dir)
    return cli.model, steps


def _checkpoint_meta(ckpt: Path) -> dict[str, Any]:
    """A Lightning checkpoint without its weights: `meta.pt` of a distributed checkpoint directory, or the file."""
    path = ckpt / "meta.pt" if ckpt.is_dir() else ckpt
    return torch.load(path, map_location="cpu", weights_only=True)


def load_trained_weights(module: pl.LightningModule, ckpt: Path) -> int:
    """Build `module`'s backbone here, check the checkpoint's policy is the one built, and load the trainable
    weights of the fit's checkpoint into it (a distributed directory is read whole, without a process group).
    Returns the checkpoint's global step."""
    meta = _checkpoint_meta(ckpt)
    module.on_load_checkpoint(meta)  # builds the backbone; refuses weights of another policy
    if ckpt.is_dir():
        # the trainable weights, as veripo's checkpoints hold them, filled in from the shards
        loaded = {"state_dict": module.state_dict()}
        dcp.load(loaded, checkpoint_id=str(ckpt), no_dist=True)
        state = loaded["state_dict"]
    else:
        state = meta["state_dict"]
    missing = sorted(set(module.state_dict()) - set(state))
    unexpected = module.load_state_dict(state, strict=False).unexpected_keys
    if missing or unexpected:
        raise ValueError(f"{ckpt}: trainable weights missing {missing[:3]}, unknown ones {unexpected[:3]}")
    return int(meta["global_step"])


def judge_spooled_rollouts(verifier: VerifierCallback, ckpt: Path, spool_dir: Path) -> dict[str, Any]:
    """Run the verifier (its judge, pair rules and out_dir) on every rank's rollouts the checkpoint counts."""
    states = [
        s for k, s in _checkpoint_meta(ckpt).get("callbacks", {}).items() if k.startswith("RolloutSpooler")
    ]
    if len(states) != 1 or "spool" not in states[0]:
        raise ValueError(f"{ckpt} holds {len(states)} RolloutSpooler states with a spool (expected 1)")
    marks = [SpoolMark(**m) for m in states[0]["spool"]["ranks"]]
    rollouts: itertools.chain[Rollout] = itertools.chain.from_iterable(
        read_spool(spool_path(spool_dir, rank), mark) for rank, mark in enumerate(marks)
    )
    out_dir = Path(verifier.out_dir) if verifier.out_dir else spool_dir.parent / "verifier"
    verifier.stats = run_verifier(rollouts, verifier.judge, verifier.pair_config, out_dir,
                                  judge_batch_size=verifier.judge_batch_size, progress=verifier.progress)  # fmt: skip
    return verifier.stats
