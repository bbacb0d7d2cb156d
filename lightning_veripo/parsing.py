"""Reading a completion: the `<think>` reasoning, the `<answer>` text, option letters and numbers in it.

Every function here takes arbitrary model output and never raises: a completion that does not follow the
format gives None / [] / False, and the caller decides what that is worth.
"""

from __future__ import annotations

import math
import re

TAGS = ("think", "answer")
_ANY_TAG = "|".join(f"<{t}>|</{t}>" for t in TAGS)
_TAG_CACHE: dict[str, re.Pattern[str]] = {}
# "1,200" only when the comma groups are whole thousands ("1,2345" is not 12345); U+2212 is the typeset minus.
_NUMBER = re.compile(
    r"[-+\u2212]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+\u2212]?\.\d+(?:[eE][-+]?\d+)?"
)
# Neither block may contain any of the four tags, so "<think>…<answer>x</answer>…</think>" is not one answer.
_FORMAT = re.compile(
    rf"\s*<think>(?:(?!{_ANY_TAG}).)*</think>\s*<answer>(?:(?!{_ANY_TAG}).)*</answer>\s*", re.S
)
_LONE_LETTER = re.compile(r"\W*([A-Za-z])\W*")


def _tag(tag: str) -> re.Pattern[str]:
    if tag not in _TAG_CACHE:
        # The content may not hold another opening tag: in "<answer><answer>B</answer>" the answer is "B".
        t = re.escape(tag)
        _TAG_CACHE[tag] = re.compile(rf"<{t}>((?:(?!<{t}>).)*?)</{t}>", re.S)
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
    """Exactly one `<think>…</think>` followed by exactly one `<answer>…</answer>`, nothing else around them.

    Whitespace around and between the blocks is allowed; empty blocks are (the format reward judges the
    structure, the accuracy reward the content). This is the paper lineage's format check (MM-EUREKA,
    Video-R1: a full match of `<think>.*?</think>\\s*<answer>.*?</answer>`), made strict about stray tags.
    """
    return _FORMAT.fullmatch(text) is not None


def option_letters(text: str, letters: str = "ABCDEFGHIJ") -> list[str]:
    """Standalone option letters in `text`, in order ("B", "(B)", "B." count; the B in "Bob" does not).

    Case-sensitive on purpose: a lowercase "a" in a sentence is an article, not option A. An answer that is
    only one letter ("b", "(b)") is read by `lone_letter`.
    """
    if not letters:
        return []
    return re.findall(rf"(?<![A-Za-z])([{re.escape(letters)}])(?![A-Za-z])", text)


def lone_letter(text: str) -> str | None:
    """The letter, upper-cased, when `text` is a single letter with only punctuation around it ("b", "(c)")."""
    m = _LONE_LETTER.fullmatch(text.strip())
    return m.group(1).upper() if m else None


def find_numbers(text: str) -> list[tuple[int, int, float]]:
    """Every number in `text` as (start, end, value), in order; numbers too large for a float are left out."""
    found = []
    for m in _NUMBER.finditer(text):
        try:
            value = float(m.group(0).replace(",", "").replace("\u2212", "-"))
        except ValueError:
            continue
        if math.isfinite(value):
            found.append((m.start(), m.end(), value))
    return found


def parse_number(text: str) -> float | None:
    """The first number in `text` ("about 1,200 m" -> 1200.0, "−3.5" -> -3.5), or None.

    A number too large for a float ("1e999") gives None, so callers only ever see finite values.
    """
    m = _NUMBER.search(text)
    if not m:
        return None
    try:
        value = float(m.group(0).replace(",", "").replace("\u2212", "-"))
    except ValueError:
        return None
    return value if math.isfinite(value) else None
