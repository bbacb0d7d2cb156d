"""What a rollout's reasoning claims about its answer, read by rules: the rule judge's evidence.

A claim is the reasoning's last conclusion or an observation stated with it ("I see blue, so the answer is B"
claims blue, i.e. option C, and B). `reasoning_claims` extracts them per answer kind (choice, number, text).
"""

from __future__ import annotations

import re
from bisect import bisect_left
from typing import NamedTuple

from lightning_veripo.parsing import find_numbers, lone_letter, option_letters, parse_number
from lightning_veripo.verifier.protocol import JudgeItem

# Phrases after which a reasoning states its conclusion. "Strong" cues name the answer; adverbs conclude a
# step; copulas ("... is 3") and verbs of counting or measuring ("I count 3") only count for numbers, where a
# stated value is unambiguous.
_STRONG = (
    r"\b(?:answer|option|choice)\s*(?:is|should be|would be|must be|will be|[:=])"
    r"|\bi\s+(?:would\s+|will\s+)?(?:choose|pick|select|go with)\b|\b(?:i|we)\s+conclude(?:\s+that)?\b"
)
_ADVERB = r"\b(?:so|therefore|thus|hence|consequently)\b"
_COPULA = r"\b(?:is|are|was|were|equals|makes|gives)\b|="
_MEASURE = r"\b(?:count|counted|see|saw|spot|notice|measures|measured|spans|covers|travels|moves|moved)\b"
_CUES = {
    "choice": re.compile(f"(?P<strong>{_STRONG})|{_ADVERB}", re.I),
    "number": re.compile(f"(?P<strong>{_STRONG})|{_ADVERB}|{_COPULA}|{_MEASURE}", re.I),
    "text": re.compile(f"(?P<strong>{_STRONG})", re.I),
}
_SENTENCE_END = re.compile(r"(?<!\d)\.|\.(?!\d)|[!?;\n]")
_OPTION_LABEL = re.compile(r"^\s*\(?([A-Z])\s*[.):]\s*(.*)$", re.S)
# A reasoning that takes back what it said: what it stated before the marker no longer counts.
_CORRECTION = re.compile(
    r"\b(?:wait|actually|oops|hmm+|on second thought|on closer look|looking again|look again|i was wrong"
    r"|mistake|misread|misjudged|miscounted|recount)\b|\bno\b(?=\s*[,;:!.])",
    re.I,
)
# Words between two numbers that make the second follow from the first by arithmetic, not contradict it.
_ARITHMETIC = re.compile(
    r"\b(?:plus|minus|times|sum|add|added|adding|each|per|more|less|fewer|another|extra|double|twice|half"
    r"|combined|altogether|divided|multiplied)\b|[+×*/]",
    re.I,
)
# OCR: "the sign reads EXIT", "the word on the door is PUSH" state what the text says.
_READING = re.compile(
    r"\b(?:reads|says|spells(?:\s+out)?|displays|written|shows\s+(?:the\s+)?(?:word|words|text|number|letters))\b"
    r"|\b(?:word|words|text|writing|label|caption|title|number|letters)(?:\s+on\s+(?:the\s+|a\s+)?\w+)?"
    r"\s+(?:is|was|reads|says)\b",
    re.I,
)
_QUOTED = re.compile(r"""\s*:?\s*(?:'([^']+)'|"([^"]+)"|“([^”]+)”|‘([^’]+)’)""")
_READING_END = re.compile(
    r"[,.;:!?\n]|\s(?:so|therefore|thus|hence|which|because|since|in|on|and|with|but)\b"
)
_WORD = re.compile(r"\w+")
_ARTICLES = {"a", "an", "the"}
_NEGATIONS = {"not", "no", "never", "nor", "t", "without"}  # "isn't" is the words "isn", "t"
_NEGATING_PAIRS = {("instead", "of"), ("rather", "than")}
_LIST_WORDS = {"and", "or", "nor", "either", "both", "vs", "versus"}
_PART_SPLIT = re.compile(r"\s*(?:[,;/&]|\band\b)\s*")


