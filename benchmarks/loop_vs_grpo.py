"""Does the VerIPO loop make a model better than GRPO alone? Both arms from one warm start, seeds, held-out data.

For each seed: a small random Qwen2.5-VL (`make_tiny_model(seed=..., size="small")`) is warm-started by a short
supervised fit on the synthetic task's chain of thought (`process` + solution). Stopped early, it reads the video
partially and often answers against its own reasoning (optionally more so with `answer_noise`, the share of
targets whose answer contradicts their reasoning). From that one warm start two arms
run with the same GRPO settings and the same number of GRPO steps:

- `grpo`: GRPO fits only (`iterate(grpo_only=True)`), `iterations` of them;
- `loop`: the VerIPO loop, `iterations` x (GRPO fit -> Rollout-Aware Verifier -> DPO fit), 80% of the
  always-solved questions dropped from the next GRPO fit. Its judge is the rule judge unless `--set judge=hybrid
  judge_model=DIR`: the rules where a stated conclusion allows, a local causal LM (TransformersJudge, likelihood
  verdicts by default) for the rest. Every evaluation, of both arms, is judged by the rules (`iterate`'s
  `evaluation.judge`), so the inconsistency rates of runs with different verifier judges compare;
- `guard` (only when asked for with `--arms`): the loop with its guards (lightning_veripo.acceptance): a GRPO or
  DPO stage kept only if not worse on the development split (`val.json`) than the policy it would replace, by
  more than one binomial standard error; each DPO stage only after the judge's audit on the shipped labelled
  rollouts of the task passes `min_judge_accuracy`; DPO from `dpo_from`. Every arm scores every stage on the
  development split too (`dev_accuracy`, greedy), so both splits are reported;
- `nodpo` (an ablation, only when asked for with `--arms`): the loop without its DPO stages. The verifier runs and
  80% of the always-solved questions are dropped from the next GRPO fit, as in the loop, but no DPO fit runs. Loop
  minus `nodpo` is what the DPO stages do; `nodpo` minus `grpo` is what the data filter does.

Every stage's policy is evaluated on the held-out split (`test.json`, never used to choose a setting; `--split
val` evaluates on the development split instead, for tuning): greedy accuracy, sampled accuracy (8 samples per
question at T=1), pass@8, inconsistency rate (rule judge; greedy and sampled), reasoning tokens, Acc-Cons, against
the arm's cumulative training wall time (fits + verifier; evaluation excluded, the loop's DPO time included) and
optimiser steps. The warm start is also evaluated on a control where every question gets another record's video
(paths rotated): the margin over it is how much the policy reads the video.

    python benchmarks/loop_vs_grpo.py --task colour_direction --seeds 0 1 2        # the full run (~20 min a task)
    python benchmarks/loop_vs_grpo.py --task colour --quick --seeds 0              # a few minutes
    python benchmarks/loop_vs_grpo.py --task colour --split val ...                # tune on the development split
    python benchmarks/loop_vs_grpo.py --task colour --arms loop --set judge=hybrid judge_model=DIR  # the hybrid
    python benchmarks/loop_vs_grpo.py --task colour --arms grpo loop nodpo                         # the ablation

Writes `benchmarks/results/loop_vs_grpo_<task>[_quick].json` (settings, one row per arm x seed x stage, the
warm start's control, summaries with 95% intervals over seeds) and a PNG plot beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, RESULTS, write_json

METRICS = ("accuracy", "sampled_accuracy", "pass_at_k", "inconsistency_rate", "sampled_inconsistency_rate",
           "reasoning_tokens", "sampled_reasoning_tokens", "acc_cons", "sampled_acc_cons", "format_rate")  # fmt: skip


@dataclass
class Setting:
    """Everything an arm depends on; both arms of a run share one Setting."""

    num_train: int = 128
    num_val: int = 128  # the development split: settings are chosen on it
    num_test: int = 128  # the held-out split: results are reported on it
    model_size: str = "small"  # lightning_veripo.tiny.SIZES
    model_arch: str = (
        "qwen2_5_vl"  # lightning_veripo.tiny.ARCHS: --set model_arch=qwen3_5 runs the lab on Qwen3.5
    )
    sft_steps: int = 700
    sft_lr: float = 2e-3
    answer_noise: float = 0.0
    iterations: int = 2
    grpo_steps: int = 32  # per iteration
    grpo_lr: float = 2e-3  # with 4 prompts per step; at 2 prompts per step 2e-3 first degrades the policy
    num_generations: int = 8
    grpo_batch_size: int = 4
    max_new_tokens: int = 48
    dpo_epochs: int = 2
    dpo_lr: float = 5e-4
    dpo_beta: float = 0.1
    dpo_sft_weight: float = 1.0  # the NLL term on the chosen completion
    min_questions_with_pairs: int = 8
    discard_solved_fraction: float = 0.8  # share of the always-solved questions the next GRPO fit drops
    eval_samples: int = 8
    judge: str = "rule"  # the loop's verifier judge (evaluations are always rule-judged): JUDGES
    judge_model: str = ""  # judge=hybrid: the LLM's directory (a transformers causal LM); none by default
    judge_mode: str = "likelihood"  # judge=hybrid: TransformersJudge's mode ("likelihood" or "generate")
    judge_min_confidence: float = 0.5  # judge=hybrid: below it the LLM abstains (0.5: always decides)
    # the GRPO and DPO stages' LoRA also on the vision merger, the vision tower unfrozen for it (configs/demo.yaml)
    rl_vision_merger: bool = False
    # the `guard` arm (lightning_veripo.acceptance.Guards)
    min_judge_accuracy: float = 0.8
    margin_se: float = 1.0
    dpo_from: str = "grpo"  # or before_grpo


# The language model's projections (LoRAConfig's default) and the vision merger's two linear layers
# (lightning_veripo.backbone.LORA_TARGETS), as configs/demo.yaml's RL stages have them.
MERGER_LORA = "language_model+merger"


JUDGES = ("rule", "hybrid")

ARMS = {"grpo": "GRPO alone", "loop": "VerIPO loop", "guard": "loop with guards", "nodpo": "loop without DPO"}
NO_DPO = sys.maxsize  # a min_questions_with_pairs no verifier reaches: every DPO stage is skipped, saying why


QUICK = dict(num_val=64, iterations=2, grpo_steps=32, eval_samples=4)


def _quiet() -> list[str]:
    return ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0"]  # fmt: skip


def stages(setting: Setting, data: Path, seed: int) -> dict[str, Any]:
    """The SFT, GRPO and DPO stages of one seed (the demo's configs with the lab's overrides)."""
    from lightning_veripo.loop import Stage

    common = [f"--seed_everything={seed}", *_quiet(),
              "--model.init_args.backbone.init_args.make_tiny_if_missing=false"]  # fmt: skip
    videoqa = [f"--data.init_args.train_path={data / 'train.json'}", "--data.init_args.synthetic=null"]
    sft = Stage(str(REPO / "configs/demo_sft.yaml"), [
        *common, *videoqa, f"--trainer.max_steps={setting.sft_steps}", f"--model.init_args.lr={setting.sft_lr}",
        f"--model.init_args.answer_noise={setting.answer_noise}", f"--model.init_args.seed={seed}"])  # fmt: skip
    grpo = Stage(str(REPO / "configs/demo_grpo.yaml"), [
        *common, *videoqa, "--data.init_args.val_path=null", f"--trainer.max_steps={setting.grpo_steps}",
        f"--model.init_args.lr={setting.grpo_lr}", f"--model.init_args.num_generations={setting.num_generations}",
        f"--data.init_args.batch_size={setting.grpo_batch_size}",
        f"--model.init_args.max_new_tokens={setting.max_new_tokens}",
        "--model.init_args.log_rollouts_every_n_steps=0"])  # fmt: skip
    dpo = Stage(str(REPO / "configs/demo_dpo.yaml"), [
        *common, f"--trainer.max_epochs={setting.dpo_epochs}", f"--model.init_args.lr={setting.dpo_lr}",
        f"--model.init_args.beta={setting.dpo_beta}", f"--model.init_args.sft_weight={setting.dpo_sft_weight}"])  # fmt: skip
    if setting.rl_vision_merger:
        for stage in (grpo, dpo):
            stage.args += ["--model.init_args.backbone.init_args.freeze_vision=false",
                           f"--model.init_args.backbone.init_args.lora.target_modules={MERGER_LORA}"]  # fmt: skip
    return {"sft": sft, "grpo": grpo, "dpo": dpo}


def make_judge(setting: Setting) -> Any:
    """The loop arm's judge: `rule` (RuleJudge) or `hybrid` (the rules where a stated conclusion allows, the LLM
    at `judge_model` for the rest; it loads on first use). The loop uses it for the verifier's pairs; its
    evaluations are judged by the rules (`evaluation.judge`). Raises ValueError for an unknown judge or a hybrid
    without a model directory."""
    from lightning_veripo.verifier import HybridJudge, RuleJudge, TransformersJudge

    if setting.judge == "rule":
        return RuleJudge()
    if setting.judge != "hybrid":
        raise ValueError(f"judge={setting.judge!r}: expected one of {', '.join(JUDGES)}")
    if not setting.judge_model:
        raise ValueError(
            "judge=hybrid needs the LLM's directory: --set judge_model=DIR (a transformers causal LM with its "
            "tokenizer, e.g. SmolLM2-135M-Instruct as benchmarks/judge_accuracy.py converts it); the lab never "
            "downloads one"
        )
    if not (Path(setting.judge_model) / "config.json").is_file():
        raise ValueError(f"judge_model={setting.judge_model!r}: no config.json there (not a model directory)")
    llm = TransformersJudge(
        setting.judge_model, mode=setting.judge_mode, min_confidence=setting.judge_min_confidence
    )
    return HybridJudge(llm=llm, rule=RuleJudge())


def arm_options(setting: Setting, arm: str, dev_path: str | None = None) -> dict[str, Any]:
    """What `iterate` is given for one arm on top of the settings every arm shares: GRPO alone runs no verifier;
    the loop's verifier uses the setting's judge; `nodpo` runs the verifier (rules: only its always-solved
    statistics are used) and its data filter, and skips every DPO stage."""
    from lightning_veripo.acceptance import Guards
    from lightning_veripo.verifier import RuleJudge

    dev = {"guards": Guards(dev_path=dev_path)} if dev_path else {}  # every stage scored on dev, all kept
    if arm == "grpo":
        return {"grpo_only": True, "judge": None, **dev}
    if arm == "loop":
        return {"grpo_only": False, "judge": make_judge(setting), **dev}
    if arm == "guard":
        guards = Guards(accept="no_worse", dev_path=dev_path, margin_se=setting.margin_se,
                        min_judge_accuracy=setting.min_judge_accuracy, dpo_from=setting.dpo_from)  # fmt: skip
        return {"grpo_only": False, "judge": make_judge(setting), "guards": guards}
    if arm == "nodpo":
        return {"grpo_only": False, "judge": RuleJudge(), "min_questions_with_pairs": NO_DPO, **dev}
    raise ValueError(f"arm {arm!r}: expected one of {', '.join(ARMS)}")


def lab_evaluation(setting: Setting) -> Any:
    """How the lab evaluates every stage (and the rescoring): the lab's frames, batch and samples, judged by
    the rules whatever the verifier's judge, so runs with different judges compare."""
    from lightning_veripo.data.videoqa import FrameSampling
    from lightning_veripo.evaluate import EvalSettings
    from lightning_veripo.verifier import RuleJudge

    frames = FrameSampling(num_frames=4, min_pixels=3136, max_pixels=3136)
    return EvalSettings(frames, max_new_tokens=setting.max_new_tokens, batch_size=16,
                        num_samples=setting.eval_samples, judge=RuleJudge())  # fmt: skip


