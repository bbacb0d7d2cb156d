"""`state.json` of a loop run: the stages finished so far, in order, the adapter each left, and the kept policy.

Each entry: `stage`, `adapter` (None for a skipped stage, with `skipped` saying why), `steps`, `step`, and from
the stage acceptance (lightning_veripo.acceptance) `accepted`, `decision`, and `policy`: the adapters of the kept
policy after the stage, written when it is not the one before plus the stage's own (a rejected stage, a DPO stage
from the policy before its GRPO stage). `dev` holds each scored policy's development accuracy, so that a resumed
run decides from the numbers the first one measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning_veripo.files import write_text_atomic


class LoopState:
    """`state.json`: the stages finished so far, in order, with the adapter each left behind."""

    def __init__(self, work_dir: Path) -> None:
        self.path = work_dir / "state.json"
        self.data: dict[str, Any] = (
            json.loads(self.path.read_text()) if self.path.exists() else {"finished": []}
        )

    def finished(self, stage: str) -> bool:
        return any(s["stage"] == stage for s in self.data["finished"])

    def step(self) -> int:
        """The TensorBoard step the finished stages reached (each stage's optimizer steps, added up)."""
        return max((int(s.get("step", 0)) for s in self.data["finished"]), default=0)

    def adapters(self) -> list[str]:
        """The kept policy's adapters, in merge order: each stage's added to the policy it started from, unless
        its entry names the `policy` it left (a rejected stage: the one before; a DPO stage from an earlier one)."""
        policy: list[str] = []
        for s in self.data["finished"]:
            policy = (
                list(s["policy"])
                if "policy" in s
                else [*policy, s["adapter"]]
                if s.get("adapter")
                else policy
            )
        return policy

    def dev_score(self, policy: list[str]) -> dict[str, Any] | None:
        """The stage acceptance's development score of a policy, if a run measured it."""
        return self.data.get("dev", {}).get(json.dumps(policy))

    def remember_dev(self, policy: list[str], score: dict[str, Any]) -> None:
        self.data.setdefault("dev", {})[json.dumps(policy)] = score
        write_text_atomic(self.path, json.dumps(self.data, indent=1))

    def mark(self, stage: str, adapter: str | None, **info: Any) -> None:
        self.data["finished"].append({"stage": stage, "adapter": adapter, **info})
        write_text_atomic(self.path, json.dumps(self.data, indent=1))
