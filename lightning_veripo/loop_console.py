"""What the loop prints around its stages: a fit's header lines, the stage x metric table, where the results are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning_veripo.console import plural


def read_lines(path: Path) -> list[str]:
    return [x for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def describe_fit(cli: Any, config: str, base_model: str, adapters: list[str], stage_dir: Path,
                 last: Path) -> list[str]:  # fmt: skip
    """A stage header's lines: the fit and its length, the policy it starts from, its data, where it writes."""
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    kind = type(model).__name__.removesuffix("Module") or type(model).__name__
    max_steps, max_epochs = trainer.max_steps, trainer.max_epochs
    per_epoch = ""
    pairs = getattr(data, "pairs_path", None)
    num_pairs = len(read_lines(Path(pairs))) if pairs else None
    batch = getattr(data, "batch_size", None)
    if num_pairs is not None and batch:
        per_epoch = f" of {plural(-(-num_pairs // batch), 'batch')}"
    if max_steps is not None and max_steps > 0:
        length = plural(max_steps, "step")
        if max_epochs is not None and max_epochs >= 0:
            length = f"{plural(max_epochs, 'epoch', 'epochs')}{per_epoch}, at most {length}"
    elif max_epochs is not None and max_epochs >= 0:
        length = f"{plural(max_epochs, 'epoch', 'epochs')}{per_epoch}"
    else:
        length = "no step or epoch limit"
    lines = [f"{kind} fit of {config}: {length}"]
    merged = [_stage_of(a) for a in adapters]
    policy = f"{base_model} + the adapters of {', '.join(merged)}" if merged else base_model
    lines.append(f"from:  {policy}")
    if num_pairs is not None:
        what = f"{plural(num_pairs, 'preference pair')} from {pairs}"
    else:
        what = str(getattr(data, "train_path", None) or type(data).__name__)
        exclude = getattr(data, "exclude_ids_file", None)
        if exclude and Path(exclude).is_file():
            what += f", less {plural(len(json.loads(Path(exclude).read_text())), 'always-solved question')}"
    if batch:
        what += f"; batch {batch}"
    generations = getattr(model, "num_generations", None)
    if isinstance(generations, int):
        what += f" x {generations} rollouts"
    lines.append(f"data:  {what}")
    resume = f" (resuming from {last})" if last.exists() else ""
    lines.append(f"into:  {stage_dir}{resume}")
    return lines


def _stage_of(adapter: str) -> str:
    """`work/iter_1/grpo/adapter` -> `iter_1/grpo`: the stage that left an adapter (its last two path parts
    when the stage is an iteration's, else its directory's name)."""
    parts = Path(adapter).parts[:-1]
    return "/".join(parts[-2:]) if len(parts) >= 2 and parts[-2].startswith("iter_") else parts[-1]


def majority_accuracy(val_path: str) -> float | None:
    """The accuracy of always giving the evaluation set's most common answer (None if it cannot be read)."""
    try:
        answers = [str(r["solution"]).strip() for r in json.loads(Path(val_path).read_text())]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return max(answers.count(a) for a in set(answers)) / len(answers) if answers else None


def print_where(work: Path) -> None:
    """The closing lines: where the results are, and the TensorBoard command."""
    print(f"\nresults in {work}:")
    print(f"  {work / 'metrics.jsonl'}  the evaluation after every stage, one JSON line each")
    print(f"  {work / 'state.json'}  the finished stages: the same command again resumes after them")
    print(
        f"  {work}/<stage>/adapter, {work}/iter_<k>/verifier  each stage's LoRA adapter, the verifier's files"
    )
    print(f"  {work}/<stage>/answers.jsonl  each stage's greedy answer to every evaluation question")
    print(f"TensorBoard: tensorboard --logdir {work / 'tensorboard'}", flush=True)


def print_summary(
    rows: list[dict[str, Any]], majority: float | None = None, title: str | None = None
) -> None:
    print(f"\n{title}:" if title else "")
    keys = ["accuracy", "sampled_accuracy", "format_rate", "reasoning_tokens", "inconsistency_rate", "acc_cons",
            "wall_s"]  # fmt: skip
    names = ["accuracy", "sampled acc", "format", "think tokens", "inconsistent", "acc-cons", "wall s"]
    guarded = any("accepted" in row for row in rows)  # the stage acceptance ran: its dev score and verdict
    if guarded:
        keys, names = [*keys, "dev_accuracy"], [*names, "dev acc"]
    print(
        " | ".join(
            ["stage".ljust(12)] + [n.rjust(12) for n in names] + (["kept".rjust(8)] if guarded else [])
        )
    )
    for row in rows:
        cells = [f"{row[k]:12.3f}" if isinstance(row.get(k), (int, float)) else "-".rjust(12) for k in keys]
        if guarded:
            cells.append({True: "kept", False: "REJECTED"}.get(row.get("accepted"), "-").rjust(8))
        print(" | ".join([row["stage"].ljust(12)] + cells))
    if majority is not None:
        print(f"(always answering the most common answer scores {majority:.3f})")
