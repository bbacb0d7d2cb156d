"""The GRPO rewards: answer accuracy by problem type, the `<think>/<answer>` format, and reasoning length.

A reward is a plain function `(completion, record) -> float` in [0, 1]; `RewardSet` weights and sums them.
The paper's lineage (MM-EUREKA, Video-R1; see the design notes, "Prompt and answer format") uses
total = 1.0 * accuracy + 0.5 * format: the 0.5 is a weight in the `RewardSet`, not inside `format_reward`,
so every component is logged on the same [0, 1] scale.

Accuracy per Video-R1 problem type:
- multiple choice: the right option letter and no other option letter in the answer;
- numerical: the numbers are equal (relative/absolute tolerance 1e-6);
- regression: Mean Relative Accuracy (VSI-Bench), the paper's rule for numeric spatial answers. Video-R1 itself
  scores regression by 1 - relative error; MRA gives partial credit on the same scale and is what the
  VerIPO benchmarks report, so we use it;
- OCR: 1 - word error rate (case-insensitive), clipped to [0, 1];
- free-form: ROUGE-L F-measure.
"""

from __future__ import annotations

import importlib
import math
import re
import string
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torchmetrics.functional.text import word_error_rate
from torchmetrics.functional.text.rouge import rouge_score

from lightning_veripo import parsing
from lightning_veripo.records import PROBLEM_TYPES, VideoQARecord

RewardFn = Callable[[str, VideoQARecord], float]

NUMERICAL_REL_TOL = 1e-6
NUMERICAL_ABS_TOL = 1e-6
DEFAULT_CHOICE_LETTERS = "ABCD"
# VSI-Bench's confidence thresholds c = 0.50, 0.55, …, 0.95, stored as the tolerances 1 - c = k/20 so that
# 1 - 0.9 is exactly 0.1 (in floats 1 - 0.9 < 0.1, which would fail a 10% error at c = 0.9).
MRA_TOLERANCES = tuple(k / 20 for k in range(1, 11))
_MRA_SLACK = 1e-9  # float noise in |pred - gt| / |gt| (1.1 vs 1.0 gives 0.10000000000000009)


# ----------------------------------------------------------------------------- answers by problem type


def ground_truth(record: VideoQARecord) -> str:
    """The reference answer: the `<answer>` content of `record.solution`, or the whole solution if untagged."""
    tagged = parsing.extract_answer(record.solution)
    return tagged if tagged is not None else record.solution.strip()


def choice_letters(options: Sequence[str], gt_letter: str = "") -> str:
    """The option letters a question offers: A, B, … one per option; A-D (plus the answer's) when none are listed."""
    if options:
        return string.ascii_uppercase[: len(options)]
    return "".join(sorted(set(DEFAULT_CHOICE_LETTERS + gt_letter)))


def _normalise_option(text: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())


def choice_accuracy(pred: str, gt: str, options: Sequence[str] = ()) -> float:
    """1.0 iff `pred` names the letter `gt` names and no other offered letter ("B", "(B)", "B. blue" count).

    A single lowercase letter ("b") counts too. An answer that repeats the full option text ("B. A cat")
    counts even when that text holds another capital letter (the article "A").
    """
    gt_found = parsing.option_letters(gt, string.ascii_uppercase) or [parsing.lone_letter(gt) or ""]
    gt_letter = gt_found[0]
    if not gt_letter:
        raise ValueError(f"the multiple-choice ground truth {gt!r} names no option letter")
    letters = choice_letters(options, gt_letter)
    if gt_letter not in letters:
        raise ValueError(f"the ground truth letter {gt_letter!r} is not one of the options {list(options)}")
    option_text = _normalise_option(options[letters.index(gt_letter)]) if options else ""
    if option_text and _normalise_option(pred) == option_text:
        return 1.0
    lone = parsing.lone_letter(pred)
    named = {lone} if lone is not None else set(parsing.option_letters(pred, letters))
    return 1.0 if named == {gt_letter} else 0.0


def _gt_number(gt: str) -> float:
    value = parsing.parse_number(gt)
    if value is None:
        raise ValueError(f"the numeric ground truth {gt!r} holds no number")
    return value


def numerical_accuracy(
    pred: str, gt: str, rel_tol: float = NUMERICAL_REL_TOL, abs_tol: float = NUMERICAL_ABS_TOL
) -> float:
    """1.0 iff the first numbers in `pred` and `gt` are equal within `rel_tol` or `abs_tol` ("1,200 m" = 1200)."""
    target = _gt_number(gt)
    value = parsing.parse_number(pred)
    if value is None:
        return 0.0
    return 1.0 if math.isclose(value, target, rel_tol=rel_tol, abs_tol=abs_tol) else 0.0


