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
