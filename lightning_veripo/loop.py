"""The VerIPO loop (the paper's Figure 1): GRPO fit -> Rollout-Aware Verifier -> DPO fit, repeated.

    [sft warm start]  [reasoning-activation GRPO]
    for k in 1..iterations:
        iter_k/grpo      GRPO fit (VerifierCallback attached) from the current policy
        iter_k/verifier  rollouts.jsonl, verdicts.jsonl, pairs.jsonl, stats.json
        iter_k/dpo       DPO fit on pairs.jsonl, reference = the GRPO policy (or, with `guards.dpo_from:
                         before_grpo`, the policy that GRPO stage started from); skipped when the judge's audit
                         on labelled rollouts of the task is below `guards.min_judge_accuracy` (judge_gate.py)
        next GRPO data drops `discard_solved_fraction` of the questions that were always solved

Each stage is a LightningCLI fit of its own YAML (any `veripo fit` config), given the current policy by
overriding the backbone: the base model plus the adapters of the finished stages, merged in order, and a fresh
LoRA adapter (so "adapter disabled" is exactly the stage's starting policy: the reference of GRPO's KL and of
DPO). Weights pass between stages as adapter directories. With `guards.accept: no_worse` a GRPO or DPO stage
is kept only if its policy is not worse on a development slice than the one it would replace (acceptance.py); a
rejected stage's adapter stays on disk and the next stage starts from the kept policy. `state.json` records the finished stages; running the
same command again skips them, and resumes an interrupted fit from its `last.ckpt`.

The console (lightning_veripo.console): a header per stage, a line for each stage skipped and why, evaluation
progress on stderr; the stage x metric table and where the results are on stdout; the library noise that
repeats at every stage silenced.
"""

from __future__ import annotations

import contextlib
import json
import random
import resource
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_veripo import preemption, stage_processes
from lightning_veripo.acceptance import Guards, decide
from lightning_veripo.backbone import VideoLLM
from lightning_veripo.callbacks.verifier import VerifierCallback, verify_checkpoint
from lightning_veripo.console import header, held_back, plural, quiet, say
from lightning_veripo.data.videoqa import FrameSampling
from lightning_veripo.evaluate import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, EvalSettings, evaluate
from lightning_veripo.files import write_text_atomic
from lightning_veripo.judge_gate import JudgeGate
from lightning_veripo.loggers import log_scalars
from lightning_veripo.loop_console import (
    describe_fit,
    majority_accuracy,
    print_summary,
    print_where,
    read_lines,
)
from lightning_veripo.loop_state import LoopState
from lightning_veripo.stage_cli import VeripoCLI
from lightning_veripo.tiny import Arch, make_tiny_model
from lightning_veripo.verifier.judges import RuleJudge
from lightning_veripo.verifier.pairs import PairConfig
from lightning_veripo.verifier.protocol import Judge
from lightning_veripo.videobench.readers import Benchmark
from lightning_veripo.videobench.runner import Decoding, run_benchmark
from lightning_veripo.workdir_lock import hold_work_dir


@dataclass
class Stage:
    """One fit of the loop: a `veripo fit` YAML plus extra command-line overrides."""

    config: str
    args: list[str] = field(default_factory=list)


