"""The evaluation metrics behind `metrics.jsonl` and the loop's table, checked against hand-computed values.

Ten fixed rollouts cover the five problem types, consistent / inconsistent / unjudged verdicts of the rule
judge, partial credit (OCR's word error rate, regression's MRA), a truncated output and malformed ones. The
reasoning is counted in whitespace words by `WordTokenizer`, so every expected number below can be checked by
reading the texts; one test repeats the count with the tiny model's real tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_veripo import grpo
from lightning_veripo.metrics import ReasoningMetrics, update_reasoning_metrics
from lightning_veripo.parsing import extract_think, is_well_formed
from lightning_veripo.records import Rollout, VideoQARecord
from lightning_veripo.rewards import accuracy_reward
from lightning_veripo.verifier.judges import RuleJudge
from lightning_veripo.verifier.protocol import Judge, JudgeItem, Verdict


def _record(
    pid: str, problem_type: str, problem: str, answer: str, options: tuple[str, ...] = ()
) -> VideoQARecord:
    return VideoQARecord(
        problem_id=pid,
        problem=problem,
        data_type="video",
        problem_type=problem_type,
        solution=f"<answer>{answer}</answer>",
        options=options,
    )


CHOICE = _record("mc", "multiple choice", "What colour is the square?", "C",
                 ("A. red", "B. green", "C. blue", "D. yellow"))  # fmt: skip
NUMBER = _record("num", "numerical", "How many squares are there?", "3")
OCR = _record("ocr", "OCR", "What does the sign read?", "EXIT NOW")
FREE = _record("free", "free-form", "What happens?", "the square moves left")
REGRESSION = _record("reg", "regression", "How far does it move, in metres?", "10")

# (completion, record, accuracy, well formed, rule judge's verdict, words inside <think>)
ROLLOUTS: list[tuple[str, VideoQARecord, float, bool, bool | None, int]] = [
    # right and consistent
    ("<think>The square is blue, so the answer is C.</think><answer>C</answer>", CHOICE, 1.0, True, True, 9),
    # wrong, and the answer contradicts the reasoning
    ("<think>I see red, so the answer is A.</think><answer>B</answer>", CHOICE, 0.0, True, False, 8),
    # right by luck: the reasoning concludes another option (counts for accuracy, not for Acc-Cons)
    ("<think>The square is red, so the answer is A.</think><answer>C</answer>", CHOICE, 1.0, True, False, 9),
    # malformed: no tags at all (no answer, so no credit; nothing to judge)
    ("C", CHOICE, 0.0, False, None, 0),
    ("<think>I count 3 squares, so the answer is 3.</think><answer>3</answer>", NUMBER, 1.0, True, True, 9),
    # the reasoning states no number: the rule judge cannot tell (unjudged)
    ("<think>hmm</think><answer>4</answer>", NUMBER, 0.0, True, None, 1),
    # OCR partial credit: 1 - WER("exit", "exit now") = 0.5
    ("<think>The sign reads EXIT NOW.</think><answer>exit</answer>", OCR, 0.5, True, True, 5),
    # malformed (text before the tags) but right and consistent
    (
        "Sure. <think>So the answer is the square moves left.</think><answer>the square moves left</answer>",
        FREE,
        1.0,
        False,
        True,
        8,
    ),  # fmt: skip
    # regression: MRA of 11 against 10 (relative error 0.1 passes 9 of the 10 thresholds) = 0.9
    (
        "<think>It is about 11 metres, so the answer is 11.</think><answer>11</answer>",
        REGRESSION,
        0.9,
        True,
        True,
        10,
    ),  # fmt: skip
    # truncated mid-reasoning: no closed <think>, no answer
    ("<think>The square moves and moves and", REGRESSION, 0.0, False, None, 0),
]

# By hand from the table: 10 rollouts; correct 1+0+1+0 (choice) + 1+0 (numerical) + 0.5 + 1 + 0.9+0 = 5.4;
# words 9+8+9+0+9+1+5+8+10+0 = 59; well formed 7; judged 7 of which 2 inconsistent; accuracy of the
# consistent ones 1+1+0.5+1+0.9 = 4.4.
EXPECTED = {
    "accuracy": 0.54,
    "reasoning_tokens": 5.9,
    "format_rate": 0.7,
    "inconsistency_rate": 2 / 7,
    "acc_cons": 0.44,
    "accuracy/multiple_choice": 0.5,
    "accuracy/numerical": 0.5,
    "accuracy/ocr": 0.5,
    "accuracy/free_form": 1.0,
    "accuracy/regression": 0.45,
}


class WordTokenizer:
    """Counts whitespace words, so the expected reasoning lengths can be read off the texts."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[str]]:
        return {"input_ids": text.split()}


def _computed(metrics: ReasoningMetrics) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.compute().items()}


def test_the_fixed_rollouts_are_what_the_table_says() -> None:
    """The table's per-rollout columns, from the library's own parsing, rewards and rule judge."""
    texts = [t for t, *_ in ROLLOUTS]
    records = [r for _, r, *_ in ROLLOUTS]
    assert [accuracy_reward(t, r) for t, r in zip(texts, records, strict=True)] == pytest.approx(
        [a for _, _, a, *_ in ROLLOUTS]
    )
    assert [is_well_formed(t) for t in texts] == [w for *_, w, _, _ in ROLLOUTS]
    assert [len((extract_think(t) or "").split()) for t in texts] == [n for *_, n in ROLLOUTS]
    items = [JudgeItem.from_rollout(_rollout(t, r)) for t, r in zip(texts, records, strict=True)]
    verdicts = RuleJudge().judge(items)
    assert [v.consistent for v in verdicts] == [c for *_, c, _ in ROLLOUTS], [v.rationale for v in verdicts]


