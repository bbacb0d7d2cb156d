"""The rule judge: offline, deterministic, the verifier's default: does the reasoning lead to the answer it gives?

The LLM judges (`TransformersJudge`, `OpenAIJudge`, `HybridJudge`) are in lightning_veripo.verifier.llm_judges;
what every judge shares (`Judge`, `JudgeItem`, `Verdict`) in lightning_veripo.verifier.protocol.
"""

from __future__ import annotations

import time
from typing import Any

from lightning_veripo.verifier.claims import answer_kind, options_by_letter, reasoning_claims, stated_value
from lightning_veripo.verifier.protocol import Decision, JudgeItem, RolloutJudge

# Names that lived here before the judges had modules of their own: say where they are now.
_MOVED = {
    "OpenAIJudge": "lightning_veripo.verifier.llm_judges",
    "TransformersJudge": "lightning_veripo.verifier.llm_judges",
    "HybridJudge": "lightning_veripo.verifier.llm_judges",
    "JUDGE_INSTRUCTION": "lightning_veripo.verifier.llm_prompt",
    "judge_prompt": "lightning_veripo.verifier.llm_prompt",
    "parse_verdict": "lightning_veripo.verifier.llm_prompt",
    "Judge": "lightning_veripo.verifier.protocol",
    "JudgeItem": "lightning_veripo.verifier.protocol",
    "JudgeUnavailableError": "lightning_veripo.verifier.protocol",
    "Verdict": "lightning_veripo.verifier.protocol",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        raise AttributeError(
            f"{name} is no longer in {__name__}: import it from {_MOVED[name]} (or lightning_veripo.verifier); "
            f"in a config, class_path: {_MOVED[name]}.{name}"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class RuleJudge(RolloutJudge):
    """Deterministic offline judge: everything the reasoning finally claims must match the answer.

    A claim is the reasoning's last conclusion or an observation stated with it: "In the video I see blue, so
    the answer is B" claims C (blue) and B, so answering B is inconsistent. Multiple choice compares option
    letters (an option's content names its letter; a content that combines facts, "red, up", is stated by
    stating each fact); numerical/regression compare numbers within `numeric_rel_tol`; OCR and free-form
    compare normalised text by containment (OCR also reads "the sign reads EXIT"). The last thing stated
    counts ("I first thought red, but it is blue" states blue), and after a correction ("wait", "actually") only
    what follows it does ("So the answer is B. Wait, it is blue." claims C).
    When the reasoning states no conclusion at all the rules cannot tell, so the verdict is unjudged ("no
    conclusion in reasoning") rather than a guess either way. Out of reach: paraphrase ("scrubbing plates" vs
    "cooking dinner"), arithmetic ("from x=2 to x=26, so 30"), numbers in words and most negation ("the red
    one stays still" still states red).
    """

    name = "rule"

    def __init__(
        self, numeric_rel_tol: float = 0.01, repetition_ngram: int = 4, repetition_threshold: float = 0.3
    ) -> None:
        super().__init__(repetition_ngram, repetition_threshold)
        self.numeric_rel_tol = numeric_rel_tol

    def _decide(self, items: list[JudgeItem]) -> list[Decision]:
        t0 = time.perf_counter()
        decided = [self._decide_one(item) for item in items]
        latency = (time.perf_counter() - t0) / max(len(items), 1)
        return [Decision(c, why, "", latency) for c, why in decided]

    def _same(self, kind: str, claimed: Any, answer: Any) -> bool:
        if kind == "choice":
            return answer in claimed
        if kind == "number":
            return abs(claimed - answer) <= self.numeric_rel_tol * max(abs(claimed), abs(answer), 1e-12)
        return f" {answer} " in f" {claimed} " or f" {claimed} " in f" {answer} "

    def _decide_one(self, item: JudgeItem) -> tuple[bool | None, str]:
        kind = answer_kind(item)
        answer = stated_value(item.answer or "", kind, options_by_letter(item.options))
        if answer is None:
            return None, f"answer states no {'option' if kind == 'choice' else kind}"
        claims = reasoning_claims(item.reasoning or "", kind, item.options, item.problem_type == "OCR")
        if not claims:
            return None, "no conclusion in reasoning"
        same = all(self._same(kind, c.value, answer) for c in claims)
        said = " and ".join(f"{c.verb} {c.shown}" for c in claims)
        return same, f"reasoning {said}, answer is {answer!r}"
