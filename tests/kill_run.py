"""Run `veripo ARGS...` and send this process a signal at a chosen point: a step of a stage's fit, or an
evaluation's k-th scored batch. The kills of tests/test_preemption.py, at events rather than timings.

    python tests/kill_run.py TERM|KILL STAGE step:K|eval:K -- iterate --config ...

`step:K`: in STAGE's fit, at `on_train_batch_end` once the trainer's step reaches K (before that step's
checkpoint is written: SIGKILL leaves the checkpoint of step K-1, SIGTERM lets Lightning write step K's).
`eval:K`: in the evaluation after STAGE, when its K-th batch of answers has been scored.
`arm(...)` does the same inside a test process (for SIGTERM, which the run handles).
"""

from __future__ import annotations

import inspect
import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


class KillAt(pl.Callback):
    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step, self.sent = signum, step, False

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self.sent and trainer.global_step >= self.step:
            self.sent = True
            os.kill(os.getpid(), self.signum)


def arm(patch: Any, signum: int, stage: str, when: str) -> None:
    """Patch the loop (with `patch`, a pytest MonkeyPatch or the `_Setattr` below) to send `signum` at `when`."""
    import lightning_veripo.evaluate as evaluate_module
    import lightning_veripo.loop as loop

    kind, _, k = when.partition(":")
    count = int(k)
    if kind == "step":
        run_stage = loop.run_stage

        def run_stage_with_kill(*args: Any, **kwargs: Any) -> Any:
            bound = inspect.signature(run_stage).bind(*args, **kwargs)
            if bound.arguments["name"] == stage:
                bound.arguments["callbacks"] = [
                    *(bound.arguments.get("callbacks") or []),
                    KillAt(signum, count),
                ]
            return run_stage(*bound.args, **bound.kwargs)

        patch.setattr(loop, "run_stage", run_stage_with_kill)
        return
    if kind != "eval":
        raise ValueError(f"kill_run: unknown point {when!r} (step:K or eval:K)")
    evaluate, score = evaluate_module.evaluate, evaluate_module.update_reasoning_metrics
    armed = {"on": False, "scored": 0}

    def evaluate_with_kill(*args: Any, answers_path: Any = None, **kwargs: Any) -> Any:
        armed["on"] = answers_path is not None and Path(answers_path).parent.as_posix().endswith(stage)
        return evaluate(*args, answers_path=answers_path, **kwargs)

    def score_with_kill(*args: Any, **kwargs: Any) -> Any:
        out = score(*args, **kwargs)
        if armed["on"]:
            armed["scored"] += 1
            if armed["scored"] == count:
                os.kill(os.getpid(), signum)
        return out

    patch.setattr(evaluate_module, "evaluate", evaluate_with_kill)
    patch.setattr(loop, "evaluate", evaluate_with_kill)  # the loop holds its own name for it
    patch.setattr(evaluate_module, "update_reasoning_metrics", score_with_kill)


class _Setattr:
    @staticmethod
    def setattr(obj: Any, name: str, value: Any) -> None:
        setattr(obj, name, value)


if __name__ == "__main__":
    sig, stage, when, sep, *veripo_args = sys.argv[1:]
    assert sep == "--", "usage: kill_run.py TERM|KILL STAGE step:K|eval:K -- VERIPO_ARGS..."
    arm(_Setattr, getattr(signal, f"SIG{sig}"), stage, when)
    from lightning_veripo.cli import main

    sys.exit(main(veripo_args))
