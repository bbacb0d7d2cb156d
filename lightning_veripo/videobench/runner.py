"""`veripo evaluate`: a policy on a benchmark, with per-question answers, per-type tables, the headline score.

    veripo evaluate --policy.base_model Qwen/Qwen2.5-VL-7B-Instruct --policy.adapters '[run/iter_1/grpo/adapter]' \
        --benchmark.name vsibench --benchmark.path VSI-Bench/test.jsonl --benchmark.video_dir VSI-Bench \
        --out_dir evaluation/vsibench

Writes into `out_dir`: `answers.jsonl` (one line per question as it is answered: the completion(s), what the
answer was read as, the score), `results.json` (the settings, the headline, the conventions, the tables) and
`tables.md`. A killed evaluation run again with the same command continues after the answered questions
(each question is answered once); a run with other settings in the same `out_dir` is refused, since its
answers would mix with these.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lightning_veripo.backbone import VideoLLM
from lightning_veripo.data.videoqa import FrameSampling, VideoQACollator
from lightning_veripo.files import write_text_atomic
from lightning_veripo.videobench.items import BenchItem, BenchmarkError
from lightning_veripo.videobench.prompts import BenchDataset, PromptTemplate, rendered_prompt
from lightning_veripo.videobench.readers import Benchmark, read_benchmark
from lightning_veripo.videobench.scorers import format_summary, score_item, summarize


@dataclass
class Policy:
    """The policy to evaluate: a base model plus LoRA adapters merged in order, or a loop work dir's stage.

    Args:
        base_model: the base model's directory or hub name.
        adapters: adapter directories, merged into the base in this order.
        work_dir: a `veripo iterate` work dir; with `stage`, its adapters up to that stage (from state.json).
        stage: the loop stage whose policy to evaluate ("iter_1/dpo", "grpo0", ... as state.json names them).
        dtype: the weights' dtype ("bfloat16" on a GPU; "float32" on CPU).
    """

    base_model: str
    adapters: list[str] = field(default_factory=list)
    work_dir: str | None = None
    stage: str | None = None
    dtype: str = "float32"

    def merged_adapters(self) -> list[str]:
        if (self.work_dir is None) != (self.stage is None):
            raise ValueError("Policy: give work_dir and stage together (a loop stage's policy), or neither")
        if self.work_dir is None:
            return list(self.adapters)
        if self.adapters:
            raise ValueError("Policy: give adapters or a loop stage (work_dir + stage), not both")
        state_path = Path(self.work_dir) / "state.json"
        if not state_path.is_file():
            raise FileNotFoundError(
                f"Policy.work_dir: {state_path} does not exist (not a `veripo iterate` work dir)"
            )
        finished = json.loads(state_path.read_text())["finished"]
        names = [s["stage"] for s in finished]
        if self.stage not in names:
            raise ValueError(
                f"Policy.stage={self.stage!r} is not a finished stage of {state_path}; it has {names}"
            )
        upto = finished[: names.index(self.stage) + 1]
        return [s["adapter"] for s in upto if s.get("adapter")]


@dataclass
class Decoding:
    """How answers are generated. Greedy by default, as the benchmarks' official evaluations decode.

    Args:
        max_new_tokens: the most tokens an answer may have (reasoning templates need ~1024).
        do_sample: sample instead of greedy decoding (needed for num_samples > 1).
        temperature: sampling temperature.
        top_p: nucleus sampling's mass.
        repetition_penalty: transformers' repetition penalty (1.0 = none).
        num_samples: answers per question; a question's score is their mean.
        seed: the sampling seed (the global random state is left untouched).
    """

    max_new_tokens: int = 1024
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_samples: int = 1
    seed: int = 0


def qwen_vl_frames() -> FrameSampling:
    """qwen-vl-utils' video defaults: 2 fps, 4 to 768 frames, 128*28*28 to 768*28*28 pixels per frame."""
    return FrameSampling(
        fps=2.0, min_frames=4, max_frames=768, min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28
    )


def evaluate_benchmark(
    policy: Policy,
    benchmark: Benchmark,
    out_dir: str | None = None,
    frames: FrameSampling = qwen_vl_frames(),  # noqa: B008  (a dataclass instance: jsonargparse's default)
    prompt: PromptTemplate = "video_r1",
    decoding: Decoding = Decoding(),  # noqa: B008
    batch_size: int = 1,
    progress: bool = True,
) -> Path:
    """Evaluate `policy` on `benchmark`; print the score with every setting it depends on; return results.json.

    Args:
        policy: the base model and adapters (or a loop stage).
        benchmark: the benchmark, its files and its variant.
        out_dir: where answers.jsonl, results.json and tables.md go (and where a killed run resumes);
            default `evaluation/<benchmark name>`.
        frames: frame sampling (fps, min/max frames, pixels per frame); qwen-vl-utils' defaults.
        prompt: the prompt template: video_r1, veripo (this library's training prompt) or plain.
        decoding: greedy or sampled decoding, repetition penalty, max new tokens, samples per question.
        batch_size: questions per generate call.
        progress: show a progress bar (stderr).
    """
    adapters = policy.merged_adapters()
    described = {"base_model": policy.base_model, "adapters": [str(Path(a).absolute()) for a in adapters],
                 "dtype": policy.dtype}  # fmt: skip

    def load() -> VideoLLM:
        backbone = VideoLLM(
            policy.base_model, dtype=policy.dtype, merge_adapters=adapters, reference_copy=False
        )
        return backbone.load().to("cuda" if torch.cuda.is_available() else "cpu")

    out = Path(out_dir) if out_dir is not None else Path("evaluation") / benchmark.name
    run_benchmark(load, described, benchmark, out, frames, prompt, decoding, batch_size, progress)
    return out / "results.json"


