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
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
IMPLS = ("ours", "ours-unchunked", "trl")
DEFAULT_OUT = REPO / "benchmarks" / "results" / "grpo_step.json"


# ----------------------------------------------------------------------------- shared helpers (worker side)


def _setup_process(threads: int, omp_wait_policy: str) -> None:
    if omp_wait_policy != "inherit":  # read by OpenMP when torch loads it: set before `import torch`
        os.environ["OMP_WAIT_POLICY"] = omp_wait_policy
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[var] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(threads)


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _reset_peak_rss() -> bool:
    """Restart the kernel's resident-set high-water mark (VmHWM, and with it ru_maxrss) at the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0
        return True
    except OSError:
        return False


def _hwm_mib() -> float:
    """The resident-set high-water mark since the process started or since `_reset_peak_rss`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return _peak_rss_mib()


class VisionCounter:
    """Counts vision-tower forward calls and the patch rows they encode (a forward hook on the tower)."""

    def __init__(self) -> None:
        self.calls = 0
        self.patches = 0
        self.handle = None

    def attach(self, tower: Any) -> None:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            pixels = args[0] if args else kwargs.get("hidden_states", kwargs.get("pixel_values"))
            self.calls += 1
            self.patches += int(pixels.shape[0])

        self.handle = tower.register_forward_pre_hook(hook, with_kwargs=True)

    def snapshot(self) -> tuple[int, int]:
        return self.calls, self.patches


class Timings:
    """Per-step wall times; call begin()/end() around each step. With `step_peaks` also each step's peak RSS
    above its start (the high-water mark is reset at every begin(); the process peak is kept aside)."""

    def __init__(self, counter: VisionCounter, step_peaks: bool = False) -> None:
        self.counter = counter
        self.step_peaks = step_peaks
        self.step_peak: list[float] = []
        self.process_peak = 0.0
        self._rss0 = 0.0
        self.step: list[float] = []
        self.cpu: list[float] = []
        self.load: list[float] = []
        self.iter: list[float] = []
        self.vision_calls: list[int] = []
        self.vision_patches: list[int] = []
        self._t0 = 0.0
        self._last_end: float | None = None
        self._v0 = (0, 0)
        self.rss_before_train = 0.0

    def begin(self) -> None:
        if not self.rss_before_train:
            self.rss_before_train = _rss_mib()
        self._v0 = self.counter.snapshot()
        self.load.append(os.getloadavg()[0])
        if self.step_peaks:
            self.process_peak = max(self.process_peak, _hwm_mib())
            self.step_peaks = _reset_peak_rss()
            self._rss0 = _rss_mib()
        self._c0 = time.process_time()
        self._t0 = time.perf_counter()

    def end(self) -> None:
        now = time.perf_counter()
        self.cpu.append(time.process_time() - self._c0)
        self.step.append(now - self._t0)
        if self._last_end is not None:
            self.iter.append(now - self._last_end)
        self._last_end = now
        calls, patches = self.counter.snapshot()
        self.vision_calls.append(calls - self._v0[0])
        self.vision_patches.append(patches - self._v0[1])
        if self.step_peaks:
            hwm = _hwm_mib()
            self.step_peak.append(hwm - self._rss0)
            self.process_peak = max(self.process_peak, hwm)


def _summary(t: Timings, warmup: int, extra: dict[str, Any]) -> dict[str, Any]:
    step = t.step[warmup:]
    it = t.iter[max(warmup - 1, 0) :] if warmup else t.iter  # iter[i] ends at step i + 1
    peak = max(_peak_rss_mib(), t.process_peak)
    step_peak = t.step_peak[warmup:]
    return {
        "steps_timed": len(step),
        "step_s": step,
        "step_median_s": statistics.median(step),
        "step_min_s": min(step),
        "cpu_s": t.cpu[warmup:],
        "cpu_median_s": statistics.median(t.cpu[warmup:]),
        "loadavg_1min_at_step_start": t.load,
        "iter_s": it,
        "iter_median_s": statistics.median(it) if it else None,
        "warmup_step_s": t.step[:warmup],
        "vision_calls_per_step": t.vision_calls[-1],
        "vision_patches_per_step": t.vision_patches[-1],
        "rss_before_train_mib": t.rss_before_train,
        "peak_rss_mib": peak,
        "peak_minus_before_train_mib": peak - t.rss_before_train,
        "step_peak_above_start_mib": step_peak,
        "step_peak_above_start_max_mib": max(step_peak) if step_peak else None,
        **extra,
    }


def _records(data_dir: Path, n: int) -> list[Any]:
    from lightning_veripo.data.videoqa import VideoQADataset

    return VideoQADataset(data_dir / "train.json").records[:n]


# ----------------------------------------------------------------------------- ours


