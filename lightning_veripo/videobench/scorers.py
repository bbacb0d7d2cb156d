"""Scoring a benchmark the way its authors do: reading the answer, scoring each question, the official tables.

Reading an answer (`read_answer`): the `<answer>…</answer>` content when the completion has one, else the
whole completion. A multiple-choice answer names its option by the letter ("B", "(B)", "b"), the letter with
its text ("B. two chairs", "(B) two chairs") or the option text alone ("two chairs", case and punctuation
aside); anything else names no option and scores 0. A numerical answer is its first number (digits, or a
number word up to twenty: "three").

Per question (`score_item`), by each benchmark's official definition:
- multiple choice, every benchmark: 1 when the named option is the correct one (exact option match).
- VSI-Bench numerical (Yang et al. 2024, "Thinking in Space", Sec. 3.2; lmms-eval `tasks/vsibench/utils.py`):
  Mean Relative Accuracy, the share of thresholds c in {0.50, 0.55, ..., 0.95} with |pred - gt| / gt <= 1 - c.
- Video-MMMU open questions (MMMU's `eval_open`): a number equal to the answer to 2 decimals, else the
  normalised text equal to the answer's.
- Video-R1 files: Video-R1's reward per problem type (lightning_veripo.rewards: numerical = equal number,
  regression = MRA, OCR = 1 - WER, free-form = ROUGE-L).

The headline (`summarize`):
- VSI-Bench (official, lmms-eval `_compute_all_subscores`): the mean over question types of the per-type
  score (accuracy or MRA), after the three object_rel_direction_{easy,medium,hard} types are averaged into
  one. Printed beside it, each named: `video_r1` (Video-R1's evaluation: the multiple-choice accuracy and the
  numerical MRA, separately) and `veripo_item_mean` (the VerIPO evaluation: the mean over all questions).
- MVBench (Li et al. 2024; its leaderboard): the mean of the 20 per-task accuracies.
- Video-MME, MMVU, Video-MMMU, TempCompass, Video-Holmes, Video-R1 files: accuracy over all questions
  (the official overall; per-type tables beside it).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any

from lightning_veripo import parsing, rewards
from lightning_veripo.rewards import mean_relative_accuracy
from lightning_veripo.videobench.items import LETTERS, MULTIPLE_CHOICE, NUMERICAL, BenchItem

_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_LEADING_LETTER = re.compile(r"\(?([A-Z])\)?(?:[.:)]|\s|$)")
VSI_DIRECTION = ("object_rel_direction_easy", "object_rel_direction_medium", "object_rel_direction_hard")


def read_answer(completion: str) -> str:
    """The answer part of a completion: its `<answer>` content, else the whole text (plain prompts)."""
    tagged = parsing.extract_answer(completion)
    return (tagged if tagged is not None else completion).strip()


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())


def chosen_option(answer: str, options: tuple[str, ...]) -> str | None:
    """The letter of the option `answer` names (letter, letter + text, or the text), or None."""
    letters = LETTERS[: len(options)]
    text = _norm(answer)
    for letter, option in zip(letters, options, strict=True):
        if text and text in (_norm(option), _norm(f"{letter} {option}")):
            return letter
    lone = parsing.lone_letter(answer)
    if lone is not None:
        return lone if lone in letters else None
    m = _LEADING_LETTER.match(answer.strip())
    if m and m.group(1) in letters:
        rest = _norm(answer.strip()[m.end() :])
        option = _norm(options[letters.index(m.group(1))])
        # "B. two chairs" names B; "B. three tables" (another option's text after B) names nothing
        if not rest or rest == option or not any(rest == _norm(o) for o in options):
            return m.group(1)
        return None
    return None


def read_number(answer: str) -> float | None:
    """The first number in the answer: digits ("1,200", "3.5") or a number word ("three")."""
    value = parsing.parse_number(answer)
    if value is not None:
        return value
    for word in re.findall(r"[a-z]+", answer.lower()):
        if word in _NUMBER_WORDS:
            return float(_NUMBER_WORDS[word])
    return None


def score_item(benchmark: str, item: BenchItem, completion: str) -> tuple[str | None, float]:
    """(what the answer was read as, the question's score in [0, 1]) by the benchmark's own rule."""
    answer = read_answer(completion)
    if item.kind == MULTIPLE_CHOICE:
        letter = chosen_option(answer, item.options)
        return letter, float(letter == item.answer)
    if benchmark == "video_r1":
        fn = {"numerical": rewards.numerical_accuracy, "regression": rewards.regression_accuracy,
              "OCR": rewards.ocr_accuracy, "free-form": rewards.free_form_accuracy}[item.kind]  # fmt: skip
        return answer, fn(answer, item.answer) if answer else 0.0
    if item.kind == NUMERICAL:
        value = read_number(answer)
        if value is None:
            return None, 0.0
        gt = float(item.answer)
        if benchmark in ("vsibench", "vsibench_debiased"):
            return repr(value), mean_relative_accuracy(value, gt)
        return repr(value), float(math.isclose(round(value, 2), round(gt, 2), abs_tol=1e-9))
    return answer, float(_norm(answer) == _norm(item.answer))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def tables(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per-type tables: column ("task", then each group key) -> row value -> {n, score}; rows sorted."""
    columns: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        columns["task"][row["task"]].append(row["score"])
        for key, value in row.get("groups", {}).items():
            columns[key][value].append(row["score"])
    return {
        column: {value: {"n": len(s), "score": _mean(s)} for value, s in sorted(values.items())}
        for column, values in columns.items()
    }


def summarize(benchmark: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline, its definition's name, the per-type tables and (VSI-Bench) the other conventions.

    `rows` are the scored questions: `task`, `kind`, `groups`, `score` (0..1, the mean over samples)."""
    per_type = tables(rows)
    item_mean = _mean([r["score"] for r in rows])
    out: dict[str, Any] = {"questions": len(rows), "tables": per_type}
    task_scores = {task: cell["score"] for task, cell in per_type.get("task", {}).items()}
    if benchmark in ("vsibench", "vsibench_debiased"):
        direction = [task_scores.pop(t) for t in VSI_DIRECTION if t in task_scores]
        if direction:
            task_scores["object_rel_direction"] = _mean(direction)
        out["headline"] = {"name": "official: mean of the per-task scores (rel_direction averaged first)",
                           "value": _mean(list(task_scores.values()))}  # fmt: skip
        out["task_scores"] = task_scores
        out["conventions"] = {
            "official": out["headline"]["value"],
            "video_r1": {
                "multiple_choice_accuracy": _mean([r["score"] for r in rows if r["kind"] == MULTIPLE_CHOICE]),
                "numerical_mra": _mean([r["score"] for r in rows if r["kind"] == NUMERICAL]),
            },
            "veripo_item_mean": item_mean,
        }
    elif benchmark == "mvbench":
        out["headline"] = {
            "name": "official: mean of the per-task accuracies",
            "value": _mean(list(task_scores.values())),
        }
        out["conventions"] = {"official": out["headline"]["value"], "item_mean": item_mean}
    else:
        out["headline"] = {"name": "official: accuracy over all questions", "value": item_mean}
    return out


def format_summary(benchmark: str, summary: dict[str, Any], config: dict[str, Any]) -> str:
    """The score as printed: the headline, the other conventions, the per-type tables, then the settings."""
    pct = lambda v: "nan" if v != v else f"{100 * v:.1f}"  # noqa: E731
    head = summary["headline"]
    lines = [f"{benchmark}: {pct(head['value'])}  ({head['name']}; {summary['questions']} questions)"]
    conventions = summary.get("conventions", {})
    if "video_r1" in conventions:
        vr1 = conventions["video_r1"]
        lines.append(f"  video_r1 convention: multiple-choice accuracy {pct(vr1['multiple_choice_accuracy'])}, "
                     f"numerical MRA {pct(vr1['numerical_mra'])} (reported separately)")  # fmt: skip
        lines.append(
            f"  veripo_item_mean convention: {pct(conventions['veripo_item_mean'])} (mean over all questions)"
        )
    elif "item_mean" in conventions:
        lines.append(f"  item mean: {pct(conventions['item_mean'])} (mean over all questions)")
    for column, rows in summary["tables"].items():
        width = max(len(r) for r in rows)
        lines.append(f"  by {column}:")
        lines += [
            f"    {name.ljust(width)}  {pct(cell['score']):>5}  (n={cell['n']})"
            for name, cell in rows.items()
        ]
    lines.append("  settings: " + ", ".join(f"{k}={v}" for k, v in _flatten(config).items()))
    return "\n".join(lines)


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
