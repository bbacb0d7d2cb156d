"""One benchmark question as every reader returns it, and the file reading the readers share.

A reader turns a benchmark's own released file into `BenchItem`s: the question, its option texts (without
their letters), the reference answer (an option letter, or a number as text), the task the official tables
group it under, and the video it is asked about. Errors name the file, the record and the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_veripo.data.videoqa import VideoQAError, read_records

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MULTIPLE_CHOICE, NUMERICAL = "multiple choice", "numerical"
_LETTERED = re.compile(r"^\(?([A-Z])[.:)]\s*(.*)$", re.S)


class BenchmarkError(VideoQAError):
    """A benchmark file, record or field that cannot be used; the message says which and what was expected."""


@dataclass(frozen=True)
class BenchItem:
    """One question of a benchmark, in the fields scoring needs.

    `options` are the option texts without letters (option i is letter LETTERS[i]); `answer` is the correct
    option's letter for multiple choice, the number as text for numerical answers, or the reference text for
    the Video-R1 file's other problem types. `task` is the official per-type table's row; `groups` holds the
    other columns the official tables break down by (duration, domain, ...). `start` / `end` (seconds) bound
    the clip the question is about, when the benchmark gives one; `subtitles` is a subtitle file's path.
    """

    id: str
    question: str
    kind: str
    answer: str
    task: str
    video: str
    options: tuple[str, ...] = ()
    groups: dict[str, str] = field(default_factory=dict)
    start: float | None = None
    end: float | None = None
    subtitles: str | None = None

    def lettered_options(self) -> list[str]:
        return [f"{LETTERS[i]}. {text}" for i, text in enumerate(self.options)]


class Where:
    """Names a record in errors: `file record #i (id=...)`, then the field that is wrong."""

    def __init__(self, source: Path, index: int | str, record: Any) -> None:
        self.source, self.record = source, record
        ident = ""
        if isinstance(record, dict):
            for key in ("id", "question_id", "Question ID", "problem_id", "video_id"):
                if key in record:
                    ident = f" ({key}={record[key]!r})"
                    break
        self.text = f"{source} record {index}{ident}"
        if not isinstance(record, dict):
            raise BenchmarkError(f"{self.text}: expected an object, got {type(record).__name__}")

    def error(self, name: str, problem: str) -> BenchmarkError:
        return BenchmarkError(f"{self.text}: field {name!r} {problem}")

    def get(self, name: str, kind: type | tuple[type, ...] = str) -> Any:
        """The field's value, checked for its type (`str` fields must be non-empty text)."""
        if name not in self.record:
            raise self.error(name, f"is missing (the record has {sorted(self.record)})")
        value = self.record[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.error(name, f"should be {names}, got {type(value).__name__} {value!r}")
        if isinstance(value, str) and not value.strip():
            raise self.error(name, "is empty")
        return value

    def text_list(self, name: str) -> list[str]:
        value = self.get(name, (list, tuple))
        if not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise self.error(name, f"should be a non-empty list of option texts, got {value!r}")
        return list(value)

    def letter(self, name: str, options: tuple[str, ...], value: str | None = None) -> str:
        """A multiple-choice answer field (or its `value`, when the field wraps it): one of the offered
        letters ("B", "(B)", "B." all read as B)."""
        raw = self.get(name) if value is None else value
        m = re.fullmatch(r"\W*([A-Z])\W*", raw.strip())
        letters = LETTERS[: len(options)]
        if m is None or m.group(1) not in letters:
            raise self.error(name, f"should be one of the option letters {list(letters)}, got {raw!r}")
        return m.group(1)

    def number(self, name: str) -> str:
        raw = self.record.get(name)
        try:
            value = float(str(raw).replace(",", ""))
        except ValueError:
            raise self.error(name, f"should be a number for a numerical question, got {raw!r}") from None
        return repr(value) if value != int(value) else str(int(value))


def unletter(options: list[str], where: Where, name: str) -> tuple[str, ...]:
    """Option texts without their "A. " prefixes, which some releases include and others do not.

    Either every option carries its own letter in order (A, B, ...) or none does; a mix is a data error."""
    found = [_LETTERED.match(o.strip()) for o in options]
    if not any(found):
        return tuple(o.strip() for o in options)
    for i, m in enumerate(found):
        if m is None or m.group(1) != LETTERS[i]:
            raise where.error(
                name, f"option {i} {options[i]!r} should start with {LETTERS[i]!r} like the others"
            )
    return tuple(m.group(2).strip() for m in found if m is not None)


def read_table(path: str | Path) -> list[Any]:
    """Rows of a benchmark file: a JSON list, JSON lines, or a Parquet file (as the hub datasets release)."""
    path = Path(path)
    if path.suffix == ".parquet":
        if not path.is_file():
            raise FileNotFoundError(f"benchmark file {path} does not exist")
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's own ArrowInvalid etc. on a file that is not Parquet
            raise BenchmarkError(f"{path}: cannot read as Parquet ({type(e).__name__}: {e})") from e
    return read_records(path)


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A file holding one JSON object (TempCompass keys its questions by video id)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchmarkError(f"{path}: not a JSON file ({e})") from e
    if not isinstance(data, dict):
        raise BenchmarkError(f"{path}: expected a JSON object keyed by video id, got {type(data).__name__}")
    return data


def video_file(root: Path, relative: str, where: Where, name: str) -> str:
    """The absolute path of a record's video under `root`, which must exist."""
    path = (root / relative).absolute()
    if not path.is_file():
        raise where.error(name, f"names video {relative!r}, but {path} does not exist (check video_dir)")
    return str(path)
