"""Reading a completion: the `<think>` reasoning, the `<answer>` text, option letters and numbers in it."""

from __future__ import annotations

import re

_TAG_CACHE: dict[str, re.Pattern[str]] = {}
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_FORMAT = re.compile(r"^\s*<think>(?:(?!<think>|</think>).)*</think>\s*<answer>(?:(?!<answer>|</answer>).)*</answer>\s*$", re.S)


def _tag(tag: str) -> re.Pattern[str]:
    if tag not in _TAG_CACHE:
        _TAG_CACHE[tag] = re.compile(rf"<{tag}>(.*?)</{tag}>", re.S)
    return _TAG_CACHE[tag]


def extract_tag(text: str, tag: str) -> str | None:
    """Content of the last complete `<tag>…</tag>` in `text`, stripped; None when there is none."""
    found = _tag(tag).findall(text)
    return found[-1].strip() if found else None


def extract_answer(text: str) -> str | None:
    """The final answer: the last `<answer>…</answer>` content, or None."""
    return extract_tag(text, "answer")


def extract_think(text: str) -> str | None:
    """The reasoning: the last `<think>…</think>` content, or None."""
    return extract_tag(text, "think")


def is_well_formed(text: str) -> bool:
    """Exactly one `<think>…</think>` followed by exactly one `<answer>…</answer>`, nothing else around them."""
    return bool(_FORMAT.match(text))


def option_letters(text: str, letters: str = "ABCDEFGHIJ") -> list[str]:
    """Standalone option letters in `text`, in order ("B", "(B)", "B." count; the B in "Bob" does not)."""
    return re.findall(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text)


def parse_number(text: str) -> float | None:
    """The first number in `text` ("about 1,200 m" -> 1200.0), or None."""
    m = _NUMBER.search(text)
    if not m:
        return None
    try:
        return float(m.group(0).replace(",", ""))
    except ValueError:
        return None
