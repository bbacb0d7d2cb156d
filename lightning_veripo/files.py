"""Files a run writes and reads back: JSONL read line by line with errors naming file:line, atomic writes.

The loop's state.json and metrics.jsonl, the verifier's files, evaluation answers and the DPO data all go
through these, so a run killed at any moment leaves each file whole (the old version or the new one).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded JSON) for every non-blank line of a JSONL file, read as bytes: a line that is not
    UTF-8 or not JSON raises ValueError naming `file:line` (a file cut short by a kill shows as its last line).
    The reader of every JSONL file the library writes (the verifier's, pairs.jsonl in `PreferenceDataset`)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text ({err})") from err
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{path}:{lineno}: not a JSON line ({err}); was the file cut short?"
                    ) from err


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write via a temp file in the same directory, fsync, then os.replace: readers (and a run killed half
    way) see the old file or the new one, never a torn one.

    A failed write (disk full, ...) removes the temp file and raises an OSError of the same errno that names
    `path`; text that cannot be encoded as UTF-8 (a lone surrogate) raises ValueError and leaves `path` (and no
    temp file) behind as it was.
    """
    _write_atomic(Path(path), [text])


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """`rows` as JSON lines, written atomically (`write_text_atomic`) and streamed: a file of a million
    rollouts is never one string in memory."""
    _write_atomic(Path(path), (json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _write_atomic(path: Path, chunks: Iterable[str]) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:  # no such folder, no permission: name the file asked for, not the temp file
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                try:
                    data = chunk.encode("utf-8")
                except UnicodeEncodeError as err:
                    raise ValueError(f"cannot write {path}: the text is not valid Unicode ({err})") from err
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are for reading by people and other jobs
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno is not None:
            raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
        raise