def run_stage(
    name: str,
    stage: Stage,
    stage_dir: Path,
    base_model: str,
    adapters: list[str],
    tensorboard_dir: Path,
    extra_args: list[str] | None = None,
    callbacks: list[Any] | None = None,
    step_offset: int = 0,
    title: str | None = None,
) -> tuple[Any, int]:
    """One LightningCLI fit from the current policy; resumes from `stage_dir/checkpoints/last.ckpt` if present.

    Its TensorBoard curves start at x = `step_offset` (the steps of the stages before it). With a `title`, a
    header (what runs, from which policy, on what data, how many steps) is printed before the fit.
    A trainer of several processes (e.g. the FSDP2 overlay with `--trainer.devices=2`) fits in child processes
    (`stage_processes`); the loop's module then holds the trained weights, unsharded.
    Returns the fitted LightningModule (its backbone holds the new policy) and the fit's optimizer steps."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    backbone = "--model.init_args.backbone.init_args."
    args = [
        "--config", stage.config,
        f"{backbone}model_name_or_path={base_model}",
        f"{backbone}merge_adapters={json.dumps(adapters)}",
        f"--trainer.default_root_dir={stage_dir}",
        "--trainer.logger=lightning_veripo.loggers.LoopTensorBoardLogger",
        f"--trainer.logger.init_args.save_dir={tensorboard_dir}",
        f"--trainer.logger.init_args.step_offset={step_offset}",
        f"--trainer.logger.init_args.name={name}",
        "--trainer.logger.init_args.version=0",
        "--trainer.enable_checkpointing=true",
        *stage.args,
        *(extra_args or []),
    ]  # fmt: skip
    ckpt_dir = stage_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    with (
        held_back() if title is not None else contextlib.nullcontext()
    ):  # the header before Lightning's lines
        cli = VeripoCLI(args=args, run=False)
        if title is not None:
            first, *details = describe_fit(cli, stage.config, base_model, adapters, stage_dir, last)
            header(f"{title}: {first}", *details)
    if stage_processes.processes(cli.trainer) > 1:  # Lightning would re-execute this whole command per rank
        return stage_processes.fit_in_processes(name, cli, args, stage_dir, callbacks or [])
    # Checkpoint callbacks run last (as Trainer orders them), so a checkpoint holds the state the other
    # callbacks reached at that step, e.g. the VerifierCallback's rollouts of the step just taken.
    existing = cli.trainer.callbacks
    checkpoints = [c for c in existing if isinstance(c, ModelCheckpoint)]
    others = [c for c in existing if not isinstance(c, ModelCheckpoint)]
    every_step = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=1)
    cli.trainer.callbacks = [*others, *(callbacks or []), *checkpoints, every_step]
    with preemption.fitting(cli.trainer):
        cli.trainer.fit(
            cli.model,
            datamodule=cli.datamodule,
            ckpt_path=str(last) if last.exists() else None,
            weights_only=True,
        )
    return cli.model, cli.trainer.global_step


def iterate(
    base_model: str,
    grpo: Stage,
    dpo: Stage,
    val_path: str,
    work_dir: str = "work/veripo",
    iterations: int = 1,
    sft: Stage | None = None,
    activation: Stage | None = None,
    discard_solved_fraction: float = 0.8,
    grpo_only: bool = False,
    judge: Judge | None = None,
    pair_config: PairConfig | None = None,
    evaluation: EvalSettings = EvalSettings(),  # noqa: B008 (frozen)
    min_questions_with_pairs: int = 1,
    make_tiny_if_missing: bool = False,
    tiny_size: str = "tiny",
    tiny_arch: Arch = "qwen2_5_vl",
    eval_base: bool = False,
    benchmark: Benchmark | None = None,
    seed: int = 0,
    guards: Guards = Guards(),  # noqa: B008 (frozen)
) -> list[dict[str, Any]]:
    """Run the VerIPO loop into `work_dir`; returns the per-stage evaluation rows (also in metrics.jsonl).

    Args:
        base_model: the starting checkpoint directory (or hub name).
        grpo / dpo: the stage configs (`veripo fit` YAMLs) and overrides.
        val_path: Video-R1-format file evaluated after every stage.
        iterations: GRPO -> verifier -> DPO rounds.
        sft: an optional supervised warm start before everything (the demo's tiny model needs one).
        activation: an optional reasoning-activation GRPO fit on simpler data before the loop.
        discard_solved_fraction: share of the always-solved questions dropped from the next GRPO fit (paper: 80%).
        grpo_only: the baseline: GRPO fits only (no verifier, no DPO), for the same number of iterations.
        judge / pair_config: the Rollout-Aware Verifier's judge (default: rules) and pair rules.
        evaluation: how every stage is evaluated on `val_path` (frames, decoding, samples, judge; see
            `EvalSettings`). Its judge defaults to `judge`; give the rule judge there when the verifier's judge
            is an LLM: every evaluation then costs no LLM call, and runs with different verifier judges are
            scored alike.
        min_questions_with_pairs: a DPO stage runs only when the verifier's pairs cover at least this many
            questions; below it the stage is skipped, saying why (a handful of questions over-fits DPO).
        eval_base: evaluate the starting checkpoint itself first (a "base" row: what the fits start from).
        benchmark: also score every stage on this benchmark (`limit`: a development slice), greedy, with the
            training prompt and `evaluation`'s frames, max_new_tokens, repetition penalty and batch size
            (`veripo evaluate`'s files in `<stage>/benchmark/`); the headline is the row's `benchmark/<name>`,
            TensorBoard's `eval/benchmark/<name>`.
        guards: the stage acceptance on a development slice, the judge audit before each DPO stage and where DPO
            starts (lightning_veripo.acceptance; the default keeps every stage and gates nothing).
        make_tiny_if_missing: build the offline tiny model at `base_model` if it does not exist (the demo), of
            `tiny_size` (a preset of lightning_veripo.tiny.SIZES: "tiny" or "small") and architecture
            `tiny_arch` (lightning_veripo.tiny.ARCHS, e.g. "qwen3_5").
    """

    work = Path(work_dir)
    guards.check_dev_path(val_path)
    # one run owns work_dir (a second one stops here, touching nothing); SIGTERM stops at a safe point
    with hold_work_dir(work), preemption.stop_on_sigterm():
        if make_tiny_if_missing and not (Path(base_model).expanduser() / "config.json").exists():
            say(f"building the offline tiny model ({tiny_arch}, {tiny_size}) at {base_model}")
            make_tiny_model(Path(base_model).expanduser(), size=tiny_size, arch=tiny_arch)
        state = LoopState(work)
        tensorboard = work / "tensorboard"
        evaluation = evaluation or EvalSettings()
        # a row whose stage state.json does not hold was written by a run killed between the two files: the
        # stage runs again and writes it again
        rows: list[dict[str, Any]] = [
            row for row in map(json.loads, read_lines(work / "metrics.jsonl")) if state.finished(row["stage"])
        ]
        per_iteration = ["grpo"] if grpo_only else ["grpo", "dpo"]
        plan = [*(["sft"] if sft else []), *(["activation"] if activation else []),
                *(f"iter_{k}/{s}" for k in range(1, iterations + 1) for s in per_iteration)]  # fmt: skip

        def label(name: str) -> str:
            return f"[{plan.index(name) + 1}/{len(plan)}] {name}"

        def finished_before(name: str) -> bool:
            """True (and says so) when state.json has the stage from an earlier run of the same command."""
            entry = next((s for s in state.data["finished"] if s["stage"] == name), None)
            if entry is None:
                return False
            what = "skipped" if entry.get("skipped") else "finished"
            why = f": {entry.get('skipped') or entry.get('rejected') or ''}".rstrip(": ")
            say(f"== {label(name) if name in plan else name}: {what} in an earlier run ({state.path}){why}")
            return True

        def run_evaluation(backbone: Any, name: str) -> dict[str, float]:
            n, t = evaluation.num_samples, evaluation.temperature
            samples = f", {n} samples per question at T={t}" if n else ""
            say(f"   evaluating on {val_path} (greedy{samples})")
            with preemption.at(name, "evaluating"):
                metrics = evaluate(backbone, val_path, evaluation, judge, seed=seed, progress=True,
                                   answers_path=work / name / "answers.jsonl")  # fmt: skip
            if benchmark is not None:
                say(f"   scoring {benchmark.name} ({benchmark.path})")
                out = work / name / "benchmark"
                decoding = Decoding(max_new_tokens=evaluation.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                                    repetition_penalty=evaluation.repetition_penalty)  # fmt: skip
                summary = run_benchmark(lambda: backbone, {"stage": name}, benchmark, out,
                                        evaluation.frames or FrameSampling(), "veripo", decoding,
                                        evaluation.batch_size or DEFAULT_BATCH_SIZE, echo=False)  # fmt: skip
                metrics[f"benchmark/{benchmark.name}"] = summary["headline"]["value"]
            return metrics

        def record(row: dict[str, Any], name: str, adapter: str | None, **info: Any) -> None:
            rows.append(row)
            _log_eval(tensorboard, row)
            write_text_atomic(work / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
            state.mark(name, adapter, **info)
            sampled = f", sampled accuracy {row['sampled_accuracy']:.3f}" if "sampled_accuracy" in row else ""
            say(f"   {name}: accuracy {row['accuracy']:.3f}{sampled}, format {row['format_rate']:.3f}, "
                f"inconsistent {row['inconsistency_rate']:.3f} (train {row['train_s']:.1f} s, total {row['wall_s']:.1f} s)")  # fmt: skip

        def evaluate_base() -> None:
            """The "base" row: the starting checkpoint itself. Runs once, after the first fit has written the data
            (the demo's synthetic set is made by its stages' data modules)."""
            if not eval_base or state.finished("base"):
                return

            header("base: the starting checkpoint", f"model: {base_model}")
            base = VideoLLM(base_model).load()
            metrics = run_evaluation(base, "base")
            del base
            row = {"stage": "base", "index": len(rows), "step": 0, "train_s": 0.0, "train_cpu_s": 0.0, "wall_s": 0.0,
                   **metrics, "rss_mb": _rss_mb()}  # fmt: skip
            record(row, "base", None, steps=0, step=0)

        def dev_score(policy: list[str], backbone: Any | None = None) -> dict[str, Any]:
            """Greedy accuracy of `policy` on guards.dev_path (measured once, kept in state.json)."""
            if (known := state.dev_score(policy)) is None:
                backbone = backbone or VideoLLM(base_model, merge_adapters=policy).load()
                say(f"   scoring on the development slice {guards.dev_path} (greedy)")
                metrics = evaluate(
                    backbone, guards.dev_path, replace(evaluation, num_samples=0), judge, seed=seed
                )
                known = {
                    "accuracy": metrics["accuracy"],
                    "n": len(json.loads(Path(guards.dev_path).read_text())),
                }
                state.remember_dev(policy, known)
            return known

        def fit(name: str, stage: Stage, extra: list[str] | None = None, callbacks: list[Any] | None = None,
                start_from: list[str] | None = None, guarded: bool = False) -> None:  # fmt: skip
            if finished_before(name):
                return
            start, cpu_start = time.perf_counter(), time.process_time()
            offset, kept = state.step(), state.adapters()
            adapters = kept if start_from is None else start_from
            with preemption.at(name):
                module, steps = run_stage(name, stage, work / name, base_model, adapters, tensorboard,
                                          extra, callbacks, step_offset=offset, title=label(name))  # fmt: skip
            adapter = str(module.backbone.save_pretrained(work / name / "adapter"))
            train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
            evaluate_base()
            eval_start = time.perf_counter()
            metrics = run_evaluation(module.backbone, name)
            row = {"stage": name, "index": len(rows), "step": offset + steps, "train_s": round(train_s, 3),
                   "train_cpu_s": round(train_cpu_s, 3),
                   "wall_s": round(train_s + time.perf_counter() - eval_start, 3), **metrics,
                   "rss_mb": _rss_mb()}  # fmt: skip
            info: dict[str, Any] = {} if adapters == kept else {"policy": [*adapters, adapter]}
            # the stage acceptance: not worse on the development slice than the policy it would replace
            if guarded and guards.dev_path:
                accept_start = time.perf_counter()
                before, after = dev_score(kept), dev_score([*adapters, adapter], module.backbone)
                decision = decide(guards, before["accuracy"], after["accuracy"], after["n"])
                row.update(accepted=decision.accepted, dev_accuracy=after["accuracy"],
                           accept_s=round(time.perf_counter() - accept_start, 3))  # fmt: skip
                info.update(accepted=decision.accepted, decision=decision.reason())
                if not decision.accepted:
                    info.update(policy=kept, rejected=decision.reason())
                say(f"== {label(name)}: {decision.reason()}")
            record(row, name, adapter, steps=steps, step=offset + steps, **info)

        with quiet():
            if eval_base and state.finished("base"):
                finished_before("base")
            if sft is not None:
                fit("sft", sft)
            if activation is not None:
                fit("activation", activation)
            exclude: Path | None = None
            gate = JudgeGate(guards, judge, val_path)
            for k in range(1, iterations + 1):
                it = f"iter_{k}"
                extra = [f"--data.init_args.exclude_ids_file={exclude}"] if exclude is not None else []
                verifier_dir = work / it / "verifier"
                callbacks = (
                    []
                    if grpo_only
                    else [
                        VerifierCallback(
                            judge=judge or RuleJudge(),
                            pair_config=pair_config or PairConfig(),
                            out_dir=str(verifier_dir),
                        )
                    ]
                )
                before_grpo = state.adapters()
                fit(f"{it}/grpo", grpo, extra, callbacks, guarded=True)
                if not grpo_only:
                    pairs = verifier_dir / "pairs.jsonl"
                    if not finished_before(f"{it}/dpo"):
                        with preemption.at(f"{it}/verifier", "judging the GRPO checkpoint's rollouts"):
                            _ensure_verifier_files(work / it, judge, pair_config)
                        _say_verifier(f"{it}/verifier", verifier_dir)
                        covered = _questions_with_pairs(pairs)
                        if why := gate.check(it, verifier_dir, tensorboard, state.step()):
                            say(f"== {label(f'{it}/dpo')} skipped: {why}")
                            state.mark(f"{it}/dpo", None, skipped=why)
                        elif covered < min_questions_with_pairs:
                            why = (f"the verifier's pairs cover {covered} question(s), fewer than "
                                   f"min_questions_with_pairs={min_questions_with_pairs}")  # fmt: skip
                            say(f"== {label(f'{it}/dpo')} skipped: {why}")
                            state.mark(f"{it}/dpo", None, skipped=why)
                        else:
                            fit(
                                f"{it}/dpo",
                                dpo,
                                [f"--data.init_args.pairs_path={pairs}"],
                                guarded=True,
                                start_from=before_grpo if guards.dpo_from == "before_grpo" else None,
                            )
                    exclude = _discard_solved(
                        verifier_dir / "stats.json",
                        work / it / "exclude_ids.json",
                        discard_solved_fraction,
                        seed + k,
                    )
            evaluate_base()
        print_summary(rows, majority_accuracy(val_path), title=f"evaluation on {val_path} after each stage")
        print_where(work)
        return rows


def _ensure_verifier_files(iteration: Path, judge: Judge | None, pair_config: PairConfig | None) -> None:
    """After a finished GRPO stage, the verifier must have finished too (its stats.json): if the files are
    missing (e.g. removed by hand), judge the rollouts of GRPO's last checkpoint again; never go on without them."""

    verifier, ckpt = iteration / "verifier", iteration / "grpo" / "checkpoints" / "last.ckpt"
    if (verifier / "stats.json").is_file():
        return
    if ckpt.is_dir():  # a fit in several processes (stage_processes): its ranks spooled the rollouts
        callback = VerifierCallback(
            judge=judge, pair_config=pair_config, out_dir=str(verifier), progress=False
        )
        stage_processes.judge_spooled_rollouts(callback, ckpt, iteration / "grpo" / "rollouts")
        return
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"{verifier}/stats.json is missing, so the verifier did not finish, and {ckpt} is gone too: nothing "
            f"to rebuild the preference pairs from. Remove {iteration.name}/grpo from state.json to run it again."
        )
    verify_checkpoint(ckpt, verifier, judge, pair_config)


def _discard_solved(stats_path: Path, out: Path, fraction: float, seed: int) -> Path | None:
    """Pick `fraction` of the always-solved question ids (seeded) for the next GRPO fit to skip."""
    if not stats_path.exists():
        return None
    solved = sorted(json.loads(stats_path.read_text()).get("always_solved", []))
    drop = random.Random(seed).sample(solved, int(len(solved) * fraction))
    write_text_atomic(out, json.dumps(sorted(drop), indent=1))
    return out


def _questions_with_pairs(pairs: Path) -> int:
    """How many distinct questions the pairs file holds pairs for (0 if it is missing or empty)."""
    return len({json.loads(line)["record"]["problem_id"] for line in read_lines(pairs)})


def _rss_mb() -> float:
    """This process's resident memory now (Linux /proc), else its peak so far (getrusage), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def _log_eval(tensorboard: Path, row: dict[str, Any]) -> None:
    scalars = {
        f"eval/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("index", "step")
    }
    log_scalars(tensorboard / "loop", scalars, row["step"])


def _say_verifier(name: str, verifier_dir: Path) -> None:
    """One line on what the verifier of a GRPO stage found (from its stats.json)."""
    stats = json.loads((verifier_dir / "stats.json").read_text())
    say(f"== {name}: judged {plural(stats['num_rollouts'], 'rollout')} of "
        f"{plural(stats['num_questions'], 'question')}: {plural(stats['pairs'], 'preference pair')} over "
        f"{plural(stats['questions_with_pairs'], 'question')} ({verifier_dir / 'pairs.jsonl'})")  # fmt: skip
    # a judge that raised or a server that did not answer: said here, not only in the files
    if stats.get("judge_errors"):
        say(f"   {plural(stats['judge_errors'], 'rollout')} unjudged because the judge failed (the error is in "
            f"{verifier_dir / 'verdicts.jsonl'})")  # fmt: skip