def _loop_kwargs(setting: Setting, eval_path: Path, seed: int) -> dict[str, Any]:
    return dict(
        evaluation=lab_evaluation(setting),
        min_questions_with_pairs=setting.min_questions_with_pairs, val_path=str(eval_path), seed=seed,
        discard_solved_fraction=setting.discard_solved_fraction,
    )  # fmt: skip


def evaluate_merged(
    setting: Setting, base: Path, adapters: list[str], path: Path, seed: int
) -> dict[str, Any]:
    """`base` with `adapters` merged in order, evaluated on `path` as the loop evaluates its stages (the lab's
    frames, batch, samples and sampling seed), judged by the rules."""
    from lightning_veripo.backbone import VideoLLM
    from lightning_veripo.evaluate import evaluate

    policy = VideoLLM(str(base), merge_adapters=adapters).load()
    return evaluate(policy, str(path), lab_evaluation(setting), seed=seed)


def rotated_videos(path: Path, out: Path) -> Path:
    """The control: the same questions, each with the next record's video (a policy blind to the video
    scores the same here; one that reads it drops toward chance)."""
    records = json.loads(path.read_text())
    paths = [r["path"] for r in records]
    rotated = [
        dict(r, path=str((path.parent / p).absolute()))
        for r, p in zip(records, paths[1:] + paths[:1], strict=True)
    ]
    out.write_text(json.dumps(rotated, indent=1))
    return out


