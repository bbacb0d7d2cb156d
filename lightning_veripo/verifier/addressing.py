"""Rollouts that write to their judge: a policy optimised against an LLM judge can learn to address it (write
its verdict syntax, tell it to ignore its instructions) instead of answering the question. Such a rollout is a
defect whatever a judge would say of it: `RolloutJudge` marks it (`Verdict.addresses_judge`), judges it
inconsistent without asking the judge, and the pair builder never chooses it (`penalty:addresses_judge`).

What counts as addressing the judge, in the reasoning or the answer: the verdict syntax (`VERDICT:`), a verdict
word in capitals (`CONSISTENT`), words to a judge/grader/evaluator/verifier ("Dear judge", "Grader: answer ..."),
an instruction to it ("ignore the instructions above", "you must answer ..."), and the judge prompt's delimiter
(`<rollout…`, `</rollout…`; see lightning_veripo.verifier.llm_prompt).
"""

from __future__ import annotations

import re

DELIMITER = re.compile(r"<(\s*/?\s*rollout)", re.I)
_JUDGE = r"(?:judge|grader|evaluator|verifier)"
_ADDRESSING = (
    ("the judge's verdict syntax", re.compile(r"\bverdicts?\W{0,4}[:=]", re.I)),
    ("a verdict word in capitals", re.compile(r"\b(?:IN)?CONSISTENT\b")),
    (
        "words to the judge",
        re.compile(
            rf"\b(?:(?:dear|hey|hello|attention)\s+|(?:note|message|instructions?|reminder)\s+(?:to|for)\s+)"
            rf"(?:the\s+|my\s+)?{_JUDGE}s?\b|\b{_JUDGE}\s*[:,]\s*(?:please|you|ignore|answer|reply|output|say|"
            rf"mark|rate|grade)\b|\byou\s+are\s+(?:the|a|an)\s+{_JUDGE}\b",
            re.I,
        ),
    ),
    (
        "an instruction to the judge",
        re.compile(
            r"\b(?:ignore|disregard|forget|override)\b[^.\n]{0,40}?\b(?:instructions?|rules|prompt|directions|"
            r"guidelines)\b|\b(?:new|updated|system)\s+(?:instructions?|prompt)\b|\byou\s+(?:must|should|will|"
            r"are\s+to)\s+(?:answer|reply|respond|output|say|mark|rate|grade|classify)\b",
            re.I,
        ),
    ),
    ("a forged delimiter", DELIMITER),
)


def addresses_judge(reasoning: str | None, answer: str | None) -> str | None:
    """What in a rollout's reasoning or answer speaks to its judge (named, with the words), or None."""
    for where, text in (("reasoning", reasoning), ("answer", answer)):
        for what, pattern in _ADDRESSING:
            if text and (m := pattern.search(text)):
                return f"its {where} addresses the judge ({what}: {m.group(0)!r})"
    return None