def _normalise(text: str) -> str:
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in _ARTICLES)


def answer_kind(item: JudgeItem) -> str:
    if item.options or item.problem_type == "multiple choice":
        return "choice"
    return "number" if item.problem_type in ("numerical", "regression") else "text"


def _option_texts(options: tuple[str, ...]) -> dict[str, str]:
    """'A. red' -> {'A': 'red'}, the content as written; unlabelled options are lettered A, B, ... in order."""
    out = {}
    for i, opt in enumerate(options):
        m = _OPTION_LABEL.match(opt)
        letter, text = (m.group(1), m.group(2)) if m else (chr(ord("A") + i), opt)
        out[letter] = text
    return out


def options_by_letter(options: tuple[str, ...]) -> dict[str, str]:
    """'A. red' -> {'A': 'red'} (normalised content); unlabelled options are lettered A, B, ... in order."""
    return {k: _normalise(v) for k, v in _option_texts(options).items()}


def _choice_in(text: str, options: dict[str, str], strong: bool = True) -> str | None:
    """The option a phrase names: its first standalone option letter, else the one option whose text it contains.
    After a weak cue ("so I compared A and C") a phrase naming several letters names none."""
    letters = option_letters(text, "".join(options) or "ABCDEFGHIJ")
    if letters:
        return letters[0] if strong or len(set(letters)) == 1 else None
    padded = f" {_normalise(text)} "
    named = [k for k, v in options.items() if v and f" {v} " in padded]
    named = [k for k in named if not any(k != o and f" {options[k]} " in f" {options[o]} " for o in named)]
    return named[0] if len(named) == 1 else None


def stated_value(text: str, kind: str, options: dict[str, str], strong: bool = True) -> str | float | None:
    if kind == "choice":
        lone = lone_letter(text)
        if lone is not None and (not options or lone in options):
            return lone
        return _choice_in(text, options, strong)
    if kind == "number":
        return parse_number(text)
    return _normalise(text) or None


class Claim(NamedTuple):
    """One thing a reasoning asserts about the answer, at character `pos`: a conclusion ("so the answer is B")
    or a stated observation ("I see blue", "I count 3", "the sign reads EXIT"). For multiple choice `value` is
    the set of option letters the claim allows; a number or normalised text otherwise."""

    pos: int
    verb: str  # "concludes" or "states"
    value: frozenset[str] | float | str
    shown: str  # how the rationale quotes it


# -- multiple choice: what the reasoning says of the options' contents


class _Mention(NamedTuple):
    start: int  # character offsets in the reasoning
    end: int
    slot: int  # which fact of a multi-fact option ("red, up": 0 is the colour, 1 the direction)
    value: str  # that fact's normalised text