def run_seed(
    task: str, setting: Setting, seed: int, work: Path, eval_path: Path, data: Path, arms: tuple[str, ...]
) -> dict[str, Any]:
    """The warm start of one seed, its control, then both arms; returns rows and the control's metrics."""
    from lightning_veripo.loop import iterate
    from lightning_veripo.tiny import make_tiny_model

    model = work / f"model_{seed}"
    if not (model / "config.json").exists():
        make_tiny_model(model, seed=seed, size=setting.model_size, arch=setting.model_arch)
    st = stages(setting, data, seed)
    warm = work / f"seed_{seed}" / "warm"
    kwargs = _loop_kwargs(setting, eval_path, seed)
    iterate(str(model), st["grpo"], st["dpo"], work_dir=str(warm), iterations=0, sft=st["sft"], **kwargs)
    state = json.loads((warm / "state.json").read_text())
    control = evaluate_merged(setting, model, [s["adapter"] for s in state["finished"]],
                              rotated_videos(eval_path, work / f"seed_{seed}" / "control.json"), seed)  # fmt: skip
    rows = []
    warm_row = json.loads((warm / "metrics.jsonl").read_text().splitlines()[0])
    if not arms:
        rows.append({"task": task, "arm": "warm", "seed": seed, "stage": "sft", "wall_s": 0.0, "cpu_s": 0.0, "steps": 0,
                     **{k: warm_row.get(k) for k in METRICS}})  # fmt: skip
    for arm in arms:
        arm_dir = work / f"seed_{seed}" / arm
        if not (arm_dir / "state.json").exists():
            shutil.rmtree(arm_dir, ignore_errors=True)
            shutil.copytree(warm, arm_dir)  # the same warm start: its stage is finished there
        out = iterate(str(model), st["grpo"], st["dpo"], work_dir=str(arm_dir), iterations=setting.iterations,
                      **{**kwargs, **arm_options(setting, arm, _dev_path(eval_path))})  # fmt: skip
        arm_state = json.loads((arm_dir / "state.json").read_text())
        finished = {s["stage"]: s for s in arm_state["finished"]}
        warm_dev = arm_state.get("dev", {}).get(json.dumps([s["adapter"] for s in state["finished"]]), {})
        if (
            warm_dev
        ):  # the warm start's development score (the policy the first stage's acceptance compares to)
            out = [dict(r, dev_accuracy=warm_dev["accuracy"]) if r["stage"] == "sft" else r for r in out]
        wall, cpu, steps0 = 0.0, 0.0, out[0]["step"]
        for row in out:
            if row["stage"] != "sft":  # the guard arm's acceptance scoring is part of its cost
                wall = wall + row["train_s"] + (row.get("accept_s", 0.0) if arm == "guard" else 0.0)
                cpu = cpu + row["train_cpu_s"]
            rows.append({"task": task, "arm": arm, "seed": seed, "stage": row["stage"],
                         "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "steps": row["step"] - steps0,
                         **{k: row.get(k) for k in METRICS},
                         **{k: row[k] for k in ("accepted", "dev_accuracy") if k in row}})  # fmt: skip
        for name, s in finished.items():
            if s.get("skipped"):
                rows.append({"task": task, "arm": arm, "seed": seed, "stage": name, "skipped": s["skipped"]})
        stats = [json.loads(p.read_text()) for p in sorted(arm_dir.glob("iter_*/verifier/stats.json"))]
        for k, st_ in enumerate(stats, start=1):
            keys = ("num_rollouts", "pairs", "questions_with_pairs", "accuracy", "inconsistent_rate", "unjudged",
                    "decided_by", "pairs_by_reason", "judge", "judge_time_s", "wall_time_s")  # fmt: skip
            rows.append({"task": task, "arm": arm, "seed": seed, "stage": f"iter_{k}/verifier",
                         "verifier": {x: st_.get(x) for x in keys}})  # fmt: skip
    return {"rows": rows, "control": {"seed": seed, **{k: control.get(k) for k in METRICS}}}