def _rollout(text: str, record: VideoQARecord) -> Rollout:
    return Rollout(record=record, completion=text, completion_ids=[], rewards={}, reward=0.0, advantage=0.0,
                   group_mean_accuracy=0.0, truncated=False, step=0, sample_index=0)  # fmt: skip


def test_update_reasoning_metrics_gives_the_hand_computed_values() -> None:
    metrics = ReasoningMetrics()
    texts = [t for t, *_ in ROLLOUTS]
    records = [r for _, r, *_ in ROLLOUTS]
    update_reasoning_metrics(metrics, texts, records, WordTokenizer(), RuleJudge())

    out = _computed(metrics)
    assert out.keys() == EXPECTED.keys()
    for key, value in EXPECTED.items():
        assert out[key] == pytest.approx(value, abs=1e-6), key


def test_metrics_accumulate_over_batches_like_one_batch_and_reset() -> None:
    """Sums and counts: two uneven batches give the one-batch values; reset forgets everything."""
    metrics = ReasoningMetrics()
    texts = [t for t, *_ in ROLLOUTS]
    records = [r for _, r, *_ in ROLLOUTS]
    update_reasoning_metrics(metrics, texts[:3], records[:3], WordTokenizer(), RuleJudge())
    update_reasoning_metrics(metrics, texts[3:], records[3:], WordTokenizer(), RuleJudge())
    for key, value in EXPECTED.items():
        assert _computed(metrics)[key] == pytest.approx(value, abs=1e-6), key

    metrics.reset()
    update_reasoning_metrics(metrics, texts[:1], records[:1], WordTokenizer(), RuleJudge())
    assert _computed(metrics) == pytest.approx(
        {
            "accuracy": 1.0,
            "reasoning_tokens": 9.0,
            "format_rate": 1.0,
            "inconsistency_rate": 0.0,
            "acc_cons": 1.0,
            "accuracy/multiple_choice": 1.0,
        }  # fmt: skip
    )  # per-type accuracy only for the types seen


class FixedJudge:
    """A judge whose verdicts are given: isolates the metric's arithmetic from the rule judge."""

    def __init__(self, consistent: list[bool | None]) -> None:
        self.consistent = consistent
        self.items: list[JudgeItem] = []

    def judge(self, items: list[JudgeItem]) -> list[Verdict]:
        self.items.extend(items)
        return [Verdict(consistent=c) for c in self.consistent]


def test_unjudged_rollouts_count_for_accuracy_but_neither_for_inconsistency_nor_acc_cons() -> None:
    """Four right answers: judged consistent, inconsistent, unjudged, unjudged. Inconsistency is over the judged
    (1 of 2); Acc-Cons is over all four (only the consistent one counts)."""
    judge = FixedJudge([True, False, None, None])
    assert isinstance(judge, Judge)
    right = "<think>The square is blue, so the answer is C.</think><answer>C</answer>"
    metrics = ReasoningMetrics()
    update_reasoning_metrics(metrics, [right] * 4, [CHOICE] * 4, WordTokenizer(), judge)

    out = _computed(metrics)
    assert out["accuracy"] == 1.0
    assert out["inconsistency_rate"] == pytest.approx(0.5)
    assert out["acc_cons"] == pytest.approx(0.25)
    # The judge sees what update_reasoning_metrics parsed out of each completion.
    item = judge.items[0]
    assert (item.problem_id, item.question, item.options, item.problem_type) == (
        "mc", CHOICE.problem, CHOICE.options, "multiple choice",
    )  # fmt: skip
    assert item.reasoning == "The square is blue, so the answer is C." and item.answer == "C"


def test_no_judged_rollout_gives_inconsistency_zero_not_nan() -> None:
    metrics = ReasoningMetrics()
    update_reasoning_metrics(
        metrics, ["C", "no tags"], [CHOICE, NUMBER], WordTokenizer(), FixedJudge([None, None])
    )
    out = _computed(metrics)
    assert out == pytest.approx({"accuracy": 0.0, "reasoning_tokens": 0.0, "format_rate": 0.0,
                                 "inconsistency_rate": 0.0, "acc_cons": 0.0, "accuracy/multiple_choice": 0.0,
                                 "accuracy/numerical": 0.0})  # fmt: skip


def test_an_unknown_problem_type_is_an_error() -> None:
    with pytest.raises(ValueError):
        ReasoningMetrics().update(["essay"], torch.ones(1), torch.zeros(1), torch.ones(1), [True])


def test_reasoning_tokens_are_counted_with_the_real_tokenizer(tiny_model_dir: Path) -> None:
    """With the tiny model's tokenizer: the mean over all rollouts of len(tokenize(<think> text)), 0 without one."""
    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(tiny_model_dir).tokenizer
    texts = [t for t, *_ in ROLLOUTS]
    records = [r for _, r, *_ in ROLLOUTS]
    metrics = ReasoningMetrics()
    update_reasoning_metrics(metrics, texts, records, tokenizer, RuleJudge())

    counts = [len(tokenizer(extract_think(t), add_special_tokens=False)["input_ids"]) if extract_think(t) else 0
              for t in texts]  # fmt: skip
    assert sum(c > 0 for c in counts) == 8
    assert _computed(metrics)["reasoning_tokens"] == pytest.approx(sum(counts) / len(texts))
    assert _computed(metrics)["accuracy"] == pytest.approx(EXPECTED["accuracy"])


def test_update_reasoning_metrics_is_still_importable_from_grpo() -> None:
    assert grpo.update_reasoning_metrics is update_reasoning_metrics