def mean_relative_accuracy(pred: float, gt: float) -> float:
    """VSI-Bench's MRA: the fraction of c in {0.50, 0.55, …, 0.95} with |pred - gt| / |gt| <= 1 - c.

    Relative error 0.1 passes c <= 0.9, i.e. 9 of 10 thresholds: 0.9. With gt = 0 the relative error is
    undefined, so only an exact 0 scores (1.0).
    """
    if gt == 0.0:
        return 1.0 if pred == 0.0 else 0.0
    error = abs(pred - gt) / abs(gt)
    return sum(error <= tol + _MRA_SLACK for tol in MRA_TOLERANCES) / len(MRA_TOLERANCES)


def regression_accuracy(pred: str, gt: str) -> float:
    """Mean Relative Accuracy of the first number in `pred` against the one in `gt`; 0.0 when `pred` has none."""
    target = _gt_number(gt)
    value = parsing.parse_number(pred)
    return 0.0 if value is None else mean_relative_accuracy(value, target)


def _words(text: str) -> str:
    return " ".join(text.lower().split())


def ocr_accuracy(pred: str, gt: str) -> float:
    """1 - word error rate of `pred` against `gt`, case-insensitive, whitespace-normalised, clipped to [0, 1]."""
    pred, gt = _words(pred), _words(gt)
    if not gt or not pred:  # WER divides by the reference's word count
        return 1.0 if pred == gt else 0.0
    wer = float(word_error_rate(pred, gt))
    return min(1.0, max(0.0, 1.0 - wer))


def _rouge_normalise(text: str) -> str:
    """Lowercase, punctuation to spaces; unlike torchmetrics' default it keeps non-ASCII letters and digits."""
    return re.sub(r"[\W_]+", " ", text.lower())


def free_form_accuracy(pred: str, gt: str) -> float:
    """ROUGE-L F-measure of `pred` against `gt` (LCS of lowercased word tokens; no stemming, so no nltk)."""
    pred_tokens, gt_tokens = _rouge_normalise(pred).split(), _rouge_normalise(gt).split()
    if not pred_tokens or not gt_tokens:  # nothing to match: only identical texts score
        return 1.0 if _words(pred) == _words(gt) else 0.0
    scores = rouge_score(pred, gt, rouge_keys="rougeL", normalizer=_rouge_normalise, tokenizer=str.split)
    return min(1.0, max(0.0, float(scores["rougeL_fmeasure"])))


def accuracy_reward(completion: str, record: VideoQARecord) -> float:
    """The answer's accuracy in [0, 1] by the record's problem type; 0.0 without a non-empty `<answer>`."""
    if record.problem_type not in PROBLEM_TYPES:
        raise ValueError(
            f"record {record.problem_id!r} has problem_type {record.problem_type!r}; "
            f"expected one of {list(PROBLEM_TYPES)}"
        )
    pred = parsing.extract_answer(completion)
    if not pred:
        return 0.0
    gt = ground_truth(record)
    try:
        if record.problem_type == "multiple choice":
            return choice_accuracy(pred, gt, record.options)
        if record.problem_type == "numerical":
            return numerical_accuracy(pred, gt)
        if record.problem_type == "regression":
            return regression_accuracy(pred, gt)
        if record.problem_type == "OCR":
            return ocr_accuracy(pred, gt)
        return free_form_accuracy(pred, gt)
    except ValueError as err:  # a ground truth we cannot score is a data error: say which record
        raise ValueError(f"record {record.problem_id!r}: {err}") from err


# ----------------------------------------------------------------------------- format and length


def format_reward(completion: str, record: VideoQARecord) -> float:
    """1.0 when the completion is one `<think>…</think>` then one `<answer>…</answer>`, else 0.0.

    Unweighted: the paper's 0.5 for format is the weight `RewardSet()` gives it.
    """
    return 1.0 if parsing.is_well_formed(completion) else 0.0


class LengthReward:
    """Reasoning length in a window: 1.0 for `min_words` to `max_words` words in `<think>`, less outside it.

    Words (whitespace-separated) stand in for tokens, so the reward needs no tokenizer. Below the window the
    reward is words / min_words, above it max_words / words; no `<think>` gives 0.0. A class with typed
    arguments so a config can build it (`class_path: lightning_veripo.rewards.LengthReward`).

    Args:
        min_words: shortest reasoning that earns the full reward.
        max_words: longest reasoning that earns the full reward.
    """

    name: ClassVar[str] = "length"

    def __init__(self, min_words: int = 32, max_words: int = 512) -> None:
        if not 0 <= min_words <= max_words or max_words < 1:
            raise ValueError(
                f"need 0 <= min_words <= max_words and max_words >= 1, got {min_words}, {max_words}"
            )
        self.min_words = min_words
        self.max_words = max_words

    def __call__(self, completion: str, record: VideoQARecord) -> float:
        think = parsing.extract_think(completion)
        if think is None:
            return 0.0
        words = len(think.split())
        if words < self.min_words:
            return words / self.min_words
        if words > self.max_words:
            return self.max_words / words
        return 1.0

    def __repr__(self) -> str:
        return f"LengthReward(min_words={self.min_words}, max_words={self.max_words})"