def _dev_path(eval_path: Path) -> str | None:
    """The development split beside a test split the rows report (None when the rows are the dev split)."""
    return str(eval_path.with_name("val.json")) if eval_path.name == "test.json" else None


def rescore(task: str, setting: Setting, seed: int, work: Path, eval_path: Path, arms: tuple[str, ...],
            split: str) -> dict[str, Any]:  # fmt: skip
    """Evaluate a finished run again on another split, training nothing: the warm start (with its control) and
    each arm's last trained stage, every adapter merged in order. A difference seen on one split should hold on
    the other; a setting chosen from the test split's numbers is checked on the development split this way."""
    base = work / f"model_{seed}"

    def scored(adapters: list[str], path: Path) -> dict[str, Any]:
        metrics = evaluate_merged(setting, base, adapters, path, seed)
        return {k: metrics.get(k) for k in METRICS}

    def trained(arm: str) -> list[dict[str, Any]]:
        state_path = work / f"seed_{seed}" / arm / "state.json"
        if not state_path.is_file():
            raise FileNotFoundError(f"{state_path}: no finished {arm!r} run of seed {seed} to evaluate again")
        return [s for s in json.loads(state_path.read_text())["finished"] if s.get("adapter")]

    warm = trained("warm")
    warm_row = scored([s["adapter"] for s in warm], eval_path)
    control = scored(
        [s["adapter"] for s in warm],
        rotated_videos(eval_path, work / f"seed_{seed}" / f"control_{split}.json"),
    )
    rows = []
    for arm in arms:
        stages = trained(arm)
        rows.append(
            {"task": task, "arm": arm, "seed": seed, "stage": warm[-1]["stage"], "split": split, **warm_row}
        )
        if len(stages) > len(warm):
            rows.append({"task": task, "arm": arm, "seed": seed, "stage": stages[-1]["stage"], "split": split,
                         **scored([s["adapter"] for s in stages], eval_path)})  # fmt: skip
    return {"rows": rows, "control": {"seed": seed, **control}}


