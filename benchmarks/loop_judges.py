"""Rule judge vs the hybrid judge in the VerIPO loop: merge the lab's runs (`benchmarks/loop_vs_grpo.py --arms
loop`, one per judge, from the same warm starts) and compare, per seed and over seeds, what the verifier built and
where the loop ended.

    python benchmarks/loop_judges.py --rule RULE.json... --hybrid HYBRID.json... \\
        --out benchmarks/results/loop_vs_grpo_colour_judges.json

Each JSON's work directory is read from its recorded command (`--work`): the verifier's `stats.json`,
`pairs.jsonl` and `verdicts.jsonl` of every iteration and the final stage's greedy `answers.jsonl`. Per seed and
judge: pairs, questions with pairs, pair kinds, the share of rollouts each judge decided, verifier seconds;
the final stage's greedy and sampled accuracy and inconsistency (as the loop evaluated them: with its own judge)
and the greedy inconsistency re-judged by the rules alone (the same completions, so both judges' runs are
measured by one yardstick); pairs that rest on an LLM verdict; and, per iteration, whether both runs saw the
same rollouts (iteration 1's GRPO fit does not depend on the judge) and how many pairs the two share.
"""

from __future__ import annotations

import argparse
import json
import shlex
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks import loop_vs_grpo as lab
from benchmarks.harness import REPO, write_json

FINAL = ("accuracy", "sampled_accuracy", "pass_at_k", "inconsistency_rate", "sampled_inconsistency_rate",
         "format_rate", "sampled_format_rate")  # fmt: skip
JUDGE_SETTINGS = ("judge", "judge_model", "judge_mode", "judge_min_confidence")


def _lines(path: Path) -> list[dict[str, Any]]:
    """A JSONL file's objects through the verifier's reader (a bad line names its file and line); none if absent."""
    from lightning_veripo.verifier.run import read_jsonl

    return [d for _, d in read_jsonl(path)] if path.exists() else []


def _work_dir(result: dict[str, Any]) -> Path:
    argv = shlex.split(result["command"])
    if "--work" not in argv:
        raise SystemExit(f"the run {result['command']!r} names no --work directory: its files cannot be read")
    return Path(argv[argv.index("--work") + 1])


def load(paths: list[Path]) -> dict[str, Any]:
    """One judge's runs merged: rows by seed, the setting (the same in every run) and each seed's work dir."""
    results = [json.loads(p.read_text()) for p in paths]
    settings = {json.dumps(r["setting"], sort_keys=True) for r in results}
    if len(settings) != 1 or len({r["split"] for r in results}) != 1:
        raise SystemExit(f"the runs {paths} differ in their settings; merge only runs of one setting")
    out: dict[str, Any] = {"setting": results[0]["setting"], "split": results[0]["split"], "commands": [],
                           "total_s": 0.0, "seeds": {}}  # fmt: skip
    for r in results:
        out["commands"].append(r["command"])
        out["total_s"] += r["total_s"]
        for seed in r["seeds"]:
            out["seeds"][seed] = {"work": _work_dir(r) / f"seed_{seed}" / "loop",
                                  "rows": [x for x in r["rows"] if x["seed"] == seed and x["arm"] == "loop"]}  # fmt: skip
    return out


def _verdict_judges(verifier: Path) -> dict[tuple[str, int, int], str]:
    return {
        (v["problem_id"], v["step"], v["sample_index"]): v["judge"]
        for v in _lines(verifier / "verdicts.jsonl")
    }


def _pair_key(p: dict[str, Any]) -> tuple[str, str, str, str]:
    return (p["problem_id"], p["chosen"], p["rejected"], p["reason"])


