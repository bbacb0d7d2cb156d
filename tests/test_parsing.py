"""Reading completions: tags, the format check, option letters and numbers; never raising on any text."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_veripo.parsing import (
    extract_answer,
    extract_tag,
    extract_think,
    is_well_formed,
    lone_letter,
    option_letters,
    parse_number,
)

GOOD = "<think>The square moves right.</think><answer>B</answer>"


# ----------------------------------------------------------------------------- tags


def test_extract_answer_and_think_strip_their_content() -> None:
    text = "<think>\n step one \n</think>\n<answer> B </answer>"
    assert extract_think(text) == "step one"
    assert extract_answer(text) == "B"


def test_extract_answer_takes_the_last_complete_block() -> None:
    assert extract_answer("<answer>A</answer> then <answer>C</answer>") == "C"


def test_extract_answer_ignores_an_unclosed_block() -> None:
    assert extract_answer("<answer>A</answer><answer>C") == "A"
    assert extract_answer("<think>x</think><answer>C") is None


def test_extract_answer_with_a_repeated_opening_tag_takes_the_inner_content() -> None:
    assert extract_answer("<answer><answer>B</answer>") == "B"


def test_extract_answer_spans_lines() -> None:
    assert extract_answer("<answer>two\nlines</answer>") == "two\nlines"


def test_extract_answer_of_an_empty_block_is_empty() -> None:
    assert extract_answer("<answer>  </answer>") == ""


def test_extract_tag_without_the_tag_is_none() -> None:
    assert extract_tag("plain text B", "answer") is None


# ----------------------------------------------------------------------------- format


def test_well_formed_think_then_answer() -> None:
    assert is_well_formed(GOOD)


def test_well_formed_allows_whitespace_around_and_between_blocks() -> None:
    assert is_well_formed("\n <think>a\nb</think>\n\n<answer>B</answer>\n")


@pytest.mark.parametrize(
    "text",
    [
        "<think>a</think><think>b</think><answer>B</answer>",  # two think blocks
        "<think>a</think><answer>A</answer><answer>B</answer>",  # two answers
        "<answer>B</answer><think>a</think>",  # answer before think
        "<think>a</think><answer>B</answer> because red",  # text after the answer
        "Sure! <think>a</think><answer>B</answer>",  # text before the think
        "<think>a</think>so<answer>B</answer>",  # text between the blocks
        "<think>a<answer>B</answer>",  # missing </think>
        "<think>a</think><answer>B",  # missing </answer>
        "<think>a <answer>A</answer></think><answer>B</answer>",  # an answer hidden in the reasoning
        "<answer>B</answer>",  # no reasoning
        "B",
        "",
    ],
)
def test_malformed_completions(text: str) -> None:
    assert not is_well_formed(text)


# ----------------------------------------------------------------------------- letters


@pytest.mark.parametrize(
    ("text", "letters"),
    [
        ("B", ["B"]),
        ("(B)", ["B"]),
        ("B. blue", ["B"]),
        ("B or C", ["B", "C"]),
        ("Bob", []),
        ("the answer is b", []),  # lowercase letters in text are words, not options
        ("A: red, then D", ["A", "D"]),
    ],
)
def test_option_letters(text: str, letters: list[str]) -> None:
    assert option_letters(text) == letters


def test_option_letters_only_looks_for_the_given_letters() -> None:
    assert option_letters("I pick B", letters="ABCD") == ["B"]
    assert option_letters("I pick B", letters="") == []


@pytest.mark.parametrize(
    ("text", "letter"), [("b", "B"), ("(c)", "C"), (" D. ", "D"), ("B or C", None), ("ab", None), ("", None)]
)
def test_lone_letter(text: str, letter: str | None) -> None:
    assert lone_letter(text) == letter


# ----------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("12", 12.0),
        ("12 m", 12.0),
        ("about 1,200 m", 1200.0),
        ("1,234,567.5", 1234567.5),
        ("-3.5 degrees", -3.5),
        ("\u22123", -3.0),  # typeset minus sign
        ("+7", 7.0),
        (".5", 0.5),
        ("1.5e3", 1500.0),
        ("12,34", 12.0),  # not a thousands group: the first number is 12
        ("1,2345", 1.0),
        ("3 then 4", 3.0),
    ],
)
def test_parse_number(text: str, value: float) -> None:
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["", "none", "many", "-", "1e999"])
def test_parse_number_gives_none_without_a_finite_number(text: str) -> None:
    assert parse_number(text) is None


# ----------------------------------------------------------------------------- properties

_PIECES = st.sampled_from(
    [
        "<think>",
        "</think>",
        "<answer>",
        "</answer>",
        "B",
        "(b)",
        " ",
        "\n",
        "1,200",
        "-3.5",
        "e9",
        ".",
        "9" * 400,
    ]
)
ARBITRARY = st.one_of(
    st.text(max_size=200), st.lists(st.one_of(_PIECES, st.text(max_size=8)), max_size=30).map("".join)
)


@settings(max_examples=300, deadline=None)
@given(ARBITRARY)
def test_parsers_never_raise_on_arbitrary_text(text: str) -> None:
    for found in (extract_answer(text), extract_think(text)):
        assert found is None or found == found.strip()
    assert isinstance(is_well_formed(text), bool)
    assert set(option_letters(text)) <= set("ABCDEFGHIJ")
    letter = lone_letter(text)
    assert letter is None or letter.isupper()
    value = parse_number(text)
    assert value is None or math.isfinite(value)


_NO_TAGS = st.characters(blacklist_characters="<>")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=_NO_TAGS, max_size=80), st.text(alphabet=_NO_TAGS, max_size=20))
def test_well_formed_completions_round_trip(think: str, answer: str) -> None:
    text = f"<think>{think}</think><answer>{answer}</answer>"
    assert is_well_formed(text)
    assert extract_think(text) == think.strip()
    assert extract_answer(text) == answer.strip()
