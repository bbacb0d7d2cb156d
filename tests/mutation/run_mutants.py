"""Targeted mutation run (issue 13.6): how many deliberate bugs in the numerical core do the fast tests catch?

Each mutant replaces one exact snippet of one library file (an operator flipped, a constant changed, a term
dropped, a condition inverted). The mutants are applied one at a time to a throw-away copy of the repository
under --workdir (never to this checkout: other processes may be importing it), and the fast tests of that file
run on the copy (`pytest -x -q -m "not slow"`, PYTHONPATH pointing at the copy). A mutant is *killed* when
pytest fails or times out, *survived* when it passes.

The library sources are always those of --source (default HEAD). The tests are those of --tests-from
(default: the same commit), so the same mutants can be scored against an older suite ("before") and the
current one ("after"). An unmutated baseline runs first; tests that already fail on the unmutated copy (an
older suite against newer sources) are deselected, so only mutations can kill.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python tests/mutation/run_mutants.py --tests-from 88ba763 \
        --json /tmp/mut_before.json
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python tests/mutation/run_mutants.py --json /tmp/mut_after.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Which fast test files run for a mutant of each library file.
TESTS = {
    "lightning_veripo/losses.py": ["tests/test_losses.py"],
    "lightning_veripo/rewards.py": ["tests/test_rewards.py"],
    "lightning_veripo/metrics.py": ["tests/test_metrics.py", "tests/test_evaluate.py"],
    "lightning_veripo/verifier/pairs.py": ["tests/test_pairs.py"],
    "lightning_veripo/grpo.py": ["tests/test_grpo_knobs.py", "tests/test_grpo.py"],
}


@dataclass(frozen=True)
class Mutant:
    id: str
    path: str
    old: str
    new: str
    what: str


L, R, M, P, G = (
    "lightning_veripo/losses.py",
    "lightning_veripo/rewards.py",
    "lightning_veripo/metrics.py",
    "lightning_veripo/verifier/pairs.py",
    "lightning_veripo/grpo.py",
)

MUTANTS = [
    # losses.py
    Mutant(
        "L1",
        L,
        "/ (group_size - 1)).sqrt()",
        "/ group_size).sqrt()",
        "group std: biased /G instead of /(G-1)",
    ),
    Mutant(
        "L2",
        L,
        "(group_std(rewards, group_size)[:, None] + eps)",
        "(group_std(rewards, group_size)[:, None] - eps)",
        "advantage: std - eps",
    ),
    Mutant(
        "L4",
        L,
        "return total.sum() / count.sum().clamp(min=1.0)",
        "return total.sum() / count.numel()",
        "masked_mean divides by all positions",
    ),
    Mutant(
        "L5",
        L,
        "return torch.where(mask.bool(), per_token_logps.float(), 0.0).sum(-1)",
        "return per_token_logps.float().sum(-1)",
        "sequence_logps ignores the mask",
    ),
    Mutant(
        "L6",
        L,
        "return torch.exp(delta) - delta - 1",
        "return torch.exp(delta) + delta - 1",
        "k3 KL: sign of delta",
    ),
    Mutant(
        "L7",
        L,
        "return seq_log_ratio.detach()[:, None] + per_token_logps",
        "return seq_log_ratio[:, None] + per_token_logps",
        "GSPO: sequence ratio not detached (gradient)",
    ),
    Mutant(
        "L8",
        L,
        "return (per_token_loss.sum(-1) / mask.sum(-1).clamp(min=1)).mean()",
        "return per_token_loss.sum() / mask.sum().clamp(min=1)",
        "loss_type grpo aggregates like dapo",
    ),
    Mutant(
        "L9",
        L,
        "length = per_token_loss.size(1) if max_completion_length is None else max_completion_length",
        "length = per_token_loss.size(1)",
        "dr_grpo ignores max_completion_length",
    ),
    Mutant(
        "L10",
        L,
        "torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)",
        "torch.clamp(ratio, 1 - epsilon_high, 1 + epsilon_low)",
        "clip bounds swapped",
    ),
    Mutant(
        "L11",
        L,
        "-torch.min(ratio * adv, clipped * adv)",
        "-torch.max(ratio * adv, clipped * adv)",
        "min -> max in surrogate",
    ),
    Mutant("L12", L, "per_token_loss + beta * kl", "per_token_loss - beta * kl", "KL penalty sign"),
    Mutant(
        "L14",
        L,
        "losses = -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)",
        "losses = -(1 - ls) * F.logsigmoid(z) + ls * F.logsigmoid(-z)",
        "cDPO label-smoothing term sign",
    ),
    Mutant(
        "L15",
        L,
        "losses = (c - r - 1 / (2 * beta)) ** 2",
        "losses = (c - r - 1 / beta) ** 2",
        "IPO target 1/(2b) -> 1/b",
    ),
    # rewards.py
    Mutant(
        "R1",
        R,
        "math.isclose(value, target, rel_tol=rel_tol, abs_tol=abs_tol)",
        "math.isclose(value, target, rel_tol=0.05, abs_tol=abs_tol)",
        "numerical tolerance 5%",
    ),
    Mutant("R3", R, "return 1.0 if pred == 0.0 else 0.0", "return 0.0", "MRA with gt 0 never scores"),
    Mutant(
        "R4",
        R,
        "return min(1.0, max(0.0, 1.0 - wer))",
        "return min(1.0, max(0.0, 1.0 - wer / 2))",
        "OCR: half the WER",
    ),
    Mutant(
        "R5", R, 'scores["rougeL_fmeasure"]', 'scores["rougeL_precision"]', "free-form: ROUGE-L precision"
    ),
    Mutant(
        "R6",
        R,
        "return 1.0 if named == {gt_letter} else 0.0",
        "return 1.0 if gt_letter in named else 0.0",
        "choice: naming several letters counts",
    ),
    Mutant(
        "R7",
        R,
        "    if not pred:\n        return 0.0\n    gt = ground_truth",
        "    if pred is None:\n        return 0.0\n    gt = ground_truth",
        "empty <answer> is scored",
    ),
    Mutant(
        "R8", R, "return words / self.min_words", "return 1.0", "length reward: no penalty below the window"
    ),
    Mutant(
        "R9",
        R,
        "return self.max_words / words",
        "return words / self.max_words",
        "length reward above window inverted",
    ),
    Mutant(
        "R10", R, "total += weight * components[name]", "total += components[name]", "reward weights ignored"
    ),
    # metrics.py
    Mutant(
        "M1",
        M,
        "self.inconsistent += float(not c)",
        "self.inconsistent += float(c)",
        "counts consistent as inconsistent",
    ),
    Mutant(
        "M2",
        M,
        "self.correct_consistent += float(c) * float(accuracy[i])",
        "self.correct_consistent += float(accuracy[i])",
        "Acc-Cons ignores the verdict",
    ),
    Mutant(
        "M3",
        M,
        '"inconsistency_rate": self.inconsistent / self.judged.clamp(min=1)',
        '"inconsistency_rate": self.inconsistent / total',
        "inconsistency over all, not judged",
    ),
    Mutant(
        "M4",
        M,
        'think = [extract_think(t) or "" for t in texts]',
        "think = list(texts)",
        "reasoning tokens of the whole completion",
    ),
    # verifier/pairs.py
    Mutant(
        "P1",
        P,
        "return rollout.accuracy >= threshold",
        "return rollout.accuracy > threshold",
        "correct needs > threshold",
    ),
    Mutant(
        "P2",
        P,
        "if verdict.repetitive and config.penalize_repetitive:",
        "if verdict.repetitive:",
        "penalize_repetitive ignored",
    ),
    Mutant(
        "P3",
        P,
        "if reasoning_tokens(rollout) < config.min_reasoning_tokens:",
        "if reasoning_tokens(rollout) <= config.min_reasoning_tokens:",
        "degenerate boundary",
    ),
    Mutant(
        "P4",
        P,
        "if verdict.consistent is False and config.consistency_pairs:",
        "if verdict.consistent is not True and config.consistency_pairs:",
        "unjudged correct rollouts rejected as inconsistent",
    ),
    Mutant("P5", P, "        and not verdict.repetitive\n", "", "repetitive rollouts can be chosen"),
    Mutant(
        "P7",
        P,
        "commits = not is_reflective(r, markers)",
        "commits = True",
        "reflective wrong rollouts become reflection rejects",
    ),
    Mutant(
        "P9", P, "winner = pool[used[pool_name] % len(pool)]", "winner = pool[0]", "always the first chosen"
    ),
    # grpo.py
    Mutant(
        "G1",
        G,
        "((start - lengths) / self.overlong_buffer).clamp(max=0.0)",
        "((start - lengths) / self.max_new_tokens).clamp(max=0.0)",
        "overlong penalty scaled by max_new_tokens",
    ),
    Mutant(
        "G2",
        G,
        "in_window = ((lengths >= lo) & (lengths <= hi)).float()",
        "in_window = (lengths <= hi).float()",
        "length bonus: no lower bound",
    ),
    Mutant(
        "G3",
        G,
        "helped = (ordered.mean(1, keepdim=True) >= self.temporal_mu * shuffled_acc).float()",
        "helped = (ordered.mean(1, keepdim=True) < self.temporal_mu * shuffled_acc).float()",
        "T-GRPO condition inverted",
    ),
    Mutant(
        "G4",
        G,
        "mask = mask * (~completions.truncated[rows]).long()[:, None]",
        "mask = mask * (completions.truncated[rows]).long()[:, None]",
        "mask_truncated keeps only truncated rows",
    ),
    Mutant(
        "G5",
        G,
        "self.manual_backward(loss / self.accumulate_grad_batches)",
        "self.manual_backward(loss)",
        "accumulation not averaged",
    ),
    Mutant(
        "G6", G, "if self.max_grad_norm > 0:", "if self.max_grad_norm < 0:", "gradient clipping never runs"
    ),
    Mutant(
        "G7",
        G,
        "self.val_judge = self.evaluation.judge if self.evaluation.judge is not None else RuleJudge()",
        "self.val_judge = RuleJudge()",
        "evaluation.judge ignored",
    ),
]


def copy_tree(dest: Path, source: str, tests_from: str) -> None:
    """The committed tree of `source` at `dest`, with tests/ taken from `tests_from`."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", source], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    if tests_from != source:
        shutil.rmtree(dest / "tests")
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", tests_from, "tests"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def pytest(tree: Path, files: list[str], extra: list[str], timeout: float) -> tuple[str, float, str]:
    """('pass' | 'fail' | 'timeout' | 'none', seconds, output tail)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", *extra, *files]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0, ""
    seconds = time.perf_counter() - t0
    tail = out.stdout + out.stderr
    status = {0: "pass", 5: "none"}.get(out.returncode, "fail")
    return status, seconds, tail


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", default="HEAD", help="commit whose library sources are mutated")
    parser.add_argument("--tests-from", default=None, help="commit whose tests/ run (default: --source)")
    parser.add_argument("--workdir", default="/tmp/veripo-mutation")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per pytest run")
    parser.add_argument("--only", nargs="*", default=None, help="mutant ids to run")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    tests_from = args.tests_from or args.source
    tree = Path(args.workdir) / re.sub(r"\W", "_", f"{args.source}-tests-{tests_from}")
    copy_tree(tree, args.source, tests_from)
    mutants = [m for m in MUTANTS if args.only is None or m.id in args.only]

    # Baseline: the unmutated copy must pass; tests already failing there are deselected.
    deselect: dict[str, list[str]] = {}
    for path in sorted({m.path for m in mutants}):
        files = [f for f in TESTS[path] if (tree / f).exists()]
        status, seconds, tail = pytest(tree, files, [], args.timeout * 3)
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", tail, flags=re.M)
        deselect[path] = [arg for f in failed for arg in ("--deselect", f)]
        print(f"baseline {path}: {status} in {seconds:.0f}s ({files}); deselected {failed}", flush=True)
        if status == "fail" and not failed:
            sys.exit(f"baseline fails without naming tests:\n{tail}")

    results = []
    for m in mutants:
        target = tree / m.path
        original = target.read_text()
        if original.count(m.old) != 1:
            sys.exit(f"mutant {m.id}: snippet found {original.count(m.old)} times in {m.path}")
        files = [f for f in TESTS[m.path] if (tree / f).exists()]
        target.write_text(original.replace(m.old, m.new))
        try:
            status, seconds, tail = pytest(tree, files, ["-x", *deselect[m.path]], args.timeout)
        finally:
            target.write_text(original)
        killed = status in ("fail", "timeout")
        killer = re.findall(r"^FAILED (\S+)", tail, flags=re.M)
        results.append({**m.__dict__, "status": status, "killed": killed, "seconds": round(seconds, 1),
                        "killer": killer[0] if killer else None, "tests": files})  # fmt: skip
        print(f"{m.id:4s} {'KILLED  ' if killed else 'SURVIVED'} {seconds:5.0f}s  {m.what}  "
              f"{killer[0] if killer else ''}", flush=True)  # fmt: skip

    n_killed = sum(r["killed"] for r in results)
    print(f"\nsource {args.source}, tests from {tests_from}: {n_killed}/{len(results)} killed "
          f"({100 * n_killed / max(len(results), 1):.0f}%)")  # fmt: skip
    for path in sorted({r["path"] for r in results}):
        rs = [r for r in results if r["path"] == path]
        print(f"  {path}: {sum(r['killed'] for r in rs)}/{len(rs)}")
    survivors = [r["id"] for r in results if not r["killed"]]
    print(f"  survived: {' '.join(survivors) or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"source": args.source, "tests_from": tests_from,
                                               "results": results}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