def seed_summary(run: dict[str, Any]) -> dict[str, Any]:
    """What the verifier built in each iteration and where the loop ended, for one seed of one judge."""
    from lightning_veripo.verifier import JudgeItem, RuleJudge

    rows, work = run["rows"], run["work"]
    iterations = []
    for row in sorted((r for r in rows if "verifier" in r), key=lambda r: r["stage"]):
        it = row["stage"].split("/")[0]
        v = row["verifier"]
        judges = _verdict_judges(work / it / "verifier")
        pairs = _lines(work / it / "verifier" / "pairs.jsonl")
        on_llm = sum(
            judges.get((p["problem_id"], p[f"{side}_step"], p[f"{side}_sample_index"]), "rule") != "rule"
            for p in pairs
            for side in ("chosen", "rejected")
        )
        llm_chosen = sum(
            judges.get((p["problem_id"], p["chosen_step"], p["chosen_sample_index"]), "rule") != "rule"
            for p in pairs
        )
        dpo = next((r for r in rows if r["stage"] == f"{it}/dpo"), {})
        iterations.append({
            "iteration": it, "num_rollouts": v["num_rollouts"], "pairs": v["pairs"],
            "questions_with_pairs": v["questions_with_pairs"], "pairs_by_reason": v["pairs_by_reason"],
            "decided_by": v["decided_by"], "unjudged": v["unjudged"], "inconsistent_rate": v["inconsistent_rate"],
            "judge_time_s": round(v["judge_time_s"], 3), "verifier_s": round(v["wall_time_s"], 3),
            "pair_sides_on_llm_verdicts": on_llm, "pairs_with_llm_chosen": llm_chosen,
            "dpo_skipped": dpo.get("skipped"),
        })  # fmt: skip
    evaluated = [r for r in rows if r.get("accuracy") is not None]
    final = max(evaluated, key=lambda r: lab._stage_order(r["stage"]))
    answers = _lines(work / final["stage"] / "answers.jsonl")
    items = [JudgeItem(problem_id=a["problem_id"], question=a["problem"], options=a["options"],
                       reasoning=_think(a["completion"]), answer=a["answer"], completion=a["completion"],
                       problem_type="multiple choice") for a in answers]  # fmt: skip
    verdicts = RuleJudge().judge(items)
    judged = [v.consistent for v in verdicts if v.consistent is not None]
    by_llm = sum("transformers:" in a["rationale"] and a["rationale"].startswith("rule:") for a in answers)
    return {
        "final_stage": final["stage"],
        **{k: final.get(k) for k in FINAL},
        "inconsistency_rate_rule_judged": round(judged.count(False) / max(len(judged), 1), 6),
        "greedy_answers_judged_by_llm": by_llm,
        "iterations": iterations,
        "pairs_total": sum(i["pairs"] for i in iterations),
        "questions_with_pairs_total": sum(i["questions_with_pairs"] for i in iterations),
        "verifier_s_total": round(sum(i["verifier_s"] for i in iterations), 3),
        "train_cpu_s": final.get("cpu_s"),
    }


def _think(completion: str) -> str | None:
    from lightning_veripo.parsing import extract_think

    return extract_think(completion)


def pair_overlap(rule: dict[str, Any], hybrid: dict[str, Any]) -> dict[str, Any]:
    """Per iteration: did both runs' GRPO fits produce the same rollouts (iteration 1's fit does not depend on
    the judge; a later one does only through the DPO before it), and how many pairs do the two share?"""
    out = {}
    for it in sorted(p.name for p in rule["work"].glob("iter_*")):
        a, b = (run["work"] / it / "verifier" for run in (rule, hybrid))
        same = [r["completion"] for r in _lines(a / "rollouts.jsonl")] == [
            r["completion"] for r in _lines(b / "rollouts.jsonl")
        ]
        pa, pb = (Counter(_pair_key(p) for p in _lines(d / "pairs.jsonl")) for d in (a, b))
        out[it] = {"same_rollouts": same, "shared_pairs": sum((pa & pb).values()),
                   "only_rule": sum((pa - pb).values()), "only_hybrid": sum((pb - pa).values())}  # fmt: skip
    return out


def rejudge(run: dict[str, Any], seed: int, setting: dict[str, Any], split: str) -> dict[str, Any]:
    """The final stage's policy evaluated again exactly as the lab does (same questions, sampling seed and batch)
    but judged by the rules alone: the loop evaluates with its own judge, and the sampled completions are not
    kept, so this is how a hybrid run's sampled inconsistency is put on the rule judge's yardstick. Done for the
    rule runs too, as a check that reloading the merged adapters reproduces the loop's own evaluation."""
    work = run["work"]
    lab_dir = work.parents[1]
    adapters = [
        s["adapter"] for s in json.loads((work / "state.json").read_text())["finished"] if s.get("adapter")
    ]
    eval_path = lab_dir / "data" / ("test.json" if split == "test" else "val.json")
    metrics = lab.evaluate_merged(
        lab.Setting(**setting), lab_dir / f"model_{seed}", adapters, eval_path, seed
    )
    return {k: round(metrics[k], 6) for k in FINAL if k in metrics}


def _mean_ci(values: list[float]) -> dict[str, float]:
    mean, half = lab.interval95(values)
    return {"mean": round(mean, 4), "ci95": round(half, 4)}


SUMMED = ("pairs_total", "questions_with_pairs_total", "verifier_s_total", "accuracy", "sampled_accuracy",
          "inconsistency_rate", "inconsistency_rate_rule_judged", "sampled_inconsistency_rate", "pass_at_k",
          "format_rate")  # fmt: skip


