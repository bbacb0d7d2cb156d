"""Evaluate a policy on a Video-R1-format file: accuracy (overall, per type), reasoning length, format rate,
inconsistency rate (judged), Acc-Cons. Greedy decoding, as the paper evaluates; optionally also `num_samples`
completions per question at a temperature (`sampled_*` metrics and `pass_at_k`), which is what RL trains on
and what the verifier sees. `answers_path` keeps every greedy answer (JSON lines), so two policies can be read
side by side on the same questions.

`EvalSettings` is the one description of how a policy is evaluated (frames, decoding, samples, judge): the loop's
evaluation after every stage (`iterate(evaluation=...)`), GRPOModule's validation and test (`evaluation`) and the
effectiveness lab all take it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lightning_veripo.backbone import VideoLLM
from lightning_veripo.data.videoqa import FrameSampling, VideoQACollator, VideoQADataset
from lightning_veripo.files import write_jsonl_atomic
from lightning_veripo.metrics import ReasoningMetrics, update_reasoning_metrics
from lightning_veripo.parsing import extract_answer
from lightning_veripo.verifier.judges import RuleJudge
from lightning_veripo.verifier.protocol import Judge

# The evaluation arguments that EvalSettings replaced, and where each now is.
RENAMED_KEYS = {
    "eval_sampling": "evaluation.frames",
    "eval_max_new_tokens": "evaluation.max_new_tokens",
    "eval_batch_size": "evaluation.batch_size",
    "eval_num_samples": "evaluation.num_samples",
    "eval_temperature": "evaluation.temperature",
    "eval_judge": "evaluation.judge",
    "val_max_new_tokens": "evaluation.max_new_tokens",
    "val_temperature": "evaluation.num_samples and evaluation.temperature (greedy is always scored)",
    "val_judge": "evaluation.judge",
}
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class EvalSettings:
    """How a policy is evaluated. Every question is answered greedily (as the paper evaluates); with
    `num_samples` > 0 also that many times by sampling at `temperature` (the `sampled_*` metrics and
    `pass_at_k`: what RL trains on and what the verifier sees).

    Args:
        frames: how the evaluation videos are sampled; None = `FrameSampling()`. GRPOModule's validation reads
            the data module's batches, whose `sampling` decides the frames: leave it None there.
        max_new_tokens: the completion budget; None = 256 (GRPOModule: its own `max_new_tokens`).
        repetition_penalty: transformers' repetition penalty in every evaluation generate call (1.0 = none).
        num_samples: sampled completions per question besides the greedy one (0 = greedy only).
        temperature: the temperature of those samples.
        batch_size: questions per generate call; None = 8 (GRPOModule: the data module's `val_batch_size`).
        judge: the judge of the consistency metrics; None = the loop's verifier judge (GRPOModule: the rules).
    """

    frames: FrameSampling | None = None
    max_new_tokens: int | None = None
    repetition_penalty: float = 1.0
    num_samples: int = 0
    temperature: float = 1.0
    batch_size: int | None = None
    judge: Judge | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1 (or null for the default)")
        if self.batch_size is not None and self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} must be >= 1 (or null for the default)")
        if self.num_samples < 0:
            problems.append(f"num_samples={self.num_samples} must be >= 0 (0 = greedy only)")
        if self.temperature <= 0:
            problems.append(f"temperature={self.temperature} must be > 0 (greedy is always scored)")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty={self.repetition_penalty} must be > 0 (1.0 = none)")
        if problems:
            raise ValueError("EvalSettings: " + "; ".join(problems))


class RenamedKeyError(ValueError):
    """A config or command line uses an evaluation key that `EvalSettings` replaced."""


def renamed_keys(config: Any, source: str, path: str = "") -> list[str]:
    """Every old evaluation key (`RENAMED_KEYS`) in a parsed config from `source` (nested dicts and lists, and
    `--flags` written in lists of stage arguments), each as "source: key path -> new key"."""
    found = []
    if isinstance(config, dict):
        for key, value in config.items():
            here = f"{path}.{key}" if path else str(key)
            if key in RENAMED_KEYS:
                found.append(f"{source}: {here} -> {RENAMED_KEYS[key]}")
            found += renamed_keys(value, source, here)
    elif isinstance(config, list):
        for i, value in enumerate(config):
            found += renamed_keys(value, source, f"{path}[{i}]")
    elif isinstance(config, str) and config.startswith("--"):
        flag = config.partition("=")[0]
        if flag[2:].split(".")[-1] in RENAMED_KEYS:
            where = f"{path}: " if path else ""
            found.append(f"{source}: {where}{flag} -> {RENAMED_KEYS[flag[2:].split('.')[-1]]}")
    return found


def refuse_renamed_keys(args: list[str]) -> None:
    """Raise `RenamedKeyError` naming the new key for every old evaluation key in a command line: its flags
    and the YAML files it passes with `--config` (instead of jsonargparse's bare "unexpected key")."""
    found: list[str] = []
    for i, arg in enumerate(args):
        path = None
        if arg == "--config" and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--config="):
            path = arg.partition("=")[2]
        if path is not None and Path(path).is_file():
            found += renamed_keys(yaml.safe_load(Path(path).read_text()), path)
        elif path is None:
            found += renamed_keys(arg, "command line")
    if found:
        raise RenamedKeyError(
            "evaluation settings moved into `evaluation` (EvalSettings; `--help` lists them): "
            + "; ".join(found)
        )


@torch.no_grad()
def evaluate(
    backbone: VideoLLM,
    path: str,
    settings: EvalSettings | None = None,
    judge: Judge | None = None,
    root: str | None = None,
    seed: int = 0,
    progress: bool = False,
    answers_path: str | Path | None = None,
) -> dict[str, float]:
    """Metrics of `backbone` (loaded) on the records of `path` under `settings`, as plain floats. The judge of
    the consistency metrics is `settings.judge`, else `judge`, else the rule judge.

    Greedy metrics under their plain names (`accuracy`, `inconsistency_rate`, ...). With `num_samples` > 0,
    also the same metrics over `num_samples` sampled completions per question at `temperature` (prefixed
    `sampled_`, each sample counted once) and `pass_at_k`: the share of questions with at least one correct
    sample (k = num_samples). Sampling is seeded by `seed` and leaves the global random state untouched.
    `progress` shows a progress bar (stderr) counting the questions evaluated. With `answers_path`, writes one
    JSON line per question (id, question, options, solution, the greedy completion, its parsed answer, accuracy,
    consistency verdict and the judge's reason), atomically once all are scored."""
    settings = settings or EvalSettings()
    sampling = settings.frames or FrameSampling()
    max_new_tokens = settings.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    num_samples, penalty = settings.num_samples, settings.repetition_penalty
    dataset = VideoQADataset(path, root, sampling)
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size or DEFAULT_BATCH_SIZE,
        collate_fn=VideoQACollator(backbone.processor, sampling),
    )
    greedy, sampled = ReasoningMetrics(), ReasoningMetrics()
    judge = settings.judge or judge or RuleJudge()
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
                batch,
                num_samples=1,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                vision=vision,
                repetition_penalty=penalty,
            )
            scored = update_reasoning_metrics(greedy, completions.text, records, backbone.tokenizer, judge)
            if answers_path is not None:
                answers += _answer_lines(records, completions.text, scored)
            if num_samples <= 0:
                bar.update(len(records))
                continue
            completions = backbone.generate(
                batch, num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=settings.temperature,
                do_sample=True, vision=vision, repetition_penalty=penalty,
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
