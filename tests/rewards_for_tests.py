"""Reward functions the GRPO tests name by dotted path (`tests.rewards_for_tests.NAME`), as a config would.

Each one makes one behaviour of GRPOModule observable on a tiny random model, whose completions are noise:
a reward it can learn quickly, rewards that vary or stay constant within a group, and one that is constant for
one kind of question only.
"""

from __future__ import annotations

from lightning_veripo.records import VideoQARecord


def contains_answer_tag(completion: str, record: VideoQARecord) -> float:
    """1.0 when the completion holds an `<answer>` tag anywhere: one special token, learnable in a few steps."""
    return 1.0 if "<answer>" in completion else 0.0


def completion_chars(completion: str, record: VideoQARecord) -> float:
    """The completion's length in characters / 100: differs between random completions, so no group is dropped."""
    return len(completion) / 100.0


def constant(completion: str, record: VideoQARecord) -> float:
    """Always 1.0: every group has zero reward std, so dynamic sampling drops every group."""
    return 1.0


def constant_for_colour_questions(completion: str, record: VideoQARecord) -> float:
    """0.0 on "What colour ..." questions (a constant group), the completion's length otherwise."""
    return 0.0 if "colour" in record.problem else completion_chars(completion, record)