def compare(rule: dict[str, Any], hybrid: dict[str, Any], rejudged: bool = False) -> dict[str, Any]:
    setting = {k: v for k, v in rule["setting"].items() if k not in JUDGE_SETTINGS}
    if setting != {k: v for k, v in hybrid["setting"].items() if k not in JUDGE_SETTINGS}:
        raise SystemExit("the rule and hybrid runs differ in more than the judge: not comparable")
    seeds = sorted(set(rule["seeds"]) & set(hybrid["seeds"]))
    per_seed = []
    for seed in seeds:
        r, h = seed_summary(rule["seeds"][seed]), seed_summary(hybrid["seeds"][seed])
        if rejudged:
            for x, run in ((r, rule), (h, hybrid)):
                x["rule_judged"] = rejudge(run["seeds"][seed], seed, run["setting"], run["split"])
                x["sampled_inconsistency_rate_rule_judged"] = x["rule_judged"]["sampled_inconsistency_rate"]
        per_seed.append({"seed": seed, "rule": r, "hybrid": h,
                         "pair_overlap": pair_overlap(rule["seeds"][seed], hybrid["seeds"][seed])})  # fmt: skip
    summed = (*SUMMED, *(["sampled_inconsistency_rate_rule_judged"] if rejudged else []))
    summary: dict[str, Any] = {}
    for judge in ("rule", "hybrid"):
        summary[judge] = {k: _mean_ci([float(s[judge][k]) for s in per_seed]) for k in summed}
        for it in ("iter_1", "iter_2"):
            these = [i for s in per_seed for i in s[judge]["iterations"] if i["iteration"] == it]
            reasons = sorted({k for i in these for k in i["pairs_by_reason"]})
            deciders = sorted({k for i in these for k in i["decided_by"]})
            summary[judge][it] = {
                "pairs": _mean_ci([i["pairs"] for i in these]),
                "questions_with_pairs": _mean_ci([i["questions_with_pairs"] for i in these]),
                "pairs_by_reason": {k: _mean_ci([i["pairs_by_reason"].get(k, 0) for i in these]) for k in reasons},
                "decided_by": {k: _mean_ci([i["decided_by"].get(k, 0.0) for i in these]) for k in deciders},
                "unjudged": _mean_ci([i["unjudged"] for i in these]),
                "verifier_s": _mean_ci([i["verifier_s"] for i in these]),
                "pairs_with_llm_chosen": _mean_ci([i["pairs_with_llm_chosen"] for i in these]),
            }  # fmt: skip
    summary["hybrid_minus_rule"] = {
        k: {"per_seed": [round(s["hybrid"][k] - s["rule"][k], 4) for s in per_seed],
            **_mean_ci([s["hybrid"][k] - s["rule"][k] for s in per_seed])}
        for k in summed
    }  # fmt: skip
    return {"seeds": seeds, "setting": rule["setting"], "hybrid_setting": hybrid["setting"],
            "commands": {"rule": rule["commands"], "hybrid": hybrid["commands"]},
            "total_s": {"rule": round(rule["total_s"], 1), "hybrid": round(hybrid["total_s"], 1)},
            "per_seed": per_seed, "summary": summary,
            "rows": {"rule": [x for s in seeds for x in rule["seeds"][s]["rows"]],
                     "hybrid": [x for s in seeds for x in hybrid["seeds"][s]["rows"]]}}  # fmt: skip


def print_tables(out: dict[str, Any]) -> None:
    head = ("seed", "judge", "pairs i1/i2", "q w/ pairs", "LLM share i1/i2", "LLM-chosen", "verifier s",
            "greedy", "sampled", "incons.", "incons.(rule)", "sampled incons.")  # fmt: skip
    print(" | ".join(head))
    for s in out["per_seed"]:
        for judge in ("rule", "hybrid"):
            x = s[judge]
            its = x["iterations"]
            llm = "/".join(f"{sum(v for k, v in i['decided_by'].items() if k != 'rule'):.3f}" for i in its)
            print(" | ".join(str(c) for c in (
                s["seed"], judge, "/".join(str(i["pairs"]) for i in its),
                "/".join(str(i["questions_with_pairs"]) for i in its), llm,
                "/".join(str(i["pairs_with_llm_chosen"]) for i in its), f"{x['verifier_s_total']:.2f}",
                f"{x['accuracy']:.3f}", f"{x['sampled_accuracy']:.3f}", f"{x['inconsistency_rate']:.3f}",
                f"{x['inconsistency_rate_rule_judged']:.3f}", f"{x['sampled_inconsistency_rate']:.3f}")))  # fmt: skip
        print(f"   seed {s['seed']}, rule vs hybrid pairs: {s['pair_overlap']}")
    for s in out["per_seed"]:
        for judge in ("rule", "hybrid"):
            if "rule_judged" in s[judge]:
                print(f"seed {s['seed']} {judge}: re-evaluated, rule-judged: {s[judge]['rule_judged']}")
    for judge in ("rule", "hybrid", "hybrid_minus_rule"):
        print(judge, {k: (v["mean"], v["ci95"]) for k, v in out["summary"][judge].items() if "mean" in v})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rule", type=Path, nargs="+", required=True, help="the lab's JSON(s) with judge=rule"
    )
    parser.add_argument(
        "--hybrid", type=Path, nargs="+", required=True, help="the lab's JSON(s), judge=hybrid"
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks/results/loop_vs_grpo_colour_judges.json"
    )
    parser.add_argument("--rejudge", action="store_true",
                        help="evaluate each final policy again, judged by the rules alone (~20 s a run)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rule, hybrid = load(args.rule), load(args.hybrid)
    if rule["setting"]["judge"] != "rule" or hybrid["setting"]["judge"] != "hybrid":
        parser.error("--rule takes runs with judge=rule, --hybrid runs with judge=hybrid")
    out = compare(rule, hybrid, args.rejudge)
    print_tables(out)
    write_json(args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