def interval95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95% t-interval over seeds (0 for one seed)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    t = {2: 12.71, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365}.get(len(values), 2.0)
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm x stage: mean and 95% half-width over seeds of every metric, wall time and steps."""
    out = []
    evaluated = [r for r in rows if "accuracy" in r and r.get("accuracy") is not None]
    keys = sorted({(r["arm"], r["stage"]) for r in evaluated}, key=lambda k: (k[0], _stage_order(k[1])))
    for arm, stage in keys:
        these = [r for r in evaluated if r["arm"] == arm and r["stage"] == stage]
        entry: dict[str, Any] = {"arm": arm, "stage": stage, "seeds": len(these)}
        for key in ("wall_s", "cpu_s", "steps", *METRICS, "dev_accuracy"):
            values = [float(r[key]) for r in these if r.get(key) is not None]
            if values:
                mean, half = interval95(values)
                entry[key] = round(mean, 4)
                entry[f"{key}_ci95"] = round(half, 4)
        out.append(entry)
    return out


def stage_costs(rows: list[dict[str, Any]], setting: dict[str, Any]) -> dict[str, Any]:
    """Claim (c): CPU seconds per prompt of the loop's GRPO stages (rollouts + verifier) and of its DPO stages
    (per pair and epoch), from the cumulative `cpu_s` of consecutive rows; their ratio per seed and pooled."""
    grpo_prompts = setting["grpo_steps"] * setting["grpo_batch_size"]
    per_seed = []
    for seed in sorted({r["seed"] for r in rows if r["arm"] == "loop"}):
        these = [r for r in rows if r["arm"] == "loop" and r["seed"] == seed]
        evaluated = [r for r in these if r.get("cpu_s") is not None]
        pairs = {r["stage"].split("/")[0]: r["verifier"]["pairs"] for r in these if "verifier" in r}
        grpo, dpo = [], []
        for before, row in zip(evaluated, evaluated[1:], strict=False):
            cost = row["cpu_s"] - before["cpu_s"]
            it, kind = row["stage"].split("/")
            if kind == "grpo":
                grpo.append(cost / grpo_prompts)
            elif kind == "dpo" and pairs.get(it):
                dpo.append(cost / (pairs[it] * setting["dpo_epochs"]))
        if grpo and dpo:
            g, d = statistics.fmean(grpo), statistics.fmean(dpo)
            per_seed.append({"seed": seed, "grpo_cpu_s_per_prompt": round(g, 4),
                             "dpo_cpu_s_per_pair_epoch": round(d, 4), "ratio": round(g / d, 2)})  # fmt: skip
    ratios = [x["ratio"] for x in per_seed]
    mean, half = interval95(ratios) if ratios else (float("nan"), 0.0)
    return {"per_seed": per_seed, "ratio": round(mean, 2), "ratio_ci95": round(half, 2)}


def final_rows(rows: list[dict[str, Any]], arms: tuple[str, ...]) -> dict[tuple[str, int], dict[str, Any]]:
    """(arm, seed) -> the row of that arm's last evaluated stage on that seed."""
    final: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        if r.get("accuracy") is not None and r["arm"] in arms and r.get("accepted") is not False:
            key = (r["arm"], r["seed"])
            if key not in final or _stage_order(r["stage"]) > _stage_order(final[key]["stage"]):
                final[key] = r
    return final


