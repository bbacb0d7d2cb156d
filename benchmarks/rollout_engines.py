"""Rollout engines side by side: HF `generate` (shared prefill) vs the vLLM server engine, on the same prompts.

Both run GRPO steps of the `small` tiny Qwen2.5-VL (vLLM's CPU attention refuses the default tiny model's head_dim
16) with LoRA on the same synthetic clips, G, max_new_tokens and seed; the vLLM engine starts its server from
VERIPO_VLLM_PYTHON (or --vllm-python) and syncs the adapter after every optimiser step. Reported per engine, as
medians over the timed steps: rollout tokens/s (generated tokens / generation time), generation time, weight-sync
time per step and the whole step time; and for vLLM the rollout-vs-trainer log-prob difference.

    python benchmarks/rollout_engines.py                      # 2 prompts x G 4 x 16 tokens, 1 warmup + 3 steps
    python benchmarks/rollout_engines.py --G 8 --max-new-tokens 32 --frames 16 --steps 5 --out r.json

On the CPU expect parity on the tiny model (field notes); the point of the vLLM engine is a GPU with a real model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L

from lightning_veripo.backbone import VideoLLM
from lightning_veripo.data.synthetic import make_synthetic_data
from lightning_veripo.data.videoqa import FrameSampling, VideoQADataModule
from lightning_veripo.grpo import GRPOModule
from lightning_veripo.lora import LoRAConfig
from lightning_veripo.rewards import RewardSet
from lightning_veripo.rollout import VLLMSettings
from lightning_veripo.tiny import make_tiny_model


class _Steps(L.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._t0 = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        row = {k: float(v) for k, v in trainer.callback_metrics.items()}
        row["step_s"] = time.perf_counter() - self._t0
        self.rows.append(row)


def run_engine(
    engine: str, a: argparse.Namespace, model_dir: Path, data_dir: Path, work: Path
) -> dict[str, Any]:
    L.seed_everything(a.seed, verbose=False)
    backbone = VideoLLM(str(model_dir), lora=LoRAConfig(r=8, alpha=16))
    vllm = VLLMSettings(
        python=a.vllm_python, max_lora_rank=8, work_dir=str(work / "sync"), startup_timeout_s=1200
    )
    module = GRPOModule(
        backbone, rewards=RewardSet(["accuracy", "format"]), num_generations=a.G, max_new_tokens=a.max_new_tokens,
        lr=1e-3, log_rollouts_every_n_steps=0, rollout_engine=engine, vllm=vllm, dynamic_sampling=False,
    )  # fmt: skip
    sampling = FrameSampling(num_frames=a.frames, min_pixels=a.size * a.size, max_pixels=a.size * a.size)
    data = VideoQADataModule(
        train_path=str(data_dir / "train.json"), val_path=str(data_dir / "val.json"), sampling=sampling,
        batch_size=a.prompts, shuffle=False,
    )  # fmt: skip
    steps = _Steps()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=a.warmup + a.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[steps],
    )  # fmt: skip
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    timed = steps.rows[a.warmup :]

    def med(key: str) -> float:
        return statistics.median(r[key] for r in timed) if timed and key in timed[0] else float("nan")

    out = {
        "rollout_tokens_per_s": med("train/gen_tokens_per_s"),
        "generate_s": med("train/time_generate_s"),
        "sync_s": med("train/time_sync_s"),
        "step_s": med("step_s"),
        "fit_wall_s": time.perf_counter() - started,
    }
    if engine == "vllm":
        out.update({k: med(f"train/rollout_logp_diff_{k}") for k in ("mean", "max", "corr")})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--G", type=int, default=4)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engines", nargs="+", default=["hf", "vllm"])
    p.add_argument("--vllm-python", default=os.environ.get("VERIPO_VLLM_PYTHON"))
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if "vllm" in a.engines and not a.vllm_python:
        p.error(
            "the vllm engine needs --vllm-python or VERIPO_VLLM_PYTHON (.ci/vllm-env builds the environment)"
        )
    report: dict[str, Any] = {"settings": {k: v for k, v in vars(a).items() if k != "out"}, "engines": {}}
    with tempfile.TemporaryDirectory(prefix="rollout_engines_") as tmp:
        work = Path(tmp)
        model_dir = make_tiny_model(work / "model", seed=a.seed, size="small")
        data_dir = make_synthetic_data(work / "data", num_train=max(8, a.prompts * (a.warmup + a.steps)),
                                       num_val=2, tasks=["colour", "direction", "count"], seed=a.seed)  # fmt: skip
        for engine in a.engines:
            report["engines"][engine] = run_engine(engine, a, model_dir, data_dir, work / engine)
    print(f"{'engine':6s} {'rollout tok/s':>13s} {'generate s':>10s} {'sync s':>8s} {'step s':>8s}")
    for name, r in report["engines"].items():
        print(
            f"{name:6s} {r['rollout_tokens_per_s']:13.1f} {r['generate_s']:10.3f} {r['sync_s']:8.4f} {r['step_s']:8.3f}"
        )
        if name == "vllm":
            print(f"       log-prob |diff| mean {r['mean']:.2e} max {r['max']:.2e} corr {r['corr']:.5f}")
    if a.out is not None:
        a.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