def run_ours(a: argparse.Namespace) -> dict[str, Any]:
    _setup_process(a.threads, a.omp_wait_policy)
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
    return _summary(
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
    _setup_process(a.threads, a.omp_wait_policy)
    import numpy as np
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lightning_veripo.backbone import LoRAConfig
    from lightning_veripo.data.videoqa import FrameSampling, build_prompt, load_video
    from lightning_veripo.rewards import RewardSet

    torch.manual_seed(a.seed)
    n_steps = a.warmup + a.steps
    records = _records(a.data_dir, n_steps * a.prompts)
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

    model = AutoModelForImageTextToText.from_pretrained(
        str(a.model_dir), dtype=torch.float32, attn_implementation="sdpa"
    )
    processor = AutoProcessor.from_pretrained(str(a.model_dir), padding_side="left")
    processor.image_processor.size = {"shortest_edge": size, "longest_edge": size}  # = ours' min/max pixels
    lora = LoRAConfig(r=a.lora_r, alpha=2 * a.lora_r)
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.target_modules, bias="none")  # fmt: skip
    out_dir = tempfile.mkdtemp(prefix="trl_grpo_bench_")
    config = GRPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=a.prompts * a.G,  # TRL counts completions: prompts x G
        gradient_accumulation_steps=1,
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
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",
        max_grad_norm=1.0,
        max_steps=n_steps,
        gradient_checkpointing=False,  # TRL's default is True; ours runs without
        bf16=False,  # TRL's default is True; ours runs float32
        fp16=False,
        use_cpu=True,
        seed=a.seed,
        shuffle_dataset=False,
        dataloader_num_workers=0,
        report_to="none",
        logging_steps=10**6,
        save_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
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
        peft_config=peft_config,
        callbacks=[timer := StepTimer()],
    )
    timer.trainer = trainer
    base = trainer.model.get_base_model()
    counter.attach(base.model.visual)
    lengths: list[int] = []

    def record_length(module: Any, args: tuple, kwargs: dict) -> None:  # scored sequence: prompt + completion
        if kwargs.get("labels") is not None and kwargs.get("input_ids") is not None:
            lengths.append(int(kwargs["input_ids"].shape[1]))

    base.register_forward_pre_hook(record_length, with_kwargs=True)
    trainer.train()
    return _summary(
        timings,
        a.warmup,
        {
            "mean_completion_tokens": statistics.mean(completion_lengths[a.warmup :]),
            "scored_sequence_tokens_padded": lengths[-1] if lengths else None,
            "vision_input": (f"{len(rows[0]['images'])} images of {a.size}x{a.size} per prompt "
                             f"({'every other frame of' if a.trl_frames == 'matched' else 'all'} "
                             f"{a.num_frames} sampled frames)"),
        },
    )  # fmt: skip


# ----------------------------------------------------------------------------- driver


def _pool(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's repeated runs: step times pooled, peaks the largest, per-run details kept."""
    step = [x for r in runs for x in r["step_s"]]
    cpu = [x for r in runs for x in r["cpu_s"]]
    it = [x for r in runs for x in r["iter_s"]]
    first = runs[0]
    return {
        "step_median_s": statistics.median(step),
        "step_min_s": min(step),
        "cpu_median_s": statistics.median(cpu),
        "iter_median_s": statistics.median(it) if it else None,
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "peak_minus_before_train_mib": max(r["peak_minus_before_train_mib"] for r in runs),
        "step_peak_above_start_max_mib": max(r["step_peak_above_start_max_mib"] or 0.0 for r in runs),
        "loadavg_1min_at_step_start": [x for r in runs for x in r["loadavg_1min_at_step_start"]],
        **{
            k: first[k]
            for k in (
                "vision_calls_per_step",
                "vision_patches_per_step",
                "scored_sequence_tokens_padded",
                "mean_completion_tokens",
                "vision_input",
            )
        },
        "runs": runs,
    }


def _versions() -> dict[str, str]:
    import lightning
    import peft
    import torch
    import transformers
    import trl

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "lightning": lightning.__version__,
            "peft": peft.__version__}  # fmt: skip


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "platform": platform.platform()}


QWEN25_VL_VOCAB = 151_936  # rows of Qwen2.5-VL's embedding and LM head (its tokenizer has 151,665 tokens)


def prepare(
    work: Path, max_frames: int, n_records: int, size: int, seed: int, real_vocab: bool = False
) -> tuple[Path, Path]:
    from lightning_veripo.data.synthetic import make_synthetic_data
    from lightning_veripo.tiny import make_tiny_model

    vocab = QWEN25_VL_VOCAB if real_vocab else None
    model_dir = work / ("tiny-model-vocab151936" if real_vocab else "tiny-model")
    data_dir = work / f"data-{size}px-{max_frames}f-{n_records}"
    if not (model_dir / "config.json").exists():
        make_tiny_model(model_dir, seed=seed, model_vocab_size=vocab)
    if not (data_dir / "train.json").exists():
        make_synthetic_data(data_dir, num_train=n_records, num_val=1, seed=seed,
                            tasks=("colour", "direction", "count"), size=size, num_frames=max_frames)  # fmt: skip
    return model_dir, data_dir