def paired_differences(rows: list[dict[str, Any]], keys: tuple[str, ...] = ("accuracy", "sampled_accuracy",
                       "sampled_inconsistency_rate", "sampled_reasoning_tokens", "dev_accuracy"),
                       arms: tuple[str, str] = ("loop", "grpo")) -> dict[str, Any]:  # fmt: skip
    """Arm `arms[0]` minus arm `arms[1]` (default: the loop minus GRPO alone) after the last evaluated stage of
    each, per seed (the same warm start: a paired comparison), with the mean and 95% interval over seeds."""
    out: dict[str, Any] = {}
    final = final_rows(rows, arms)
    a, b = arms
    seeds = sorted({s for arm, s in final if arm == a} & {s for arm, s in final if arm == b})
    for key in keys:
        diffs = [final[(a, s)][key] - final[(b, s)][key] for s in seeds
                 if final[(a, s)].get(key) is not None and final[(b, s)].get(key) is not None]  # fmt: skip
        if diffs:
            mean, half = interval95(diffs)
            out[key] = {
                "per_seed": [round(d, 4) for d in diffs],
                "mean": round(mean, 4),
                "ci95": round(half, 4),
            }
    return out


def _stage_order(stage: str) -> tuple[int, int]:
    if stage == "sft":
        return (0, 0)
    k, kind = stage.split("/")
    return (int(k.split("_")[1]), {"grpo": 1, "verifier": 2, "dpo": 3}[kind])


def print_table(summary: list[dict[str, Any]], control: list[dict[str, Any]]) -> None:
    cols = ("accuracy", "sampled_accuracy", "pass_at_k", "inconsistency_rate", "sampled_inconsistency_rate",
            "sampled_reasoning_tokens", "sampled_acc_cons")  # fmt: skip
    short = ("greedy acc", "sampled acc", "pass@k", "incons.", "sampled incons.", "think tok", "acc-cons")
    head = f"\n{'arm':5} {'stage':11} {'wall s':>8} {'cpu s':>8} {'steps':>6} "
    print(head + " ".join(f"{c:>15}" for c in short))
    for e in summary:
        cells = [f"{e.get(c, float('nan')):.3f}±{e.get(c + '_ci95', 0):.3f}".rjust(15) for c in cols]
        wall, cpu, steps = (e.get(k, math.nan) for k in ("wall_s", "cpu_s", "steps"))  # none when rescored
        print(f"{e['arm']:5} {e['stage']:11} {wall:8.1f} {cpu:8.1f} {steps:6.0f} "
              + " ".join(cells))  # fmt: skip
    for key in ("accuracy", "sampled_accuracy"):
        mean, half = interval95([c[key] for c in control])
        print(f"control (videos rotated), warm start: {key} {mean:.3f}±{half:.3f}")