def _option_facts(options: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Each option's content split into the facts it combines: 'C. red, up' -> {'C': ('red', 'up')}. When the
    options do not all combine the same number of facts, each is one fact: its whole content."""
    texts = _option_texts(options)
    split = {k: tuple(p for p in map(_normalise, _PART_SPLIT.split(v)) if p) for k, v in texts.items()}
    sizes = {len(p) for p in split.values()}
    if len(sizes) == 1 and sizes.pop() > 1:
        return split
    return {k: (n,) for k, n in ((k, _normalise(v)) for k, v in texts.items()) if n}


def _fact_phrases(facts: dict[str, tuple[str, ...]]) -> dict[tuple[str, ...], set[tuple[int, str]]]:
    """The word sequences that state a fact: the fact itself and, when every option's fact in that slot shares
    leading or trailing words ("moving up", "moving left"), the fact without them ("up" for "moving up")."""
    phrases: dict[tuple[str, ...], set[tuple[int, str]]] = {}
    slots = max((len(f) for f in facts.values()), default=0)
    for slot in range(slots):
        values = sorted({f[slot] for f in facts.values() if len(f) > slot})
        words = {v: tuple(v.split()) for v in values}
        short = dict(words)
        if len(values) > 1:
            seqs = list(words.values())
            head = 0
            while all(len(s) > head + 1 and s[head] == seqs[0][head] for s in seqs):
                head += 1
            tail = 0
            while all(len(s) > head + tail + 1 and s[-1 - tail] == seqs[0][-1 - tail] for s in seqs):
                tail += 1
            stripped = {v: w[head : len(w) - tail] for v, w in words.items()}
            if len(set(stripped.values())) == len(values):
                short = stripped
        for v in values:
            for seq in {words[v], short[v]}:
                phrases.setdefault(seq, set()).add((slot, v))
    return phrases


def _mentions(reasoning: str, facts: dict[str, tuple[str, ...]]) -> list[_Mention]:
    """Where the reasoning states an option's fact, in order. A phrase inside a longer one counts once, as the
    longer ("dark red" is not also "red"); negated facts ("not red", "isn't green") and lists of alternatives
    ("red, green or blue", "red or green?") state nothing."""
    words = [(m.group().lower(), m.start(), m.end()) for m in _WORD.finditer(reasoning)]
    words = [w for w in words if w[0] not in _ARTICLES]
    tokens = [w[0] for w in words]
    found = []  # (first word, end word, slot, value)
    for seq, targets in _fact_phrases(facts).items():
        n = len(seq)
        for i in range(len(tokens) - n + 1):
            if tuple(tokens[i : i + n]) == seq:
                found.extend((i, i + n, slot, value) for slot, value in targets)
    longest_end: dict[int, int] = {}  # first word -> the end of the longest phrase starting there
    for i, j, _, _ in found:
        longest_end[i] = max(j, longest_end.get(i, 0))
    longest = max((j - i for i, j, _, _ in found), default=0)

    def inside_longer(i: int, j: int) -> bool:
        return any(
            longest_end.get(k, 0) >= j and longest_end[k] - k > j - i
            for k in range(max(0, i - longest), i + 1)
        )

    found = [f for f in found if not inside_longer(f[0], f[1])]

    def negated(i: int) -> bool:  # "not red", "isn't green", "not moving left", "rather than blue"
        def same_clause(k: int) -> bool:
            return not re.search(r"[,.;:!?\n]", reasoning[words[k][2] : words[i][1]])

        near = range(max(0, i - 2), i)
        if any(tokens[k] in _NEGATIONS and same_clause(k) for k in near):
            return True
        return i >= 2 and tuple(tokens[i - 2 : i]) in _NEGATING_PAIRS and same_clause(i - 2)

    kept = [
        _Mention(words[i][1], words[j - 1][2], slot, value)
        for i, j, slot, value in sorted(set(found))
        if not negated(i)
    ]
    listed = set()
    for a, b in zip(kept, kept[1:], strict=False):
        gap = reasoning[a.end : b.start]
        if a.slot == b.slot and a.value != b.value and not _SENTENCE_END.search(gap):
            if set(_WORD.findall(gap.lower())) <= _LIST_WORDS:
                listed |= {a, b}
    return [m for m in kept if m not in listed]


def _letters_stated(mentions: list[_Mention], facts: dict[str, tuple[str, ...]]) -> frozenset[str]:
    """The options that agree with the last stated value of every fact; empty when none does or none is stated."""
    if not mentions:
        return frozenset()
    last = {m.slot: m.value for m in mentions}
    return frozenset(k for k, f in facts.items() if all(len(f) > s and f[s] == v for s, v in last.items()))


def _content_claim(
    pos: int, verb: str, mentions: list[_Mention], facts: dict[str, tuple[str, ...]]
) -> list[Claim]:
    letters = _letters_stated(mentions, facts)
    if not letters:
        return []
    last = {m.slot: m.value for m in mentions}
    shown = f"'{', '.join(last[s] for s in sorted(last))}' ({' or '.join(sorted(letters))})"
    return [Claim(pos, verb, letters, shown)]


class _Conclusion(NamedTuple):
    start: int  # the cue
    window_end: int  # the end of the phrase after the cue that holds the conclusion
    letter: str | None
    content: list[_Mention]


def _choice_claims(reasoning: str, options: tuple[str, ...]) -> list[Claim]:
    """What a reasoning claims about a multiple-choice answer: its last conclusion (a letter, an option's
    content or both: "I see blue, so the answer is B" claims C by content and B by letter) and the option
    contents it states around it. After a correction ("Wait, ...") only what follows counts, and the option the
    reasoning just took back is not stated again by naming it in that sentence ("Wait, the red one was the
    background")."""
    facts = _option_facts(options)
    letters = "".join(_option_texts(options)) or "ABCDEFGHIJ"
    mentions = _mentions(reasoning, facts)  # in order of position
    starts = [m.start for m in mentions]
    conclusions = []
    for cue in _CUES["choice"].finditer(reasoning):
        rest = reasoning[cue.end() :]
        end = _SENTENCE_END.search(rest)
        window_end = cue.end() + min(end.start() if end else len(rest), 120)
        strong = bool(cue.group("strong"))
        named = option_letters(reasoning[cue.end() : window_end], letters)
        letter = named[0] if named and (strong or len(set(named)) == 1) else None
        content = mentions[bisect_left(starts, cue.end()) : bisect_left(starts, window_end)]
        if (
            content
            and not strong
            and len({(m.slot, m.value) for m in content}) > len({m.slot for m in content})
        ):
            content = []  # a weak cue followed by several values of one fact concludes none of them
        if content and not _letters_stated(content, facts):
            content = []
        if letter or content:
            conclusions.append(_Conclusion(cue.start(), window_end, letter, content))

    # The last correction that follows something claimed starts the scope; the claim just before it is what it
    # takes back.
    events = [
        (c.window_end, frozenset(c.letter or "") | _letters_stated(c.content, facts)) for c in conclusions
    ]
    events += [(m.end, _letters_stated([m], facts)) for m in mentions]
    events.sort(key=lambda e: e[0])
    scope, retracted, retract_until = 0, frozenset(), 0
    markers = [m for m in _CORRECTION.finditer(reasoning) if events and events[0][0] <= m.start()]
    if markers:
        marker = markers[-1]
        scope = marker.end()
        retracted = [e for e in events if e[0] <= marker.start()][-1][1]
        end = _SENTENCE_END.search(reasoning, marker.end())
        retract_until = end.start() if end else len(reasoning)
    claims = _choice_claims_in(scope, retracted, retract_until, conclusions, mentions, facts)
    if not claims and scope:
        # A correction that states nothing new ("So the answer is B. Wait, let me check.") changes nothing.
        claims = _choice_claims_in(0, frozenset(), 0, conclusions, mentions, facts)
    return claims


def _choice_claims_in(
    scope: int,
    retracted: frozenset[str],
    retract_until: int,
    conclusions: list[_Conclusion],
    mentions: list[_Mention],
    facts: dict[str, tuple[str, ...]],
) -> list[Claim]:
    def counts(m: _Mention) -> bool:
        taken_back = m.start < retract_until and _letters_stated([m], facts) <= retracted
        return m.start >= scope and not taken_back

    mentions = [m for m in mentions if counts(m)]
    conclusions = [c for c in conclusions if c.start >= scope]
    if not conclusions:
        # No conclusion: the stated facts count only when each was stated one way ("The square is red.");
        # "a red square and a blue square" says nothing about which one the answer is.
        if len({(m.slot, m.value) for m in mentions}) > len({m.slot for m in mentions}):
            return []
        return _content_claim(mentions[0].start if mentions else 0, "states", mentions, facts)
    final = conclusions[-1]
    claims = _content_claim(scope, "states", [m for m in mentions if m.start < final.start], facts)
    if final.letter:
        claims.append(Claim(final.start, "concludes", frozenset(final.letter), repr(final.letter)))
    claims += _content_claim(final.start, "concludes", [m for m in final.content if counts(m)], facts)
    claims += _content_claim(
        final.window_end, "states", [m for m in mentions if m.start >= final.window_end], facts
    )
    return claims


# -- numbers


def _sentence_start(text: str, pos: int) -> int:
    ends = [m.end() for m in _SENTENCE_END.finditer(text, 0, pos)]
    return ends[-1] if ends else 0


def _number_claims(reasoning: str) -> list[Claim]:
    """The last number the reasoning concludes ("so the answer is 4", "... is 3") and the value it stated just
    before ("I count 3 squares, so the answer is 4" states 3): the only other number in the conclusion's
    sentence, or the only number before it at all in the sentence before, when stated after a cue ("I count",
    "there are") with no arithmetic ("plus 1", "per frame") and no correction in between."""
    cued = []  # (start, end, value) of the first number after each cue, within its sentence
    for cue in _CUES["number"].finditer(reasoning):
        rest = reasoning[cue.end() :]
        end = _SENTENCE_END.search(rest)
        numbers = find_numbers(rest[: min(end.start() if end else len(rest), 120)])
        if numbers:
            start, stop, value = numbers[0]
            cued.append((cue.end() + start, cue.end() + stop, value))
    if not cued:
        return []
    final = cued[-1]
    claims = [Claim(final[0], "concludes", final[2], repr(final[2]))]
    sentence = _sentence_start(reasoning, final[0])
    corrections = [m.end() for m in _CORRECTION.finditer(reasoning, 0, final[0])]
    region = max([sentence, *corrections])
    numbers = [n for n in find_numbers(reasoning[: final[0]]) if n[0] >= region]
    if not numbers and region == sentence and sentence > 0:
        before = find_numbers(reasoning[: final[0]])
        previous = _sentence_start(reasoning, sentence - 1)
        if len(before) == 1 and before[0][0] >= previous and not any(c > before[0][0] for c in corrections):
            numbers = before
    if len(numbers) == 1:
        start, stop, value = numbers[0]
        starts = {c[0] for c in cued}
        if start in starts and not _ARITHMETIC.search(reasoning[stop : final[0]]):
            claims.insert(0, Claim(start, "states", value, repr(value)))
    return claims


# -- OCR and free-form text


def _readings(reasoning: str) -> list[Claim]:
    """What an OCR reasoning says the text reads: "the sign reads 'EXIT'", "the word on the door is PUSH"."""
    found = []
    for cue in _READING.finditer(reasoning):
        quoted = _QUOTED.match(reasoning, cue.end())
        if quoted:
            text = next(g for g in quoted.groups() if g)
        else:
            rest = reasoning[cue.end() :].lstrip(" :")
            end = _READING_END.search(rest)
            text = rest[: end.start() if end else len(rest)][:120]
        value = _normalise(text)
        if value:
            found.append(Claim(cue.start(), "states", value, repr(value)))
    return found


def _text_claims(reasoning: str, ocr: bool) -> list[Claim]:
    """The last conclusion after a strong cue ("the answer is ...") and, for OCR, the last reading; when one
    follows the other across a correction ("reads STOP. Actually I misread it, so the answer is SHOP") only the
    later counts."""
    conclusions = []
    for cue in _CUES["text"].finditer(reasoning):
        rest = reasoning[cue.end() :]
        end = _SENTENCE_END.search(rest)
        value = _normalise(rest[: end.start() if end else len(rest)][:120])
        if value:
            conclusions.append(Claim(cue.start(), "concludes", value, repr(value)))
    last = [c[-1] for c in (conclusions, _readings(reasoning) if ocr else []) if c]
    last.sort()
    if len(last) == 2 and _CORRECTION.search(reasoning, last[0].pos, last[1].pos):
        last = last[1:]
    return last


def reasoning_claims(
    reasoning: str, kind: str, options: tuple[str, ...] = (), ocr: bool = False
) -> list[Claim]:
    """What a reasoning asserts about its answer, in order: its last conclusion and the observations stated
    with it (see `_choice_claims`, `_number_claims`, `_text_claims`); [] when it concludes and states nothing
    the rules can read."""
    if kind == "choice":
        return _choice_claims(reasoning, options)
    if kind == "number":
        return _number_claims(reasoning)
    return _text_claims(reasoning, ocr)
