"""Judges the loop tests name by class path (`judges_for_tests.NAME`, with tests/ on PYTHONPATH), as a config
would: each one's verdicts say which judge made them."""

from __future__ import annotations

from lightning_veripo.verifier.protocol import JudgeItem, Verdict


class Contrarian:
    """Calls every rollout inconsistent, and signs its reason: where its verdicts land shows where it was used."""

    REASON = "inconsistent: judges_for_tests.Contrarian says so of everything"

    def judge(self, items: list[JudgeItem]) -> list[Verdict]:
        return [Verdict(consistent=False, rationale=self.REASON, judge="contrarian") for _ in items]
