"""What SIGTERM does to `veripo iterate`: stop at a safe point, say which stage and step, exit 143, resume later.

Schedulers (SLURM, Kubernetes) send SIGTERM before they kill a job, and read a zero exit as "done". Inside a
fit, Lightning's own handler lets the step finish and its checkpoint be written, then raises `SIGTERMException`
(a `SystemExit` whose code is None: exit 0, no word). Outside a fit (an evaluation, the verifier's recovery,
between stages) nothing would stop the run at all. `stop_on_sigterm` covers both: around the whole loop, a
SIGTERM outside a fit raises `Preempted` at once (what is half done there, an evaluation's answers, is written
atomically at its end, so nothing torn is left), and a fit's `SIGTERMException` becomes `Preempted` naming the
stage and the step of its last checkpoint. `veripo` prints that line and exits 143 (128 + SIGTERM), and the
same command resumes: finished stages are skipped, the fit resumes from `last.ckpt`, the evaluation runs again.
A stage fitted in child processes (`lightning_veripo.stage_processes`) is passed the SIGTERM and stops the same
way there; the loop waits for it, then stops naming the step of its last checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

EXIT_CODE = 128 + signal.SIGTERM


class Preempted(Exception):
    """The run stopped on SIGTERM; `where` says at which stage and step."""

    def __init__(self, where: str) -> None:
        super().__init__(f"stopped by SIGTERM {where}")
        self.where = where


class _Position:
    """Where the loop is, for the message and for the handler (which must not raise inside a fit)."""

    def __init__(self) -> None:
        self.stage: str | None = None
        self.activity = ""
        self.trainer: Any = None
        self.child: Any = None  # a stage's fit in a child process (`fitting_in`)
        self.received = False

    def describe(self) -> str:
        if self.stage is None:
            return "between stages"
        if self.trainer is not None:
            return f"in {self.stage} at step {self.trainer.global_step} (its last checkpoint)"
        return f"in {self.stage} ({self.activity})" if self.activity else f"in {self.stage}"


_position = _Position()


def _handler(signum: int, frame: Any) -> None:
    _position.received = True
    if _position.child is not None:  # its Lightning finishes the step and checkpoint, and stops its ranks
        _position.child.send_signal(signum)
        return
    if _position.trainer is None:  # inside a fit Lightning's handler (which calls this one too) stops it
        raise Preempted(_position.describe())


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into `Preempted` for the duration of the block (the previous handler is put back after)."""
    previous = signal.signal(signal.SIGTERM, _handler)
    _position.__init__()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def at(stage: str, activity: str = "") -> Iterator[None]:
    """The loop is in `stage`, doing `activity` (e.g. "evaluating"): what a SIGTERM message names."""
    saved = (_position.stage, _position.activity)
    _position.stage, _position.activity = stage, activity
    try:
        yield
    finally:
        _position.stage, _position.activity = saved


@contextlib.contextmanager
def fitting(trainer: Any) -> Iterator[None]:
    """A Lightning fit runs in the block: a SIGTERM lets it finish its step and checkpoint, then stops it."""
    _position.trainer = trainer
    try:
        yield
    except SIGTERMException:
        raise Preempted(_position.describe()) from None
    finally:
        _position.trainer = None
    if _position.received:  # arrived after the training loop (in the verifier, say): stop before going on
        raise Preempted(f"after the fit of {_position.stage} (step {trainer.global_step})")


@contextlib.contextmanager
def fitting_in(child: subprocess.Popen, last_checkpoint: Path) -> Iterator[subprocess.Popen]:
    """A stage's fit runs in the `child` process in the block: a SIGTERM is passed on to it; once it has
    stopped, `Preempted` names the step of its last checkpoint. Anything else that stops the block stops the
    child too."""
    _position.child = child
    try:
        yield child
    finally:
        _position.child = None
        if child.poll() is None:  # the loop itself failed (Ctrl-C, say): do not leave the fit running
            child.terminate()
            child.wait()
    if _position.received:
        meta = last_checkpoint / "meta.pt" if last_checkpoint.is_dir() else last_checkpoint
        step = torch.load(meta, map_location="cpu", weights_only=True)["global_step"] if meta.exists() else 0
        raise Preempted(f"in {_position.stage} at step {step} (its last checkpoint)")