def plot(summary: list[dict[str, Any]], path: Path, title: str, rows: list[dict[str, Any]] | None = None,
         time_key: str = "cpu_s") -> None:  # fmt: skip
    """Accuracy and inconsistency against training time: each arm's mean over seeds (thick, labelled by stage),
    each seed (thin) and the band between the lowest and highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("accuracy", "greedy accuracy"), ("sampled_accuracy", "sampled accuracy (T=1)"),
              ("sampled_inconsistency_rate", "inconsistency (sampled, rule judge)"))  # fmt: skip
    evaluated = [r for r in rows or [] if r.get("accuracy") is not None and r["arm"] in ARMS]
    colours = {"grpo": "tab:blue", "loop": "tab:red", "guard": "tab:purple", "nodpo": "tab:green"}
    present = [arm for arm in ARMS if any(e["arm"] == arm for e in summary)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for arm in present:
            colour, name = colours[arm], ARMS[arm]
            pts = [e for e in summary if e["arm"] == arm and key in e]
            x = [e[time_key] for e in pts]
            ax.plot(x, [e[key] for e in pts], marker="o", color=colour, linewidth=2, label=f"{name} (mean)")
            per_seed: dict[int, list[dict[str, Any]]] = {}
            for r in evaluated:
                if r["arm"] == arm and r.get(key) is not None:
                    per_seed.setdefault(r["seed"], []).append(r)
            for seed_rows in per_seed.values():
                seed_rows.sort(key=lambda r: _stage_order(r["stage"]))
                ax.plot([r[time_key] for r in seed_rows], [r[key] for r in seed_rows], color=colour, alpha=0.35,
                        linewidth=0.8)  # fmt: skip
            if per_seed:
                stages = [e["stage"] for e in pts]
                low = [
                    min(r[key] for rs in per_seed.values() for r in rs if r["stage"] == st) for st in stages
                ]
                high = [
                    max(r[key] for rs in per_seed.values() for r in rs if r["stage"] == st) for st in stages
                ]
                ax.fill_between(x, low, high, color=colour, alpha=0.12)
            for e in pts:
                ax.annotate(e["stage"].replace("iter_", "i"), (e[time_key], e[key]), fontsize=7)
        what = "CPU time of the fits" if time_key == "cpu_s" else "training wall time"
        ax.set_xlabel(f"{what}, s (cumulative; evaluation excluded)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}; thin lines: seeds, band: lowest to highest seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="colour", help="a synthetic task: colour, direction, count, "
                        "colour_direction")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="64 development questions, 4 samples per question (a few minutes)",
    )
    parser.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="evaluate on the held-out test split (report) or the development split (tune)",
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="work directory (default: a fresh one in /tmp)"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (PNG beside it)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warm-only", action="store_true", help="only the warm start and its control")
    parser.add_argument("--arms", nargs="+", choices=tuple(ARMS), default=["grpo", "loop"],
                        help="nodpo: the loop without DPO stages (an ablation; not run unless named)")  # fmt: skip
    parser.add_argument("--from-json", type=Path, default=None,
                        help="re-summarise, print and plot an earlier run's JSON (rewritten in place)")  # fmt: skip
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override a Setting field")
    parser.add_argument("--rescore", action="store_true",
                        help="train nothing: evaluate a finished run in --work (the same --arms, --seeds and --set) "
                        "again on --split, the warm start and each arm's last stage")  # fmt: skip
    args = parser.parse_args(argv)
    if args.from_json is not None:
        return report(json.loads(args.from_json.read_text()), args.from_json)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(args.threads)
    from lightning_veripo.data.synthetic import TASKS, make_synthetic_data

    if args.task not in TASKS:
        parser.error(f"--task {args.task!r}: expected one of {TASKS}")
    fields = {**(QUICK if args.quick else {})}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in Setting.__dataclass_fields__:
            parser.error(
                f"--set {item!r}: unknown setting {key!r}; known: {sorted(Setting.__dataclass_fields__)}"
            )
        kind = type(Setting.__dataclass_fields__[key].default)
        if kind is bool and value.lower() not in ("true", "false"):
            parser.error(f"--set {item!r}: {key} is true or false")
        fields[key] = value.lower() == "true" if kind is bool else kind(value)
    setting = Setting(**fields)
    if "loop" in args.arms and not args.warm_only:
        try:
            make_judge(setting)
        except ValueError as err:
            parser.error(str(err))
    if args.rescore and (args.work is None or not (args.work / "data" / "train.json").is_file()):
        parser.error("--rescore evaluates a finished run again: give its --work directory")
    work = args.work or Path(f"/tmp/loop_vs_grpo_{args.task}_{int(time.time())}")
    data = work / "data"
    if not (data / "train.json").exists():
        make_synthetic_data(data, setting.num_train, setting.num_val, seed=1000, tasks=[args.task],
                            num_test=setting.num_test)  # fmt: skip
    eval_path = data / ("test.json" if args.split == "test" else "val.json")
    rows: list[dict[str, Any]] = []
    control: list[dict[str, Any]] = []
    start = time.perf_counter()
    for seed in args.seeds:
        arms = () if args.warm_only else tuple(args.arms)
        if args.rescore:
            result = rescore(args.task, setting, seed, work, eval_path, arms, args.split)
        else:
            result = run_seed(args.task, setting, seed, work, eval_path, data, arms)
        rows += result["rows"]
        control.append(result["control"])
    suffix = ("_quick" if args.quick else "") + ("_dev" if args.split == "val" else "")
    suffix += ("_warm" if args.warm_only else "") + ("_rescored" if args.rescore else "")
    out = args.out or RESULTS / f"loop_vs_grpo_{args.task}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"task": args.task, "split": args.split, "seeds": args.seeds, "setting": asdict(setting),
              "command": " ".join(["python benchmarks/loop_vs_grpo.py", *(argv if argv is not None else sys.argv[1:])]),
              "total_s": round(time.perf_counter() - start, 1), "threads": args.threads,
              "control": control, "rows": rows}  # fmt: skip
    return report(result, out)


READS_VIDEO_MARGIN = 0.1  # sampled accuracy above the rotated-video control that counts as reading the video


def seeds_reading_the_video(rows: list[dict[str, Any]], control: list[dict[str, Any]]) -> list[int]:
    """The seeds whose warm start beats its own rotated-video control by READS_VIDEO_MARGIN (sampled accuracy):
    a blind warm start gives RL nothing to sharpen, so the arms are also compared over these seeds alone."""
    blind_score = {c["seed"]: c.get("sampled_accuracy") for c in control}
    warm = {r["seed"]: r.get("sampled_accuracy") for r in rows if r.get("stage") == "sft"}
    return sorted(
        seed for seed, acc in warm.items()
        if acc is not None and blind_score.get(seed) is not None and acc > blind_score[seed] + READS_VIDEO_MARGIN
    )  # fmt: skip


def report(result: dict[str, Any], out: Path) -> int:
    """Summaries, the paired loop-minus-GRPO differences and the stage costs; print, write JSON and the plot.
    Summaries and differences are given over every seed and, again, over the seeds whose warm start reads the
    video (`seeds_reading_the_video`)."""
    rows = result["rows"]
    result["summary"] = summarise(rows)
    result["loop_minus_grpo_final"] = paired_differences(rows)
    result["stage_costs"] = stage_costs(rows, result["setting"])
    reading = seeds_reading_the_video(rows, result["control"])
    result["seeds_reading_the_video"] = reading
    result["summary_reading"] = summarise([r for r in rows if r["seed"] in reading])
    result["loop_minus_grpo_final_reading"] = paired_differences([r for r in rows if r["seed"] in reading])
    print_table(result["summary"], result["control"])
    for key, d in result["loop_minus_grpo_final"].items():
        print(
            f"loop - GRPO alone after the last stage, {key}: {d['mean']:+.3f} ± {d['ci95']:.3f} (per seed {d['per_seed']})"
        )
    print(
        f"\nseeds whose warm start reads the video (sampled accuracy > control + {READS_VIDEO_MARGIN}): {reading}"
    )
    if reading and len(reading) < len(result["seeds"]):
        print_table(result["summary_reading"], [c for c in result["control"] if c["seed"] in reading])
        for key, d in result["loop_minus_grpo_final_reading"].items():
            print(f"over those seeds, loop - GRPO alone, {key}: {d['mean']:+.3f} ± {d['ci95']:.3f} "
                  f"(per seed {d['per_seed']})")  # fmt: skip
    if any(r["arm"] == "guard" for r in rows):
        result["guard"] = {f"guard_minus_{b}_final": paired_differences(rows, arms=("guard", b))
                           for b in ("loop", "grpo")}  # fmt: skip
        result["guard"]["rejected"] = [(r["seed"], r["stage"]) for r in rows if r.get("accepted") is False]
        total: dict[
            tuple[str, int], float
        ] = {}  # an arm's whole training wall time, rejected stages included
        for r in rows:
            if r.get("wall_s") is not None:
                total[(r["arm"], r["seed"])] = max(total.get((r["arm"], r["seed"]), 0.0), r["wall_s"])
        for b in ("loop", "grpo"):
            diffs = [
                total[("guard", s)] - total[(b, s)] for a, s in total if a == "guard" and (b, s) in total
            ]
            if diffs:
                mean, half = interval95(diffs)
                result["guard"][f"guard_minus_{b}_final"]["total_wall_s"] = {
                    "per_seed": [round(d, 1) for d in diffs],
                    "mean": round(mean, 1),
                    "ci95": round(half, 1),
                }
        result["guard"]["dpo_skipped"] = [(r["seed"], r["stage"], r["skipped"]) for r in rows
                                          if r["arm"] == "guard" and r.get("skipped")]  # fmt: skip
        for name, diffs in result["guard"].items():
            if isinstance(diffs, dict):
                for key, d in diffs.items():
                    print(f"{name.replace('_final', '')}: {key} {d['mean']:+.3f} ± {d['ci95']:.3f} "
                          f"(per seed {d['per_seed']})")  # fmt: skip
        print(
            f"guard: rejected stages {result['guard']['rejected']}; DPO skipped {result['guard']['dpo_skipped']}"
        )
    if any(r["arm"] == "nodpo" for r in rows):
        result["ablation"] = {f"{a}_minus_{b}_final": paired_differences(rows, arms=(a, b))
                              for a, b in (("loop", "nodpo"), ("nodpo", "grpo"))}  # fmt: skip
        for name, diffs in result["ablation"].items():
            for key, d in diffs.items():
                print(f"{name.replace('_final', '')}: {key} {d['mean']:+.3f} ± {d['ci95']:.3f} "
                      f"(per seed {d['per_seed']})")  # fmt: skip
    costs = result["stage_costs"]
    if costs["per_seed"]:  # only a loop arm with a DPO stage has both costs
        print(
            f"GRPO stage / DPO stage CPU time per prompt: {costs['ratio']:.2f} ± {costs['ratio_ci95']:.2f}x"
        )
    write_json(out, result)
    if any(r["arm"] in ARMS and r.get("cpu_s") is not None for r in rows):  # a rescored run has no times
        questions = result["setting"]["num_test" if result["split"] == "test" else "num_val"]
        names = " vs ".join(name for arm, name in ARMS.items() if any(r["arm"] == arm for r in rows))
        title = f"{result['task']}: {names} ({len(result['seeds'])} seeds, {questions} questions)"
        plot(result["summary"], out.with_suffix(".png"), title, rows)
    print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if out.with_suffix(".png").exists() else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
