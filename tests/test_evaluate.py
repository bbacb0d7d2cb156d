"""Evaluation of a policy: greedy metrics, and sampled metrics with pass@k, seeded and side-effect free."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_veripo.cli import main
from lightning_veripo.data.videoqa import FrameSampling, VideoQADataModule
from lightning_veripo.evaluate import EvalSettings, RenamedKeyError, evaluate, refuse_renamed_keys
from lightning_veripo.grpo import GRPOModule

REPO = Path(__file__).resolve().parents[1]


def test_sampling_at_a_vanishing_temperature_reproduces_the_greedy_figures(backbone, synthetic_dir: Path,
                                                                          frame_sampling: FrameSampling) -> None:  # fmt: skip
    settings = EvalSettings(frame_sampling, max_new_tokens=12, batch_size=4, num_samples=3, temperature=1e-4)
    out = evaluate(backbone, str(synthetic_dir / "train.json"), settings)
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
        settings = EvalSettings(frame_sampling, max_new_tokens=12, batch_size=4, num_samples=4)
        return evaluate(backbone, path, settings, seed=seed)

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
    out = evaluate(backbone, str(synthetic_dir / "val.json"), EvalSettings(frame_sampling, 8, batch_size=4))
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
    out = evaluate(backbone, str(path), EvalSettings(frame_sampling, 8, batch_size=4), answers_path=answers)
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


def test_eval_settings_refuse_impossible_values_naming_each() -> None:
    with pytest.raises(ValueError, match=r"num_samples=-1 must be >= 0.*temperature=0 must be > 0"):
        EvalSettings(num_samples=-1, temperature=0)
    with pytest.raises(ValueError, match=r"max_new_tokens=0 must be >= 1"):
        EvalSettings(max_new_tokens=0)


def test_an_old_evaluation_key_is_refused_naming_the_new_one(tmp_path: Path) -> None:
    """The loop's eval_* and GRPOModule's val_* keys moved into `evaluation`: in a YAML, on the command line or
    in a stage's argument list, each is named with its new key before any work starts."""
    old = tmp_path / "old.yaml"
    old.write_text(
        "eval_num_samples: 4\ngrpo:\n  config: x.yaml\n  args: ['--model.init_args.val_judge=null']\n"
    )
    with pytest.raises(RenamedKeyError) as refused:
        refuse_renamed_keys(["--config", str(old), "--eval_max_new_tokens=8"])
    message = str(refused.value)
    for expected in (f"{old}: eval_num_samples -> evaluation.num_samples",
                     f"{old}: grpo.args[0]: --model.init_args.val_judge -> evaluation.judge",
                     "command line: --eval_max_new_tokens -> evaluation.max_new_tokens"):  # fmt: skip
        assert expected in message
    refuse_renamed_keys(
        ["--config", str(REPO / "configs/demo.yaml"), "--evaluation.num_samples=2"]
    )  # no error
    assert main(["iterate", "--config", str(old)]) == 2
    assert main(["fit", "--config", str(REPO / "configs/demo_grpo.yaml"),
                 "--model.init_args.val_temperature=0.7"]) == 2  # fmt: skip


def test_grpo_validation_logs_sampled_metrics_beside_the_greedy_ones(
    backbone, synthetic_dir: Path, frame_sampling: FrameSampling
) -> None:
    """With `evaluation.num_samples` GRPOModule's validation scores the greedy answer and that many samples; at
    a vanishing temperature the samples are the greedy answer, so the sampled figures equal the greedy ones."""
    module = GRPOModule(backbone, num_generations=2, max_new_tokens=8, log_rollouts_every_n_steps=0,
                        evaluation=EvalSettings(num_samples=2, temperature=1e-4))  # fmt: skip
    data = VideoQADataModule(train_path=str(synthetic_dir / "train.json"), val_path=str(synthetic_dir / "val.json"),
                             sampling=frame_sampling, batch_size=2, val_batch_size=4, shuffle=False)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1)  # fmt: skip
    (out,) = trainer.validate(module, datamodule=data, verbose=False)
    for key in ("accuracy", "format_rate", "inconsistency_rate", "reasoning_tokens"):
        assert out[f"val/sampled_{key}"] == pytest.approx(out[f"val/{key}"]), key
    with pytest.raises(ValueError, match="--data.init_args.sampling"):
        GRPOModule(backbone, evaluation=EvalSettings(frames=frame_sampling))