def run_benchmark(
    load: Callable[[], VideoLLM],
    policy: dict[str, Any],
    benchmark: Benchmark,
    out: Path,
    frames: FrameSampling,
    prompt: PromptTemplate,
    decoding: Decoding,
    batch_size: int = 1,
    progress: bool = True,
    echo: bool = True,
) -> dict[str, Any]:
    """Answer the questions `out/answers.jsonl` lacks with `load()`'s policy (called only if any are left),
    score them all, write tables.md and results.json, print the score (`echo`); returns the summary.

    `policy` describes the policy in the stored settings (a loop passes its stage's)."""
    if decoding.num_samples < 1 or (decoding.num_samples > 1 and not decoding.do_sample):
        raise ValueError(f"Decoding.num_samples={decoding.num_samples}: use 1, or more with do_sample=true")
    items = read_benchmark(benchmark)
    config = {
        "benchmark": {"name": benchmark.name, "path": str(Path(benchmark.path).absolute()), **benchmark.variant()},
        "policy": policy, "frames": asdict(frames), "prompt": prompt, "decoding": asdict(decoding),
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    _check_same_settings(out / "settings.json", config)
    answers_path = out / "answers.jsonl"
    done = _answered(answers_path, {i.id for i in items})
    todo = [i for i in items if i.id not in done]
    if todo:
        _answer(load(), todo, answers_path, frames, prompt, decoding, batch_size, benchmark.name, progress)
        done = _answered(answers_path, {i.id for i in items})
    rows = [scored_row(benchmark.name, i, done[i.id]["completions"]) for i in items]
    summary = summarize(benchmark.name, rows)
    text = format_summary(benchmark.name, summary, config)
    if echo:
        print(text)
    write_text_atomic(out / "tables.md", "```\n" + text + "\n```\n")
    write_text_atomic(
        out / "results.json", json.dumps({"settings": config, **summary}, indent=1, allow_nan=True)
    )
    return summary


def scored_row(benchmark: str, item: BenchItem, completions: list[str]) -> dict[str, Any]:
    """A question's answers.jsonl line: its completions, what each was read as, their scores and mean.

    Results are always scored from the stored completions, so a resumed run scores old and new answers
    by the same (current) rules."""
    scored = [score_item(benchmark, item, text) for text in completions]
    return {"id": item.id, "task": item.task, "kind": item.kind, "groups": item.groups, "answer": item.answer,
            "completions": list(completions), "read_as": [p for p, _ in scored], "scores": [s for _, s in scored],
            "score": sum(s for _, s in scored) / max(len(scored), 1)}  # fmt: skip


def _check_same_settings(path: Path, config: dict[str, Any]) -> None:
    if not path.exists():
        write_text_atomic(path, json.dumps(config, indent=1))
        return
    saved = json.loads(path.read_text())
    if saved != config:
        changed = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
        raise BenchmarkError(
            f"{path.parent} holds answers made with other settings ({', '.join(changed)} differ, see {path}); "
            "use another out_dir, or delete this one to start over"
        )


def _answered(path: Path, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """The answered questions of answers.jsonl by id; a last line cut short by a kill is dropped."""
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").split("\n")
    rows: dict[str, dict[str, Any]] = {}
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines) - 1:  # only the last line can be half-written
                raise BenchmarkError(
                    f"{path}:{number}: not a JSON line; delete the file to start over"
                ) from None
            continue
        if not (
            isinstance(row, dict)
            and isinstance(row.get("id"), str)
            and isinstance(row.get("completions"), list)
        ):
            raise BenchmarkError(f"{path}:{number}: an answer line needs 'id' and a 'completions' list")
        if row["id"] in wanted and row["id"] not in rows:
            rows[row["id"]] = row
            kept.append(line)
    if len(kept) != sum(1 for line in lines if line.strip()):
        write_text_atomic(path, "".join(line + "\n" for line in kept))
    return rows


@torch.no_grad()
def _answer(backbone: VideoLLM, items: list[BenchItem], answers_path: Path, frames: FrameSampling,
            prompt: PromptTemplate, decoding: Decoding, batch_size: int, name: str, progress: bool) -> None:  # fmt: skip
    """Generate and score the answers of `items`, appending each batch's lines to answers.jsonl."""
    device = next(backbone.hf_model.parameters()).device
    by_id = {i.id: i for i in items}
    loader = DataLoader(BenchDataset(items, frames, prompt), batch_size=batch_size,
                        collate_fn=VideoQACollator(backbone.processor, frames, prompt=rendered_prompt))  # fmt: skip
    bar = tqdm(
        total=len(items), desc=f"evaluate {name}", unit="question", disable=not progress, dynamic_ncols=True
    )
    with (
        bar,
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        open(answers_path, "a") as f,
    ):
        torch.manual_seed(decoding.seed)
        for batch in loader:
            records = batch["records"]
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            n = decoding.num_samples
            completions = backbone.generate(
                batch, num_samples=n, max_new_tokens=decoding.max_new_tokens, temperature=decoding.temperature,
                top_p=decoding.top_p, do_sample=decoding.do_sample, repetition_penalty=decoding.repetition_penalty,
            ).text  # fmt: skip
            for row, record in enumerate(records):
                item = by_id[record.problem_id]
                texts = completions[row * n : (row + 1) * n]
                line = {**scored_row(name, item, texts), "prompt": record.problem}
                f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(records))
