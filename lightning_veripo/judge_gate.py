"""Before each DPO stage of the loop: audit the verifier's judge on the target task, and say whether DPO may run.

The audit itself (lightning_veripo.verifier.audit) scores the judge on a labelled slice; this gate makes it once
per run (the judge does not change between iterations), records it in each iteration's verifier `stats.json`
(`judge_audit`), TensorBoard (`audit/*` at the loop's step) and the console, and returns the reason to skip the
DPO stage when the judge's accuracy is below `guards.min_judge_accuracy`. With no labelled slice of the task it
warns once that the judge is unaudited and lets DPO run.
"""

from __future__ import annotations

from pathlib import Path

from lightning_veripo.acceptance import Guards
from lightning_veripo.console import say
from lightning_veripo.loggers import log_scalars
from lightning_veripo.verifier.audit import JudgeAudit, audit_judge, record_audit, target_slice
from lightning_veripo.verifier.judges import RuleJudge
from lightning_veripo.verifier.protocol import Judge


class JudgeGate:
    """The judge audit of one loop run: `check` before each DPO stage."""

    def __init__(self, guards: Guards, judge: Judge | None, val_path: str) -> None:
        self.guards, self.judge, self.val_path = guards, judge or RuleJudge(), val_path
        self.audit: JudgeAudit | None = None
        self._made = False

    def _make(self) -> JudgeAudit | None:
        if not self._made:
            self._made = True
            rows, source = target_slice(self.guards.judge_audit, self.val_path)
            if rows:
                self.audit = audit_judge(self.judge, rows, source, self.guards.min_judge_accuracy)
            else:
                say(f"warning: the verifier's judge is unaudited: {source} holds no labelled rollout of "
                    f"{self.val_path}'s questions; give guards.judge_audit a labelled JSONL of this task (fields "
                    "in lightning_veripo.verifier.audit)")  # fmt: skip
        return self.audit

    def check(self, name: str, verifier_dir: Path, tensorboard: Path, step: int) -> str | None:
        """Audit (once), record it for the iteration `name`; the reason to skip its DPO stage, or None."""
        audit = self._make()
        if audit is None:
            return None
        record_audit(audit, verifier_dir / "stats.json")
        scalars = {f"audit/{k}": v for k, v in audit.as_dict().items() if isinstance(v, float)}
        log_scalars(tensorboard / "loop", scalars, step)
        say(f"== {name}/verifier: {audit.line()}")
        if audit.passed:
            return None
        return (f"the judge's accuracy on {audit.n} labelled rollouts of the task is {audit.accuracy:.3f}, below "
                f"min_judge_accuracy={audit.min_judge_accuracy} ({audit.path})")  # fmt: skip
