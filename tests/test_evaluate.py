"""Evaluation of a policy: greedy metrics, and sampled metrics with pass@k, seeded and side-effect free."""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_veripo.data.videoqa import FrameSampling
from lightning_veripo.evaluate import evaluate


def test_sampling_at_a_vanishing_temperature_reproduces_the_greedy_figures(backbone, synthetic_dir: Path,
                                                                          frame_sampling: FrameSampling) -> None:  # fmt: skip
    out = evaluate(backbone, str(synthetic_dir / "train.json"), frame_sampling, max_new_tokens=12, batch_size=4,
                   num_samples=3, temperature=1e-4)  # fmt: skip
    for key in ("accuracy", "format_rate", "reasoning_tokens", "inconsistency_rate", "acc_cons"):
        assert out[f"sampled_{key}"] == out[key], key
    # every sample is the greedy completion, so a question is solved by some sample exactly when greedy solves it
    assert out["pass_at_k"] == out["accuracy"]


def test_sampled_figures_are_seeded_and_leave_the_global_random_state_alone(backbone, synthetic_dir: Path,
                                                                           frame_sampling: FrameSampling) -> None:  # fmt: skip
    path = str(synthetic_dir / "train.json")
    sampled: list[list[str]] = []
    generate = backbone.generate

    def spy(batch, **kwargs):  # the real generate; keeps what the sampled calls returned
        out = generate(batch, **kwargs)
        if kwargs.get("do_sample"):
            sampled[-1].extend(out.text)
        return out

    backbone.generate = spy

    def run(seed: int) -> dict[str, float]:
        sampled.append([])
        return evaluate(
            backbone, path, frame_sampling, max_new_tokens=12, batch_size=4, num_samples=4, seed=seed
        )

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = run(5)
    assert torch.equal(torch.rand(3), expected_next)
    assert run(5) == first and sampled[1] == sampled[0]
    run(6)
    assert sampled[2] != sampled[0], (
        "another seed draws other samples from the random model's flat distribution"
    )
    assert len(sampled[0]) == 8 * 4
    assert 0.0 <= first["sampled_accuracy"] <= first["pass_at_k"] <= 1.0


def test_without_samples_only_the_greedy_figures_are_reported(backbone, synthetic_dir: Path,
                                                             frame_sampling: FrameSampling) -> None:  # fmt: skip
    out = evaluate(backbone, str(synthetic_dir / "val.json"), frame_sampling, max_new_tokens=8, batch_size=4)
    assert "pass_at_k" not in out and not any(k.startswith("sampled_") for k in out)
    assert {"accuracy", "inconsistency_rate", "acc_cons", "reasoning_tokens", "format_rate"} <= out.keys()


def test_answers_file_keeps_every_greedy_answer_with_the_scores_behind_the_metrics(
    backbone, synthetic_dir: Path, frame_sampling: FrameSampling, tmp_path: Path
) -> None:
    """The answers file has one line per question, in file order, and its accuracy / verdicts are exactly what
    the reported figures average. The greedy texts are replaced by scripted ones (right, wrong, right but
    contradicting its reasoning) so every branch of the scoring is taken; the random model never answers."""
    import json

    from lightning_veripo.rewards import ground_truth

    path = synthetic_dir / "val.json"
    generate = backbone.generate
    kinds = ["right", "wrong", "inconsistent"]

    def scripted(batch, **kwargs):
        out = generate(batch, **kwargs)
        if kwargs.get("do_sample"):
            return out
        texts = []
        for i, record in enumerate(batch["records"]):
            gt = ground_truth(record)
            letters = [o[0] for o in record.options]
            other = letters[(letters.index(gt) + 1) % len(letters)] if gt in letters else str(int(gt) + 1)
            said, answer = {"right": (gt, gt), "wrong": (other, other), "inconsistent": (other, gt)}[
                kinds[i % 3]
            ]
            texts.append(
                f"<think>Looking at every frame, the answer is {said}.</think><answer>{answer}</answer>"
            )
        return out._replace(text=texts)

    backbone.generate = scripted
    answers = tmp_path / "stage" / "answers.jsonl"
    out = evaluate(backbone, str(path), frame_sampling, max_new_tokens=8, batch_size=4, answers_path=answers)
    lines = [json.loads(x) for x in answers.read_text().splitlines()]
    records = json.loads(path.read_text())
    assert [x["problem_id"] for x in lines] == [r["problem_id"] for r in records]
    assert [x["solution"] for x in lines] == [r["solution"] for r in records]
    assert len(lines) == 4, "one batch: the i-th line got kinds[i % 3]"
    expected_acc = [1.0, 0.0, 1.0, 1.0]
    assert [x["accuracy"] for x in lines] == expected_acc
    assert [x["consistent"] for x in lines] == [True, True, False, True]
    assert all(x["completion"].endswith(f"<answer>{x['answer']}</answer>") for x in lines)
    assert out["accuracy"] == sum(expected_acc) / len(lines)
    assert abs(out["inconsistency_rate"] - sum(not x["consistent"] for x in lines) / len(lines)) < 1e-6
    assert not list(answers.parent.glob(".*.tmp")), "written atomically, no temporary left"
