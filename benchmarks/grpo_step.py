"""GRPO step time and peak memory: lightning_veripo's GRPOModule vs TRL's GRPOTrainer, swept over frames.

Both train the same tiny random Qwen2.5-VL (`make_tiny_model`) with LoRA on the same synthetic clips, with the
same G, max_new_tokens, prompts per step, beta, loss_type ("dapo"), temperature, learning rate and seed, on the
CPU. Each (implementation, frame count) runs in its own subprocess, so the peak RSS (`resource.getrusage`
high-water mark) of one configuration never mixes with another's. Each step also reports its own peak:
the kernel's resident-set high-water mark is reset at the step's start (`/proc/self/clear_refs`) and read at
its end, less the RSS at its start ("step peak above start", the largest over the timed steps).

    python benchmarks/grpo_step.py          # frames 4 8 16 32, 2 runs x (2 warmup + 6 timed steps) (~5 min)
    python benchmarks/grpo_step.py --quick  # frames 4 16, 1 run x (1 warmup + 2 timed steps) (~1 min)
    python benchmarks/grpo_step.py --out results.json --frames 8 32 64 --threads 1
    python benchmarks/grpo_step.py --real-vocab --impls ours ours-unchunked trl --threads 1
    python benchmarks/grpo_step.py --prefill-heavy --threads 1   # 16 and 32 frames of 224x224, 8 new tokens

Options that bring the tiny model closer to a real one where it matters:

- `--real-vocab`: the model's embedding and LM head are padded to Qwen2.5-VL's 151,936 rows (the trained
  tokenizer has ~490 tokens; sampled ids past it decode to nothing), so the full-vocabulary logits cost what
  they cost at real scale. Impl `ours-unchunked` is ours with `VideoLLM(logprob_chunk_tokens=None)`: the LM
  head over every completion position at once, as before chunked log-probs.
- `--prefill-heavy`: many frames at a higher resolution and short completions (defaults frames 16 32,
  `--size 224`, `--max-new-tokens 8`): the prompt's prefill dominates the step.

What each side is given (see benchmarks/RESULTS.md for the discussion):

- ours: the clip as a *video* (F frames sampled by decord, `VideoQACollator`, `pixel_values_videos`). The
  vision tower runs once per prompt per step; its features serve generation, the reference pass and the loss.
- TRL 1.16: GRPOTrainer has no video input (its VLM path reads an "image"/"images" column only), so each clip
  is given as a list of still images. With `--trl-frames matched` (default) TRL gets F/2 frames (every other
  one): Qwen2.5-VL's image processor repeats a still frame to fill its temporal patch of 2, so F/2 images cost
  exactly the vision patches and LM placeholder tokens of our F-frame video (same compute, half the distinct
  frames). With `--trl-frames all` TRL gets all F frames: twice our vision patches and vision tokens.
  TRL repeats every prompt G times and runs the processor and the vision tower once per *rollout*, in
  generation and again in each forward (reference, loss).

Timings: "step" is training_step + optimizer step, measured by callbacks (Lightning on_train_batch_start/end,
transformers on_step_begin/end); "iter" is the time between consecutive step ends, which adds data loading
(ours: decord decode + processor in the collator; TRL: reading the pre-decoded frames from the dataset).
Medians over the timed steps of all runs of a configuration (each configuration runs `--repeats` times, the
order of ours/TRL alternating), after the warmup steps of each run. Peaks: the largest over the runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    QWEN25_VL_VOCAB,
    REPO,
    TRL_CPU_ARGS,
    ScoredLength,
    Timings,
    VisionCounter,
    add_worker_arguments,
    check_frames,
    command,
    fmt,
    machine,
    parser,
    pool,
    prepare,
    run_worker,
    setup_process,
    summary,
    train_records,
    trl_lora,
    trl_model,
    versions,
    warn_if_loaded,
    write_json,
)

IMPLS = ("ours", "ours-unchunked", "trl")
DEFAULT_OUT = REPO / "benchmarks" / "results" / "grpo_step.json"


# ----------------------------------------------------------------------------- ours


def run_ours(a: argparse.Namespace) -> dict[str, Any]:
    setup_process(a.threads, a.omp_wait_policy)
    import lightning as L

    from lightning_veripo.backbone import LoRAConfig, VideoLLM
    from lightning_veripo.data.videoqa import FrameSampling, VideoQADataModule
    from lightning_veripo.grpo import GRPOModule

    L.seed_everything(a.seed, verbose=False)
    counter = VisionCounter()
    timings = Timings(counter, step_peaks=True)
    info: dict[str, Any] = {
        "completion_lengths": [],
        "prompt_lengths": [],
        "scored_lengths": [],
        "phases": [],
    }

    class StepTimer(L.Callback):
        def on_train_start(self, trainer: L.Trainer, module: GRPOModule) -> None:
            counter.attach(module.backbone._vision_tower(module.backbone.hf_model))

        def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
            info["prompt_lengths"].append(int(batch["input_ids"].shape[1]))
            timings.begin()

        def on_train_batch_end(
            self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            timings.end()
            lengths = [len(r.completion_ids) for r in outputs["rollouts"]]
            info["completion_lengths"].append(sum(lengths) / len(lengths))
            info["scored_lengths"].append(info["prompt_lengths"][-1] + max(lengths))
            m = trainer.callback_metrics
            info["phases"].append(
                {k: float(m[f"train/time_{k}_s"]) for k in ("generate", "score", "optimise")}
            )

    chunk = {} if a.worker == "ours" else {"logprob_chunk_tokens": None}  # ours-unchunked: one LM-head call
    lora = LoRAConfig(r=a.lora_r, alpha=2 * a.lora_r)
    backbone = VideoLLM(str(a.model_dir), dtype="float32", lora=lora, **chunk)
    module = GRPOModule(
        backbone,
        num_generations=a.G,
        max_new_tokens=a.max_new_tokens,
        temperature=1.0,
        beta=a.beta,
        loss_type="dapo",
        epsilon_low=0.2,
        epsilon_high=0.2,
        advantage_scale="group",
        dynamic_sampling=False,  # TRL has no dynamic sampling: keep every group in the loss pass, as TRL does
        max_grad_norm=1.0,
        lr=a.lr,
        log_rollouts_every_n_steps=0,
    )
    size = a.size * a.size
    data = VideoQADataModule(
        train_path=str(a.data_dir / "train.json"),
        sampling=FrameSampling(num_frames=a.num_frames, min_pixels=size, max_pixels=size),
        batch_size=a.prompts,
        shuffle=False,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=a.warmup + a.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[StepTimer()],
    )
    trainer.fit(module, datamodule=data)
    return summary(
        timings,
        a.warmup,
        {
            "mean_completion_tokens": statistics.mean(info["completion_lengths"][a.warmup :]),
            "scored_sequence_tokens_padded": info["scored_lengths"][-1],
            "phase_s": info["phases"][a.warmup :],  # GRPOModule's own generate / score / optimise timers
            "vision_input": f"video: {a.num_frames} frames of {a.size}x{a.size} per prompt",
            "logprob_chunk_tokens": backbone.logprob_chunk_tokens,
        },
    )


# ----------------------------------------------------------------------------- TRL


def run_trl(a: argparse.Namespace) -> dict[str, Any]:
    setup_process(a.threads, a.omp_wait_policy)
    import numpy as np
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lightning_veripo.data.videoqa import FrameSampling, build_prompt, load_video
    from lightning_veripo.rewards import RewardSet

    torch.manual_seed(a.seed)
    n_steps = a.warmup + a.steps
    records = train_records(a.data_dir, n_steps * a.prompts)
    size = a.size * a.size
    sampling = FrameSampling(num_frames=a.num_frames, min_pixels=size, max_pixels=size)
    rows = []
    for r in records:
        frames, _ = load_video(r.path, sampling)  # the same F frames ours samples
        if a.trl_frames == "matched":
            frames = frames[::2]  # F/2 stills = the patches and LM tokens of an F-frame video
        rows.append({
            "prompt": [{"role": "user", "content": build_prompt(r)}],
            "images": [Image.fromarray(np.asarray(f)) for f in frames],
            "problem_id": r.problem_id,
        })  # fmt: skip
    dataset = Dataset.from_list(rows)
    by_id = {r.problem_id: r for r in records}

    reward_set = RewardSet()  # accuracy 1.0 + format 0.5, the same functions ours scores with

    def make_reward(name: str, fn: Any) -> Any:
        def reward(prompts: list, completions: list, problem_id: list[str], **kwargs: Any) -> list[float]:
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return [float(fn(t, by_id[pid])) for t, pid in zip(texts, problem_id, strict=True)]

        reward.__name__ = name
        return reward

    reward_funcs = [make_reward(n, f) for n, f in zip(reward_set.names, reward_set.functions, strict=True)]

    model, processor = trl_model(a.model_dir, a.size)
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_grpo_bench_"),
        per_device_train_batch_size=a.prompts * a.G,  # TRL counts completions: prompts x G
        num_generations=a.G,
        max_completion_length=a.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=a.beta,
        loss_type="dapo",
        epsilon=0.2,
        scale_rewards="group",
        reward_weights=reward_set.weights,
        num_iterations=1,
        learning_rate=a.lr,
        max_grad_norm=1.0,
        max_steps=n_steps,
        seed=a.seed,
        shuffle_dataset=False,
        remove_unused_columns=False,
        **TRL_CPU_ARGS,
    )
    counter = VisionCounter()
    timings = Timings(counter, step_peaks=True)
    completion_lengths: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            timings.begin()

        trainer: Any = None

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            timings.end()
            mean_length = (
                self.trainer._metrics["train"].get("completions/mean_length") if self.trainer else None
            )
            if mean_length:
                completion_lengths.append(float(mean_length[-1]))

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=trl_lora(a.lora_r),
        callbacks=[timer := StepTimer()],
    )
    timer.trainer = trainer
    base = trainer.model.get_base_model()
    counter.attach(base.model.visual)
    scored = ScoredLength()
    scored.attach(base)
    trainer.train()
    return summary(
        timings,
        a.warmup,
        {
            "mean_completion_tokens": statistics.mean(completion_lengths[a.warmup :]),
            "scored_sequence_tokens_padded": scored.last,
            "vision_input": (f"{len(rows[0]['images'])} images of {a.size}x{a.size} per prompt "
                             f"({'every other frame of' if a.trl_frames == 'matched' else 'all'} "
                             f"{a.num_frames} sampled frames)"),
        },
    )  # fmt: skip


# ----------------------------------------------------------------------------- driver


def _worker_cmd(
    a: argparse.Namespace, impl: str, frames: int, model_dir: Path, data_dir: Path, out: Path
) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", impl, "--num-frames", str(frames),
            "--model-dir", str(model_dir), "--data-dir", str(data_dir), "--worker-out", str(out),
            "--warmup", str(a.warmup), "--steps", str(a.steps), "--G", str(a.G),
            "--max-new-tokens", str(a.max_new_tokens), "--prompts", str(a.prompts), "--beta", str(a.beta),
            "--lr", str(a.lr), "--size", str(a.size), "--threads", str(a.threads), "--seed", str(a.seed),
            "--lora-r", str(a.lora_r), "--trl-frames", a.trl_frames, "--omp-wait-policy", a.omp_wait_policy]  # fmt: skip


def table(results: list[dict[str, Any]], impls: list[str]) -> str:
    head = (
        "| frames | impl | step median (s) | step min (s) | step CPU median (s) | iter median (s) | vision calls / step "
        "| vision patches / step | LM tokens / row | peak RSS (MiB) | peak - RSS before train (MiB) "
        "| step peak above start (MiB) | load avg |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in results:
        for impl in impls:
            m = r[impl]
            load = statistics.mean(m["loadavg_1min_at_step_start"])
            lines.append(
                f"| {r['frames']} | {impl} | {m['step_median_s']:.2f} | {m['step_min_s']:.2f} | {m['cpu_median_s']:.2f} "
                f"| {fmt(m['iter_median_s'], '.2f')} | {m['vision_calls_per_step']} | {m['vision_patches_per_step']} "
                f"| {m['scored_sequence_tokens_padded']} | {m['peak_rss_mib']:.0f} "
                f"| {m['peak_minus_before_train_mib']:.0f} | {m['step_peak_above_start_max_mib']:.0f} | {load:.1f} |"
            )
    if not {"ours", "trl"} <= set(impls):
        return "\n".join(lines)
    lines += ["", "| frames | step time TRL / ours | step min TRL / ours | step CPU TRL / ours | iter time TRL / ours | peak RSS TRL / ours "
              "| peak - before-train TRL / ours |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        x = r["ratios_trl_over_ours"]
        lines.append(f"| {r['frames']} | {x['step_time']:.2f}x | {x['step_min']:.2f}x | {x['step_cpu']:.2f}x | {fmt(x['iter_time'], '.2f')}x "
                     f"| {x['peak_rss']:.2f}x | {x['peak_minus_before_train']:.2f}x |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument(
        "--frames", type=int, nargs="+", default=None, help="frame counts to sweep (default 4 8 16 32)"
    )
    p.add_argument("--quick", action="store_true", help="frames 4 16, 1 warmup + 2 timed steps")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 6; quick 2)")
    p.add_argument("--G", type=int, default=8, help="rollouts per prompt")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 32; --prefill-heavy 8")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--beta", type=float, default=0.04, help="KL weight (> 0: both run a reference pass)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2r) on the LM projections, both")
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="frame side in pixels, a multiple of 28 (default 112; --prefill-heavy 224)",
    )
    p.add_argument(
        "--real-vocab",
        action="store_true",
        help=f"pad the tiny model's embedding and LM head to Qwen2.5-VL's {QWEN25_VL_VOCAB:,} rows",
    )
    p.add_argument(
        "--prefill-heavy",
        action="store_true",
        help="many frames at a higher resolution, short completions: frames 16 32, --size 224, --max-new-tokens 8 "
        "(each unless given)",
    )
    p.add_argument(
        "--impls",
        nargs="+",
        choices=IMPLS,
        default=["ours", "trl"],
        help="what to run: ours, ours-unchunked (logprob_chunk_tokens=None: the LM head over every completion "
        "token at once), trl (default: ours trl)",
    )
    add_worker_arguments(p)
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs per configuration, alternating ours/TRL order (default 2; quick 1)",
    )
    p.add_argument(
        "--workdir", type=Path, default=None, help="where the tiny model and clips go (default: a temp dir)"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    # worker-only
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--num-frames", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    a.steps = a.steps if a.steps is not None else (2 if a.quick else 6)
    a.repeats = a.repeats if a.repeats is not None else (1 if a.quick else 2)
    a.size = a.size if a.size is not None else (224 if a.prefill_heavy else 112)
    a.max_new_tokens = a.max_new_tokens if a.max_new_tokens is not None else (8 if a.prefill_heavy else 32)
    frames = a.frames or ([16, 32] if a.prefill_heavy else [4, 16] if a.quick else [4, 8, 16, 32])
    check_frames(p, a.size, frames if not a.worker else [], a.trl_frames)

    if a.worker:
        result = (run_trl if a.worker == "trl" else run_ours)(a)
        a.worker_out.write_text(json.dumps(result))
        return 0

    load = warn_if_loaded()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="grpo_step_bench_") as tmp:
        work = a.workdir or Path(tmp)
        n_records = (a.warmup + a.steps) * a.prompts
        model_dir, data_dir = prepare(work, max(frames), n_records, a.size, a.seed, a.real_vocab)
        results = []
        for f in frames:
            row: dict[str, Any] = {"frames": f}
            runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in a.impls}
            for rep in range(a.repeats):
                for impl in a.impls if rep % 2 == 0 else a.impls[::-1]:  # ABBA: no drift bias
                    out = Path(tmp) / f"{impl}-{f}-{rep}.json"
                    cmd = _worker_cmd(a, impl, f, model_dir, data_dir, out)
                    m = run_worker(cmd, out, f"{impl} with {f} frames")
                    runs[impl].append(m)
                    print(
                        f"[{f:>2} frames, run {rep + 1}/{a.repeats}] {impl:4s}: step median {m['step_median_s']:.2f}s "
                        f"peak RSS {m['peak_rss_mib']:.0f} MiB  load {statistics.mean(m['loadavg_1min_at_step_start']):.1f}"
                        f"  ({m['process_wall_s']:.0f}s)",
                        flush=True,
                    )
            for impl in a.impls:
                row[impl] = pool(runs[impl])
            if "ours-unchunked" in a.impls and "ours" in a.impls:
                u, o = row["ours-unchunked"], row["ours"]
                row["ratios_unchunked_over_ours"] = {
                    "step_time": u["step_median_s"] / o["step_median_s"],
                    "peak_rss": u["peak_rss_mib"] / o["peak_rss_mib"],
                    "step_peak_above_start": u["step_peak_above_start_max_mib"]
                    / max(o["step_peak_above_start_max_mib"], 1e-9),
                }
            if not {"ours", "trl"} <= set(a.impls):
                results.append(row)
                continue
            o, t = row["ours"], row["trl"]
            row["ratios_trl_over_ours"] = {
                "step_time": t["step_median_s"] / o["step_median_s"],
                "step_min": t["step_min_s"] / o["step_min_s"],
                "step_cpu": t["cpu_median_s"] / o["cpu_median_s"],
                "iter_time": (t["iter_median_s"] / o["iter_median_s"])
                if o["iter_median_s"] and t["iter_median_s"]
                else None,
                "peak_rss": t["peak_rss_mib"] / o["peak_rss_mib"],
                "peak_minus_before_train": t["peak_minus_before_train_mib"]
                / max(o["peak_minus_before_train_mib"], 1e-9),
            }
            results.append(row)
    settings = {k: getattr(a, k) for k in ("G", "max_new_tokens", "prompts", "beta", "lr", "lora_r", "size",
                                           "threads", "omp_wait_policy", "seed", "warmup", "steps", "repeats", "trl_frames",
                                           "impls", "real_vocab", "prefill_heavy")}  # fmt: skip
    settings["model_vocab_rows"] = QWEN25_VL_VOCAB if a.real_vocab else "tokenizer (~490)"
    settings["loadavg_1min_at_start"] = load
    settings.update(loss_type="dapo", temperature=1.0, lora="LoRA on the LM projections, vision tower frozen",
                    dtype="float32", gradient_checkpointing=False, frames=frames)  # fmt: skip
    report = {"benchmark": "grpo_step", "command": command(),
              "settings": settings, "versions": versions(), "machine": machine(),
              "total_wall_s": time.time() - started, "results": results}  # fmt: skip
    print()
    print(table(results, a.impls))
    for r in results:
        if "ratios_unchunked_over_ours" in r:
            x = r["ratios_unchunked_over_ours"]
            print(f"{r['frames']} frames: unchunked / chunked: step time {x['step_time']:.2f}x, peak RSS "
                  f"{x['peak_rss']:.2f}x, step peak above start {x['step_peak_above_start']:.2f}x")  # fmt: skip
    write_json(a.out, report)
    print(f"\nwrote {a.out}  (total {report['total_wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
