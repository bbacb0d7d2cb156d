"""What a GRPO fit's rollouts cost its checkpoints: the VerifierCallback's checkpoint size, save time, restore time
and resident memory after 1k / 10k / 100k realistic rollouts (~1.5 KB of reasoning, 400 token ids each).

Each size runs in its own subprocess (a clean RSS), driving the callback as a fit does: steps of 64 rollouts
through `on_train_batch_end`, each followed by a checkpoint; timed are the last 5 checkpoints (the median of what
each costs the callback: its `state_dict`, which under the spool includes the fsync of the step's rollouts,
and `torch.save` of it as Lightning writes it), then a restore (`torch.load`,
`load_state_dict`, and `on_fit_start`, where the spool is cut back to the mark). RSS per held rollout is the
growth of the process's resident memory from before the first rollout to after the last, divided by their number
(the rollouts are made batch by batch and dropped, as the GRPO module's outputs are).

    python benchmarks/verifier_state.py                                   # the installed lightning_veripo
    git archive 453c7a6 | tar -x -C /tmp/before && ln -s ../callbacks /tmp/before/lightning_veripo/callbacks
    python benchmarks/verifier_state.py --before-python python3 --before-pythonpath /tmp/before   # and the old
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

OUT = Path(__file__).resolve().parent / "results" / "verifier_state.json"
SAVES = 5  # timed checkpoints per size, each after a step of STEP new rollouts: the median is reported
STEP = 64
WORDS = "the red square moves left so the answer is B because its colour and direction both match".split()


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def make_batch(start: int, n: int, rng: random.Random) -> list[Any]:
    from lightning_veripo.records import Rollout, VideoQARecord

    out = []
    for i in range(start, start + n):
        record = VideoQARecord(f"q{i // 8}", "Which square moves, and where?", "video", "multiple choice",
                               "<answer>B</answer>", "clips/q.mp4", ("A. red, left", "B. blue, up"))  # fmt: skip
        reasoning = " ".join(rng.choice(WORDS) for _ in range(300))[:1500]
        out.append(Rollout(
            record=record, completion=f"<think>{reasoning}</think><answer>B</answer>",
            completion_ids=[rng.randrange(151_000) for _ in range(400)],
            rewards={"accuracy": 1.0, "format": 1.0}, reward=2.0, advantage=0.5, group_mean_accuracy=0.5,
            truncated=False, step=i // 64, sample_index=i % 8, prompt="<video> Which square moves?",
            sampling={"temperature": 1.0, "frames": [0, 4, 8, 12]},
        ))  # fmt: skip
    return out


def measure(n: int) -> dict[str, Any]:
    """One size in this process: the numbers of one row."""
    import torch

    import lightning_veripo
    from lightning_veripo.callbacks.verifier import VerifierCallback

    with tempfile.TemporaryDirectory() as tmp:
        trainer = SimpleNamespace(default_root_dir=tmp, global_rank=0, world_size=1, is_global_zero=True)
        # an older VerifierCallback has no spool (it keeps the rollouts in its state)
        spooled = "spool_dir" in inspect.signature(VerifierCallback).parameters
        options = {"progress": False, **({"spool_dir": str(Path(tmp) / "rollouts")} if spooled else {})}
        callback = VerifierCallback(**options)
        callback.setup(trainer, None, "fit")
        callback.on_fit_start(trainer, None)
        rng = random.Random(0)
        gc.collect()
        rss_before = rss_kib()
        path = Path(tmp) / "last.ckpt"

        def feed(start: int, stop: int) -> None:
            for first in range(start, stop, STEP):
                batch = make_batch(first, min(STEP, stop - first), rng)
                callback.on_train_batch_end(trainer, None, {"rollouts": batch}, None, first // STEP)
                del batch

        def save() -> tuple[float, float]:
            wall, cpu = time.perf_counter(), time.process_time()
            torch.save({"callbacks": {"VerifierCallback": callback.state_dict()}}, path)
            return time.perf_counter() - wall, time.process_time() - cpu

        held_before_timing = n - STEP * SAVES
        t0 = time.perf_counter()
        feed(0, held_before_timing)
        save()  # the checkpoints of the steps so far, untimed: each synced its step's rollouts
        saves = []
        for k in range(SAVES):  # a step of 64 rollouts, then its checkpoint, as a fit saves it
            feed(held_before_timing + k * STEP, held_before_timing + (k + 1) * STEP)
            saves.append(save())
        feed_s = time.perf_counter() - t0
        gc.collect()
        rss_after = rss_kib()
        save_s = statistics.median(w for w, _ in saves)
        save_cpu_s = statistics.median(c for _, c in saves)
        size = path.stat().st_size

        t0 = time.perf_counter()
        state = torch.load(path, map_location="cpu", weights_only=True)["callbacks"]["VerifierCallback"]
        restored = VerifierCallback(**options)
        restored.setup(trainer, None, "fit")
        restored.load_state_dict(state)
        restored.on_fit_start(trainer, None)
        restore_s = time.perf_counter() - t0
    return {
        "rollouts": n,
        "library": str(Path(lightning_veripo.__file__).parent.parent),
        "checkpoint_bytes": size,
        "save_s": round(save_s, 4),
        "save_cpu_s": round(save_cpu_s, 4),
        "restore_s": round(restore_s, 4),
        "feed_s": round(feed_s, 3),
        "rss_growth_kib": rss_after - rss_before,
        "rss_per_rollout_bytes": round((rss_after - rss_before) * 1024 / n, 1),
    }


def run_sizes(python: str, sizes: list[int], pythonpath: str | None = None) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else None
    rows = []
    for n in sizes:
        command = [python, __file__, "--one", str(n)]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {python}: {n} rollouts done", file=sys.stderr, flush=True)
    return rows


def table(label: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"{label} ({rows[0]['library']})",
             "| rollouts | checkpoint | save s (CPU s) | restore s | RSS growth | RSS per rollout |",
             "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['rollouts']:,} | {r['checkpoint_bytes'] / 1e6:.3f} MB | {r['save_s']:.4f} ({r['save_cpu_s']:.4f}) | "
                     f"{r['restore_s']:.4f} | {r['rss_growth_kib'] / 1024:.1f} MiB | "
                     f"{r['rss_per_rollout_bytes']:.0f} B |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--before-python", help="also measure the lightning_veripo this interpreter imports")
    parser.add_argument("--before-pythonpath", help="PYTHONPATH of --before-python (e.g. an export of main)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    result: dict[str, Any] = {"sizes": args.sizes}
    if args.before_python:
        result["before"] = run_sizes(args.before_python, args.sizes, args.before_pythonpath)
    result["after"] = run_sizes(sys.executable, args.sizes)
    for label in ("before", "after"):
        if label in result:
            print(table(label, result[label]) + "\n")
    after = result["after"]
    first, last = after[0], after[-1]
    result["after_flat"] = {
        "checkpoint_bytes_ratio": last["checkpoint_bytes"] / first["checkpoint_bytes"],
        "save_s_ratio": last["save_s"] / first["save_s"],
        "save_cpu_s_ratio": last["save_cpu_s"] / first["save_cpu_s"],
        "max_rss_per_rollout_bytes": max(r["rss_per_rollout_bytes"] for r in after),
    }
    print(json.dumps(result["after_flat"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
