"""The GRPO step on 2 CPU processes (gloo): FSDP2 (configs/strategies/fsdp2.yaml) against DDP, same global batch.

    python benchmarks/sharded_step.py                         # small tiny model, 2 prompts/rank, G 4, 3 steps
    python benchmarks/sharded_step.py --size tiny --steps 2 --out results/sharded_step.json

Each arm is one real `veripo fit` of configs/demo_grpo.yaml with `--trainer.devices=2` and the arm's strategy; a
callback (`StepMeter`, below) records on every rank the CPU time (`time.process_time`) and wall time of each
training step and the process's peak RSS at the end. The first `--warmup` steps are not timed. Reported per
arm: the median step's CPU seconds and wall seconds per process (mean of the ranks) and each rank's peak RSS.
On a model this small the weights are a few MB, so the RSS says what sharding costs in runtime (collectives,
DTensor bookkeeping), not what it saves: the saving is the weights/gradients/optimizer state divided by the
ranks, which on the tiny model is below the noise of the interpreter's own memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = {
    "ddp": ["--trainer.strategy=ddp"],
    "fsdp2": ["--config", str(REPO / "configs/strategies/fsdp2.yaml"), "--trainer.accelerator=cpu"],
}


class StepMeter(L.Callback):
    """Per rank: CPU and wall seconds of each training step, and the peak RSS, written to `out_dir`."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.cpu: list[float] = []
        self.wall: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._t = (time.process_time(), time.perf_counter())

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.cpu.append(time.process_time() - self._t[0])
        self.wall.append(time.perf_counter() - self._t[1])

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row = {"rank": trainer.global_rank, "cpu_s": self.cpu, "wall_s": self.wall, "peak_rss_mib": rss}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(row))


def run_arm(name: str, a: argparse.Namespace, model: Path, data: Path, work: Path) -> dict[str, Any]:
    out = work / name
    out.mkdir(parents=True)
    b = "--model.init_args.backbone.init_args."
    command = [
        sys.executable, "-m", "lightning_veripo.cli", "fit", "--config", str(REPO / "configs/demo_grpo.yaml"),
        *STRATEGIES[name], "--trainer.accelerator=cpu", "--trainer.devices=2", "--seed_everything=0",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.enable_checkpointing=false",
        f"--trainer.max_steps={a.warmup + a.steps}", f"--trainer.default_root_dir={out}",
        f"{b}model_name_or_path={model}", f"{b}make_tiny_if_missing=false", f"{b}lora.dropout=0.0",
        f"--model.init_args.num_generations={a.G}", f"--model.init_args.max_new_tokens={a.max_new_tokens}",
        "--model.init_args.log_rollouts_every_n_steps=0", "--model.init_args.dynamic_sampling=false",
        f"--data.init_args.train_path={data / 'train.json'}", "--data.init_args.val_path=null",
        "--data.init_args.synthetic=null", "--data.init_args.shuffle=false",
        f"--data.init_args.batch_size={a.prompts_per_rank}",
        "--trainer.callbacks+=sharded_step.StepMeter", f"--trainer.callbacks.init_args.out_dir={out}",
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")]),
    }
    env.setdefault("OMP_NUM_THREADS", "1")
    started = time.perf_counter()
    done = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{name} fit failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {
        "cpu_s_per_step_per_process": statistics.mean(statistics.median(r["cpu_s"][a.warmup :]) for r in ranks),
        "wall_s_per_step": statistics.mean(statistics.median(r["wall_s"][a.warmup :]) for r in ranks),
        "peak_rss_mib": [round(r["peak_rss_mib"], 1) for r in ranks],
        "fit_wall_s": time.perf_counter() - started,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from lightning_veripo.data.synthetic import make_synthetic_data
    from lightning_veripo.tiny import make_tiny_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small", help="lightning_veripo.tiny preset (tiny, small)")
    p.add_argument("--G", type=int, default=4)
    p.add_argument(
        "--prompts-per-rank", type=int, default=2, help="global batch = 2 x this prompts x G rollouts"
    )
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sharded_step.json")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sharded_step_") as tmp:
        work = Path(tmp)
        model = make_tiny_model(work / "model", seed=0, size=a.size)
        n = 2 * a.prompts_per_rank * (a.warmup + a.steps)
        data = make_synthetic_data(
            work / "data", num_train=n, num_val=1, tasks=["colour", "direction", "count"], seed=0
        )
        arms = {name: run_arm(name, a, model, data, work) for name in STRATEGIES}
    report = {
        "benchmark": "sharded_step",
        "command": " ".join(["python", "benchmarks/sharded_step.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: getattr(a, k) for k in ("size", "G", "prompts_per_rank", "max_new_tokens", "warmup", "steps")},
        "global_batch": {"prompts": 2 * a.prompts_per_rank, "rollouts": 2 * a.prompts_per_rank * a.G},
        "arms": arms,
    }  # fmt: skip
    print(f"GRPO step, 2 CPU processes (gloo), global batch {report['global_batch']}")
    print(f"{'arm':6s} {'CPU s/step/process':>19s} {'wall s/step':>12s} {'peak RSS MiB (rank 0, 1)':>26s}")
    for name, r in arms.items():
        rss = ", ".join(f"{x:.0f}" for x in r["peak_rss_mib"])
        print(f"{name:6s} {r['cpu_s_per_step_per_process']:19.3f} {r['wall_s_per_step']:12.3f} {rss:>26s}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