def _worker_cmd(
    a: argparse.Namespace, impl: str, frames: int, model_dir: Path, data_dir: Path, out: Path
) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", impl, "--num-frames", str(frames),
            "--model-dir", str(model_dir), "--data-dir", str(data_dir), "--worker-out", str(out),
            "--warmup", str(a.warmup), "--steps", str(a.steps), "--G", str(a.G),
            "--max-new-tokens", str(a.max_new_tokens), "--prompts", str(a.prompts), "--beta", str(a.beta),
            "--lr", str(a.lr), "--size", str(a.size), "--threads", str(a.threads), "--seed", str(a.seed),
            "--lora-r", str(a.lora_r), "--trl-frames", a.trl_frames, "--omp-wait-policy", a.omp_wait_policy]  # fmt: skip


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


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
                f"| {_fmt(m['iter_median_s'], '.2f')} | {m['vision_calls_per_step']} | {m['vision_patches_per_step']} "
                f"| {m['scored_sequence_tokens_padded']} | {m['peak_rss_mib']:.0f} "
                f"| {m['peak_minus_before_train_mib']:.0f} | {m['step_peak_above_start_max_mib']:.0f} | {load:.1f} |"
            )
    if not {"ours", "trl"} <= set(impls):
        return "\n".join(lines)
    lines += ["", "| frames | step time TRL / ours | step min TRL / ours | step CPU TRL / ours | iter time TRL / ours | peak RSS TRL / ours "
              "| peak - before-train TRL / ours |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        x = r["ratios_trl_over_ours"]
        lines.append(f"| {r['frames']} | {x['step_time']:.2f}x | {x['step_min']:.2f}x | {x['step_cpu']:.2f}x | {_fmt(x['iter_time'], '.2f')}x "
                     f"| {x['peak_rss']:.2f}x | {x['peak_minus_before_train']:.2f}x |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
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
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--omp-wait-policy",
        choices=("PASSIVE", "ACTIVE", "inherit"),
        default="PASSIVE",
        help="OMP_WAIT_POLICY of the runs (PASSIVE, as tests/conftest.py: idle OpenMP threads sleep instead of "
        "spinning, which keeps 2-thread timings sane on a busy machine; inherit = leave the environment's)",
    )
    p.add_argument(
        "--trl-frames",
        choices=("matched", "all"),
        default="matched",
        help="matched: TRL gets F/2 stills (= our F-frame video's patches/tokens); all: F stills",
    )
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
    if a.size % 28:
        p.error("--size must be a multiple of 28 (Qwen2.5-VL patch 14 x merge 2)")

    if a.worker:
        result = (run_trl if a.worker == "trl" else run_ours)(a)
        a.worker_out.write_text(json.dumps(result))
        return 0

    frames = a.frames or ([16, 32] if a.prefill_heavy else [4, 16] if a.quick else [4, 8, 16, 32])
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        print(
            f"warning: 1-min load average {load:.1f} > {os.cpu_count()} CPUs: other processes compete for the cores; "
            f"with --threads > 1 every intra-op barrier waits for a descheduled thread and the timings measure "
            f"the load, not the code (compare with --threads 1)",
            file=sys.stderr,
        )
    if any(f < 2 or f % 2 or (a.trl_frames == "matched" and f % 4 and f != 2) for f in frames):
        p.error("--frames must be even (and multiples of 4 with --trl-frames matched, except 2)")
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
                    t0 = time.time()
                    proc = subprocess.run(
                        _worker_cmd(a, impl, f, model_dir, data_dir, out), capture_output=True, text=True
                    )
                    if proc.returncode != 0:
                        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                        raise SystemExit(f"{impl} with {f} frames failed (exit {proc.returncode})")
                    m = json.loads(out.read_text())
                    m["process_wall_s"] = time.time() - t0
                    runs[impl].append(m)
                    print(
                        f"[{f:>2} frames, run {rep + 1}/{a.repeats}] {impl:4s}: step median {m['step_median_s']:.2f}s "
                        f"peak RSS {m['peak_rss_mib']:.0f} MiB  load {statistics.mean(m['loadavg_1min_at_step_start']):.1f}"
                        f"  ({m['process_wall_s']:.0f}s)",
                        flush=True,
                    )
            for impl in a.impls:
                row[impl] = _pool(runs[impl])
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
    report = {"benchmark": "grpo_step", "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "settings": settings, "versions": _versions(), "machine": _machine(),
              "total_wall_s": time.time() - started, "results": results}  # fmt: skip
    print()
    print(table(results, a.impls))
    for r in results:
        if "ratios_unchunked_over_ours" in r:
            x = r["ratios_unchunked_over_ours"]
            print(f"{r['frames']} frames: unchunked / chunked: step time {x['step_time']:.2f}x, peak RSS "
                  f"{x['peak_rss']:.2f}x, step peak above start {x['step_peak_above_start']:.2f}x")  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {a.out}  (total {report['total_wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
