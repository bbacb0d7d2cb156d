"""What the VerIPO loop's two parts do apart: its DPO stages and its data filter (80% of the always-solved
questions dropped from the next GRPO fit), as a 2 x 2 over the same warm starts, paired by seed.

    python benchmarks/loop_ablation.py \\
        --split test FILTERED.json UNFILTERED.json --split val FILTERED_DEV.json UNFILTERED_DEV.json \\
        --out benchmarks/results/loop_vs_grpo_colour_round3_ablation.json

Each `--split NAME FILTERED UNFILTERED` names two runs of `benchmarks/loop_vs_grpo.py` (or their `--rescore` on
another split) from the same warm starts and the same setting but `discard_solved_fraction`:

- FILTERED: arms `grpo`, `loop` and `nodpo` at a fraction > 0 (the paper's 0.8);
- UNFILTERED: arm `loop` at fraction 0 (called `loop0` here).

The four cells: GRPO alone (no DPO, no filter: it runs no verifier), `nodpo` (filter, no DPO), `loop0` (DPO, no
filter) and `loop` (both). From each seed's last stage of each cell:

- DPO's effect: the mean of `loop - nodpo` and `loop0 - grpo`;
- the filter's effect: the mean of `nodpo - grpo` and `loop - loop0`;
- their interaction: `(loop - nodpo) - (loop0 - grpo)`;

each with its mean over seeds and a 95% t-interval, beside the four simple differences. Prints a table per split
and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks import loop_vs_grpo as lab
from benchmarks.harness import write_json

KEYS = ("accuracy", "sampled_accuracy", "sampled_inconsistency_rate", "sampled_reasoning_tokens")
CELLS = ("grpo", "nodpo", "loop0", "loop")
# name -> its per-seed value from the four cells' final rows
EFFECTS = {
    "dpo": lambda grpo, nodpo, loop0, loop: ((loop - nodpo) + (loop0 - grpo)) / 2,
    "filter": lambda grpo, nodpo, loop0, loop: ((nodpo - grpo) + (loop - loop0)) / 2,
    "interaction": lambda grpo, nodpo, loop0, loop: (loop - nodpo) - (loop0 - grpo),
    "loop - grpo": lambda grpo, nodpo, loop0, loop: loop - grpo,
    "loop - nodpo": lambda grpo, nodpo, loop0, loop: loop - nodpo,
    "nodpo - grpo": lambda grpo, nodpo, loop0, loop: nodpo - grpo,
    "loop0 - grpo": lambda grpo, nodpo, loop0, loop: loop0 - grpo,
    "loop - loop0": lambda grpo, nodpo, loop0, loop: loop - loop0,
}


def cells(filtered: dict[str, Any], unfiltered: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """(cell, seed) -> final row, after checking that the two runs differ only in the filter's share."""
    a, b = dict(filtered["setting"]), dict(unfiltered["setting"])
    share_a, share_b = a.pop("discard_solved_fraction", 0.8), b.pop("discard_solved_fraction", 0.8)
    if a != b:
        changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        raise ValueError(f"the two runs differ in more than discard_solved_fraction: {changed}")
    if not share_a > 0 or share_b != 0:
        raise ValueError(
            f"FILTERED must drop solved questions (its discard_solved_fraction is {share_a}) and UNFILTERED "
            f"none (its is {share_b})"
        )
    final = lab.final_rows(filtered["rows"], ("grpo", "nodpo", "loop"))
    final |= {("loop0", s): r for (_, s), r in lab.final_rows(unfiltered["rows"], ("loop",)).items()}
    return final


def effects(final: dict[tuple[str, int], dict[str, Any]]) -> dict[str, Any]:
    """Every effect and simple difference per metric: per seed (the seeds that have all four cells), mean, 95%."""
    seeds = sorted(s for s in {s for _, s in final} if all((c, s) in final for c in CELLS))
    if len(seeds) < 2:
        raise ValueError(f"seeds with all four cells ({', '.join(CELLS)}): {seeds}; at least 2 are needed")
    out: dict[str, Any] = {"seeds": seeds, "final_stage": {c: final[(c, seeds[0])]["stage"] for c in CELLS}}
    for key in KEYS:
        out[key] = {}
        for name, fn in EFFECTS.items():
            values = [fn(*(final[(c, s)][key] for c in CELLS)) for s in seeds]
            mean, half = lab.interval95(values)
            out[key][name] = {
                "per_seed": [round(v, 4) for v in values],
                "mean": round(mean, 4),
                "ci95": round(half, 4),
            }
        out[key]["cells"] = {c: round(sum(final[(c, s)][key] for s in seeds) / len(seeds), 4) for c in CELLS}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--split", nargs=3, action="append", required=True, metavar=("NAME", "FILTERED", "UNFILTERED")
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result: dict[str, Any] = {
        "command": " ".join(["python benchmarks/loop_ablation.py", *(argv or sys.argv[1:])])
    }
    for name, filtered, unfiltered in args.split:
        try:
            runs = [json.loads(Path(p).read_text()) for p in (filtered, unfiltered)]
            result[name] = effects(cells(*runs))
        except (OSError, ValueError, KeyError) as err:
            parser.error(f"--split {name}: {err}")
        print(f"\n{name}: seeds {result[name]['seeds']}; mean of the last stage per cell and effects (± 95%)")
        for key in KEYS:
            means = ", ".join(f"{c} {v:.3f}" for c, v in result[name][key]["cells"].items())
            print(f"  {key}: {means}")
            for effect, d in result[name][key].items():
                if effect != "cells":
                    print(f"    {effect:13} {d['mean']:+.3f} ± {d['ci95']:.3f}   per seed {d['per_seed']}")
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
