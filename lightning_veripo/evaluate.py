"""Evaluate a policy on a Video-R1-format file: accuracy (overall, per type), reasoning length, format rate,
inconsistency rate (judged), Acc-Cons. Greedy decoding, as the paper evaluates; optionally also `num_samples`
completions per question at a temperature (`sampled_*` metrics and `pass_at_k`), which is what RL trains on
and what the verifier sees. `answers_path` keeps every greedy answer (JSON lines), so two policies can be read
side by side on the same questions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lightning_veripo.backbone import VideoLLM
from lightning_veripo.data.videoqa import FrameSampling, VideoQACollator, VideoQADataset
from lightning_veripo.files import write_jsonl_atomic
from lightning_veripo.metrics import ReasoningMetrics, update_reasoning_metrics
from lightning_veripo.parsing import extract_answer
from lightning_veripo.verifier.judges import RuleJudge
from lightning_veripo.verifier.protocol import Judge


@torch.no_grad()
def evaluate(
    backbone: VideoLLM,
    path: str,
    sampling: FrameSampling,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    judge: Judge | None = None,
    root: str | None = None,
    num_samples: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = False,
    answers_path: str | Path | None = None,
) -> dict[str, float]:
    """Metrics of `backbone` (loaded) on the records of `path`, as plain floats.

    Greedy metrics under their plain names (`accuracy`, `inconsistency_rate`, ...). With `num_samples` > 0,
    also the same metrics over `num_samples` sampled completions per question at `temperature` (prefixed
    `sampled_`, each sample counted once) and `pass_at_k`: the share of questions with at least one correct
    sample (k = num_samples). Sampling is seeded by `seed` and leaves the global random state untouched.
    `progress` shows a progress bar (stderr) counting the questions evaluated. With `answers_path`, writes one
    JSON line per question (id, question, options, solution, the greedy completion, its parsed answer, accuracy,
    consistency verdict and the judge's reason), atomically once all are scored."""
    dataset = VideoQADataset(path, root, sampling)
    loader = DataLoader(
        dataset, batch_size=batch_size, collate_fn=VideoQACollator(backbone.processor, sampling)
    )
    greedy, sampled = ReasoningMetrics(), ReasoningMetrics()
    judge = judge or RuleJudge()
    device = next(backbone.hf_model.parameters()).device
    solved, questions = 0, 0
    answers: list[dict[str, Any]] = []
    bar = tqdm(total=len(dataset), desc="evaluate", unit="question", disable=not progress, dynamic_ncols=True)
    with bar, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for batch in loader:
            batch: dict[str, Any] = {
                k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
            }
            records = batch["records"]
            vision = backbone.encode_vision(batch, requires_grad=False)
            completions = backbone.generate(
                batch, num_samples=1, max_new_tokens=max_new_tokens, do_sample=False, vision=vision
            )
            scored = update_reasoning_metrics(greedy, completions.text, records, backbone.tokenizer, judge)
            if answers_path is not None:
                answers += _answer_lines(records, completions.text, scored)
            if num_samples <= 0:
                bar.update(len(records))
                continue
            completions = backbone.generate(
                batch, num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                do_sample=True, vision=vision,
            )  # fmt: skip
            repeated = [r for r in records for _ in range(num_samples)]
            correct = update_reasoning_metrics(
                sampled, completions.text, repeated, backbone.tokenizer, judge
            ).accuracy
            solved += int((correct.view(len(records), num_samples).max(dim=1).values >= 1.0).sum())
            questions += len(records)
            bar.update(len(records))
    out = {k: float(v) for k, v in greedy.compute().items()}
    if num_samples > 0:
        out.update({f"sampled_{k}": float(v) for k, v in sampled.compute().items() if "/" not in k})
        out["pass_at_k"] = solved / max(questions, 1)
    if answers_path is not None:
        Path(answers_path).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl_atomic(answers_path, answers)
    return out


def _answer_lines(records: list[Any], texts: list[str], scored: Any) -> list[dict[str, Any]]:
    return [
        {"problem_id": r.problem_id, "problem": r.problem, "options": r.options, "solution": r.solution,
         "completion": t, "answer": extract_answer(t), "accuracy": float(acc), "consistent": c, "rationale": why}
        for r, t, acc, c, why in zip(records, texts, scored.accuracy.tolist(), scored.consistent, scored.rationale,
                                     strict=True)
    ]  # fmt: skip