# ----------------------------------------------------------------------------- registry and weighted sum

REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "length": LengthReward(),
}


def _name_of(fn: RewardFn) -> str:
    for name, registered in REWARDS.items():
        if registered is fn:
            return name
    return getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__


def _import(path: str) -> RewardFn:
    module_name, _, attr = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"cannot import the reward {path!r}: {err}") from err
    if isinstance(obj, type):  # a reward class: build it with its defaults
        obj = obj()
    if not callable(obj):
        raise ValueError(f"the reward {path!r} is a {type(obj).__name__}, not a callable")
    return obj


def resolve_reward(spec: str | RewardFn) -> tuple[str, RewardFn]:
    """(name, function) for a registry name ("accuracy"), a dotted import path ("pkg.mod.func"), or a callable.

    A dotted path to a class builds it with its defaults; a registered function keeps its registry name.
    """
    if callable(spec):
        return _name_of(spec), spec
    if spec in REWARDS:
        return spec, REWARDS[spec]
    if "." in spec:
        fn = _import(spec)
        name = _name_of(fn)
        return (name if name in REWARDS else spec.rpartition(".")[2]), fn
    raise ValueError(
        f"unknown reward {spec!r}; known rewards: {sorted(REWARDS)}, or give a dotted import path"
    )


class RewardSet:
    """The weighted reward functions of a GRPO run: `total = sum_i weight_i * reward_i(completion, record)`.

    Args:
        names: rewards by registry name ("accuracy", "format", "length"), dotted import path, or callable
            (from a config: `class_path`/`init_args` of a reward class). Default: accuracy and format.
        weights: one weight per reward. Default: 1.0 each; with the default names, the paper's
            accuracy 1.0 + format 0.5.
    """

    def __init__(
        self,
        names: list[str | Callable[[str, VideoQARecord], float]] | None = None,
        weights: list[float] | None = None,
    ) -> None:
        if names is None:
            names = ["accuracy", "format"]
            weights = [1.0, 0.5] if weights is None else weights
        if weights is None:
            weights = [1.0] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} rewards but {len(weights)} weights; give one weight per reward")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"reward weights must be finite numbers, got {list(weights)}")
        resolved = [resolve_reward(spec) for spec in names]
        self.names = [name for name, _ in resolved]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"reward names must be distinct, got {self.names}")
        self.functions = [fn for _, fn in resolved]
        self.weights = [float(w) for w in weights]

    def __repr__(self) -> str:
        return f"RewardSet({dict(zip(self.names, self.weights, strict=True))})"

    def score(
        self, completions: list[str], records: list[VideoQARecord]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Unweighted components {name: float32 [N]} and the weighted total [N] for N (completion, record) pairs.

        A reward that raises becomes a RuntimeError naming the reward and the record; a reward that returns
        NaN or inf, or a value (or weighted total) beyond float32's range, a ValueError: a bad value must
        never reach the advantages silently.
        """
        if len(completions) != len(records):
            raise ValueError(f"{len(completions)} completions but {len(records)} records; they must pair up")
        components: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(completions), dtype=torch.float32)
        for name, fn, weight in zip(self.names, self.functions, self.weights, strict=True):
            values = [_call(name, fn, c, r) for c, r in zip(completions, records, strict=True)]
            components[name] = torch.tensor(values, dtype=torch.float32)
            total += weight * components[name]
            bad = (~torch.isfinite(components[name]) | ~torch.isfinite(total)).nonzero().flatten().tolist()
            if bad:
                i = bad[0]
                raise ValueError(
                    f"reward {name!r} returned {values[i]!r} (weight {weight}) for "
                    f"problem_id={records[i].problem_id!r}: the value or the weighted total overflows float32"
                )
        return components, total


def _call(name: str, fn: RewardFn, completion: str, record: VideoQARecord) -> float:
    """One reward value, checked: errors and non-finite values name the reward and the record."""
    try:
        value = fn(completion, record)
    except Exception as err:
        raise RuntimeError(
            f"reward {name!r} failed on problem_id={record.problem_id!r}: {type(err).__name__}: {err}"
        ) from err
    try:
        value = float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"reward {name!r} returned {value!r} for problem_id={record.problem_id!r}; expected a float"
        ) from err
    if not math.isfinite(value):
        raise ValueError(
            f"reward {name!r} returned {value} for problem_id={record.problem_id!r}; must be finite"
        )
    return value
