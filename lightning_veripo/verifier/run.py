"""Run the Rollout-Aware Verifier: judge a GRPO fit's rollouts, build preference pairs, write them for DPO.

A plain, idempotent function, so it runs the same from `VerifierCallback` at the end of a GRPO fit, from the
loop driver, or by hand on saved rollouts (`veripo verify --help`). The same
rollouts, judge and config give byte-identical files except the timing fields (`latency_s` in
verdicts.jsonl, `wall_time_s` and `judge_time_s` in stats.json). Files in `out_dir`, each written atomically:

- `rollouts.jsonl`  one `Rollout.to_dict()` per line, sorted by (problem_id, step, sample_index);
- `verdicts.jsonl`  `{"problem_id", "step", "sample_index", **Verdict.to_dict()}`, one per rollout, same order;
- `pairs.jsonl`     one `PreferencePair.to_dict()` per line;
- `stats.json`      the summary from `verifier_stats`; written last, so its presence means the run completed.

A run removes the previous run's `stats.json` (and temp files a killed run left behind) before it writes
anything, so a run that is killed (SIGTERM) or fails (disk full) part-way leaves each file either complete from
the previous run or complete from this one, never cut short, and no `stats.json` to claim it finished.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lightning_veripo.files import read_jsonl, write_jsonl_atomic, write_text_atomic
from lightning_veripo.records import Rollout
from lightning_veripo.verifier.addressing import addresses_judge
from lightning_veripo.verifier.judges import RuleJudge
from lightning_veripo.verifier.pairs import PairConfig, PairStats, PreferencePair, build_pairs, is_correct
from lightning_veripo.verifier.protocol import Judge, JudgeItem, JudgeUnavailableError, Verdict

ROLLOUTS_FILE = "rollouts.jsonl"
VERDICTS_FILE = "verdicts.jsonl"
PAIRS_FILE = "pairs.jsonl"
STATS_FILE = "stats.json"
# In the rationale of every verdict a failing judge left unjudged (an exception, a server that did not answer):
# judge_rollouts, the judges' skeleton, OpenAIJudge and HybridJudge all write it.
JUDGE_ERROR = "judge error"


def judge_rollouts(
    rollouts: Sequence[Rollout], judge: Judge, batch_size: int = 64, progress: bool = True
) -> list[Verdict]:
    """One verdict per rollout, in order. A batch whose judge raises (or miscounts) becomes unjudged verdicts
    carrying the error, so one bad batch cannot sink the verifier; `JudgeUnavailableError` still raises. A
    rollout that addresses its judge is judged inconsistent and marked so whatever the judge said (the judges
    of this package do not even ask; a judge of one's own is overruled here)."""
    verdicts: list[Verdict] = []
    name = getattr(judge, "name", type(judge).__name__)
    with tqdm(total=len(rollouts), desc="verifier: judging", unit="rollout", disable=not progress) as bar:
        for start in range(0, len(rollouts), batch_size):
            items = [JudgeItem.from_rollout(r) for r in rollouts[start : start + batch_size]]
            try:
                batch = judge.judge(items)
                if len(batch) != len(items):
                    raise RuntimeError(f"{name} returned {len(batch)} verdicts for {len(items)} rollouts")
            except JudgeUnavailableError:
                raise
            except Exception as err:
                why = f"judge error: {type(err).__name__}: {err}"
                batch = [
                    Verdict(consistent=None, truncated=i.truncated, rationale=why, judge=name) for i in items
                ]
            for item, verdict in zip(items, batch, strict=True):
                # the package's judges marked it already (RolloutJudge._rule_checks); a judge of one's own is
                # checked here
                if verdict.addresses_judge:
                    continue
                if writes_to_judge := addresses_judge(item.reasoning, item.answer):
                    verdict.consistent, verdict.addresses_judge = False, True
                    verdict.rationale = f"inconsistent: {writes_to_judge} ({name} said: {verdict.rationale})"
            verdicts.extend(batch)
            bar.update(len(items))
    return verdicts


def verifier_stats(
    rollouts: Sequence[Rollout], verdicts: Sequence[Verdict], pair_stats: PairStats, config: PairConfig
) -> dict[str, Any]:
    """The run's summary: rates over rollouts (consistency rates over judged ones; None when there are none),
    how many rollouts are unjudged and how many of those were lost to a judge error (`judge_errors`: the judge
    raised or its server did not answer, rather than a reply that names no verdict), how many rollouts wrote to
    their judge (`addresses_judge`: judged inconsistent, never chosen), the share of rollouts
    each judge decided (`decided_by`, by `Verdict.judge`: a `HybridJudge` splits them between the rules and
    the LLM), pair counts by reason, skipped questions by reason, and the always-solved question ids."""
    n, judged = len(rollouts), [v for v in verdicts if v.judged]
    consistent = sum(v.consistent is True for v in judged)

    def rate(count: int, total: int) -> float | None:
        return count / total if total else None

    return {
        "num_rollouts": n,
        "num_questions": pair_stats.num_questions,
        "judged": len(judged),
        "unjudged": n - len(judged),
        "judge_errors": sum(not v.judged and JUDGE_ERROR in v.rationale for v in verdicts),
        "addresses_judge": sum(v.addresses_judge for v in verdicts),
        "consistent_rate": rate(consistent, len(judged)),
        "inconsistent_rate": rate(len(judged) - consistent, len(judged)),
        "decided_by": {
            name: rate(sum(v.judge == name for v in judged), n) for name in sorted({v.judge for v in judged})
        },
        "repetitive_rate": rate(sum(v.repetitive for v in verdicts), n),
        "truncated_rate": rate(sum(v.truncated for v in verdicts), n),
        "accuracy": rate(sum(r.accuracy for r in rollouts), n),
        "acc_cons_rate": rate(
            sum(
                is_correct(r, config) and v.consistent is True
                for r, v in zip(rollouts, verdicts, strict=True)
            ),
            n,
        ),
        "pairs": pair_stats.num_pairs,
        "pairs_by_reason": pair_stats.pairs_by_reason,
        "questions_with_pairs": pair_stats.questions_with_pairs,
        "questions_skipped": pair_stats.questions_skipped,
        "skipped_problem_ids": pair_stats.skipped_problem_ids,
        "always_solved": pair_stats.always_solved,
    }


def run_verifier(
    rollouts: Iterable[Rollout],
    judge: Judge | None,
    pair_config: PairConfig | None,
    out_dir: str | Path,
    *,
    judge_batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Judge every rollout, build the preference pairs, write the four files to `out_dir`; return the stats.

    `rollouts` may be a stream (a fit's spool, `VerifierCallback.spooled_rollouts`): it is read once, and the
    files are written row by row. `judge=None` means `RuleJudge()`, `pair_config=None` means `PairConfig()`.
    """
    t0 = time.perf_counter()
    judge = judge if judge is not None else RuleJudge()
    config = pair_config if pair_config is not None else PairConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ordered = sorted(rollouts, key=lambda r: (r.record.problem_id, r.step, r.sample_index))

    t_judge = time.perf_counter()
    verdicts = judge_rollouts(ordered, judge, judge_batch_size, progress)
    judge_time = time.perf_counter() - t_judge
    pairs, pair_stats = build_pairs(ordered, verdicts, config)

    # From here until stats.json is written again the directory mixes this run's files with the last run's:
    # without stats.json nobody (VerifierCallback, the loop driver) takes it for a finished run.
    for name in (ROLLOUTS_FILE, VERDICTS_FILE, PAIRS_FILE, STATS_FILE):
        for stale in out.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    (out / STATS_FILE).unlink(missing_ok=True)
    write_jsonl_atomic(out / ROLLOUTS_FILE, (r.to_dict() for r in ordered))
    keys = (
        {"problem_id": r.record.problem_id, "step": r.step, "sample_index": r.sample_index} for r in ordered
    )
    write_jsonl_atomic(
        out / VERDICTS_FILE, ({**k, **v.to_dict()} for k, v in zip(keys, verdicts, strict=True))
    )
    write_jsonl_atomic(out / PAIRS_FILE, (p.to_dict() for p in pairs))
    stats = verifier_stats(ordered, verdicts, pair_stats, config)
    stats["judge"] = getattr(judge, "name", type(judge).__name__)
    stats["judge_time_s"] = judge_time
    stats["wall_time_s"] = time.perf_counter() - t0
    write_text_atomic(out / STATS_FILE, json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    return stats


def run_verifier_from_files(
    rollouts_path: str | Path,
    out_dir: str | Path,
    judge: Judge | None = None,
    pair_config: PairConfig | None = None,
    judge_batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """`run_verifier` on a saved rollouts.jsonl (e.g. to re-judge a finished GRPO fit with another judge)."""
    return run_verifier(
        read_rollouts(rollouts_path),
        judge,
        pair_config,
        out_dir,
        judge_batch_size=judge_batch_size,
        progress=progress,
    )


def read_rollouts(path: str | Path) -> list[Rollout]:
    """Rollouts from a rollouts.jsonl; a bad line raises with its file and line number."""
    out = []
    for lineno, d in read_jsonl(path):
        try:
            out.append(Rollout.from_dict(d))
        except (KeyError, TypeError, ValueError) as err:  # ValueError: dict() of a JSON string
            raise ValueError(
                f"{path}:{lineno}: not a Rollout record ({err!r}); expected Rollout.to_dict()"
            ) from err
    return out


def read_verdicts(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a verdicts.jsonl: the rollout key (problem_id, step, sample_index) plus the verdict fields."""
    return [d for _, d in read_jsonl(path)]


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """Preference pairs from a pairs.jsonl; a bad line raises with its file and line number."""
    out = []
    for lineno, d in read_jsonl(path):
        try:
            out.append(PreferencePair.from_dict(d))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}:{lineno}: not a preference pair ({err!r})") from err
    return out
