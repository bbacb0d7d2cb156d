"""What every benchmark script shares: the tiny model and clips they run on, a worker process's setup, step
timing with warm-up and repeats, resident-set high-water marks, TRL's common CPU settings, and the JSON report.

torch, transformers and TRL are imported inside the functions that use them, on purpose: a worker must set its
OpenMP environment (`setup_process`) before torch loads, and the scripts that only read results never load them.
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
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
QWEN25_VL_VOCAB = 151_936  # rows of Qwen2.5-VL's embedding and LM head (its tokenizer has 151,665 tokens)


# ----------------------------------------------------------------------------- the process


def offline_env() -> None:
    """Nothing from a model hub: every model and processor is built locally."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[var] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def setup_process(threads: int, omp_wait_policy: str) -> None:
    """A worker's threads and OpenMP waiting (`inherit` keeps the environment's), offline; before torch loads."""
    if omp_wait_policy != "inherit":  # read by OpenMP when torch loads it: set before `import torch`
        os.environ["OMP_WAIT_POLICY"] = omp_wait_policy
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    offline_env()
    import torch

    torch.set_num_threads(threads)


def warn_if_loaded() -> float:
    """The 1-minute load average, with a warning on stderr when it exceeds the CPUs (the timings measure it)."""
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        print(
            f"warning: 1-min load average {load:.1f} > {os.cpu_count()} CPUs: other processes compete for the cores; "
            f"with --threads > 1 every intra-op barrier waits for a descheduled thread and the timings measure "
            f"the load, not the code (compare with --threads 1)",
            file=sys.stderr,
        )
    return load


def parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's command line, described by its module docstring's first paragraph."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )


def add_worker_arguments(p: argparse.ArgumentParser, threads: int = 2) -> None:
    """The options every worker process of a timed benchmark takes: threads, OpenMP waiting, seed, TRL frames."""
    p.add_argument("--threads", type=int, default=threads, help="torch threads per run")
    p.add_argument(
        "--omp-wait-policy",
        choices=("PASSIVE", "ACTIVE", "inherit"),
        default="PASSIVE",
        help="OMP_WAIT_POLICY of the runs (PASSIVE, as tests/conftest.py: idle OpenMP threads sleep instead of "
        "spinning, which keeps 2-thread timings sane on a busy machine; inherit = leave the environment's)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--trl-frames",
        choices=("matched", "all"),
        default="matched",
        help="matched: TRL gets F/2 stills (= our F-frame video's patches/tokens); all: F stills",
    )


def check_frames(parser: argparse.ArgumentParser, size: int, frames: list[int], trl_frames: str) -> None:
    """Frame sides Qwen2.5-VL can patch, and frame counts TRL's stills can match (F/2 images for F frames)."""
    if size % 28:
        parser.error("--size must be a multiple of 28 (Qwen2.5-VL patch 14 x merge 2)")
    if any(f < 2 or f % 2 or (trl_frames == "matched" and f % 4 and f != 2) for f in frames):
        parser.error("--frames must be even (and multiples of 4 with --trl-frames matched, except 2)")


# ----------------------------------------------------------------------------- resident set


def rss_mib() -> float:
    """The resident set now."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    """The process's resident-set peak as getrusage reports it."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Restart the kernel's resident-set high-water mark (VmHWM, and with it ru_maxrss) at the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0
        return True
    except OSError:
        return False


def hwm_mib() -> float:
    """The resident-set high-water mark since the process started or since `reset_peak_rss`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return peak_rss_mib()


# ----------------------------------------------------------------------------- step timing


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


class ScoredLength:
    """The padded length of every sequence a TRL trainer scores (a forward hook: calls with labels)."""

    def __init__(self) -> None:
        self.lengths: list[int] = []

    def attach(self, model: Any) -> None:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:  # scored sequence: prompt + completion
            if kwargs.get("labels") is not None and kwargs.get("input_ids") is not None:
                self.lengths.append(int(kwargs["input_ids"].shape[1]))

        model.register_forward_pre_hook(hook, with_kwargs=True)

    @property
    def last(self) -> int | None:
        return self.lengths[-1] if self.lengths else None


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
            self.rss_before_train = rss_mib()
        self._v0 = self.counter.snapshot()
        self.load.append(os.getloadavg()[0])
        if self.step_peaks:
            self.process_peak = max(self.process_peak, hwm_mib())
            self.step_peaks = reset_peak_rss()
            self._rss0 = rss_mib()
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
            hwm = hwm_mib()
            self.step_peak.append(hwm - self._rss0)
            self.process_peak = max(self.process_peak, hwm)


def summary(t: Timings, warmup: int, extra: dict[str, Any]) -> dict[str, Any]:
    """One run: the steps after `warmup` timed (median, fastest, CPU), the warm-up steps kept apart, peaks."""
    step = t.step[warmup:]
    it = t.iter[max(warmup - 1, 0) :] if warmup else t.iter  # iter[i] ends at step i + 1
    peak = max(peak_rss_mib(), t.process_peak)
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


POOLED_FIRST = ("vision_calls_per_step", "vision_patches_per_step", "scored_sequence_tokens_padded",
                "mean_completion_tokens", "vision_input")  # fmt: skip


def pool(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's repeated runs: step times pooled, peaks the largest, per-run details kept."""
    step = [x for r in runs for x in r["step_s"]]
    cpu = [x for r in runs for x in r["cpu_s"]]
    it = [x for r in runs for x in r["iter_s"]]
    return {
        "step_median_s": statistics.median(step),
        "step_min_s": min(step),
        "cpu_median_s": statistics.median(cpu),
        "iter_median_s": statistics.median(it) if it else None,
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "peak_minus_before_train_mib": max(r["peak_minus_before_train_mib"] for r in runs),
        "step_peak_above_start_max_mib": max(r["step_peak_above_start_max_mib"] or 0.0 for r in runs),
        "loadavg_1min_at_step_start": [x for r in runs for x in r["loadavg_1min_at_step_start"]],
        **{k: runs[0][k] for k in POOLED_FIRST},
        "runs": runs,
    }


def mean_load(runs: list[dict[str, Any]]) -> float:
    """The mean 1-minute load average at the start of the runs' steps."""
    return statistics.mean(x for r in runs for x in r["loadavg_1min_at_step_start"])


def run_worker(cmd: list[str], out: Path, what: str) -> dict[str, Any]:
    """Run one worker process (a clean RSS) that writes its JSON to `out`; return it with its wall time."""
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{what} failed (exit {proc.returncode})")
    result = json.loads(out.read_text())
    result["process_wall_s"] = time.time() - t0
    return result


# ----------------------------------------------------------------------------- the tiny model and clips


def prepare(
    work: Path,
    max_frames: int,
    n_records: int,
    size: int,
    seed: int,
    real_vocab: bool = False,
    arch: str = "qwen2_5_vl",
) -> tuple[Path, Path]:
    """The tiny random Video-LLM of `arch` (Qwen2.5-VL by default) and synthetic clips in `work` (reused when
    there); `real_vocab` pads the embedding and LM head to Qwen2.5-VL's rows."""
    from lightning_veripo.data.synthetic import make_synthetic_data
    from lightning_veripo.tiny import make_tiny_model

    vocab = QWEN25_VL_VOCAB if real_vocab else None
    model_dir = work / ("tiny-model-vocab151936" if real_vocab else "tiny-model")
    if arch != "qwen2_5_vl":
        model_dir = model_dir.with_name(f"{model_dir.name}-{arch}")
    data_dir = work / f"data-{size}px-{max_frames}f-{n_records}"
    if not (model_dir / "config.json").exists():
        make_tiny_model(model_dir, seed=seed, model_vocab_size=vocab, arch=arch)
    if not (data_dir / "train.json").exists():
        make_synthetic_data(data_dir, num_train=n_records, num_val=1, seed=seed,
                            tasks=("colour", "direction", "count"), size=size, num_frames=max_frames)  # fmt: skip
    return model_dir, data_dir


def train_records(data_dir: Path, n: int) -> list[Any]:
    """The first n training records of a prepared data directory."""
    from lightning_veripo.data.videoqa import VideoQADataset

    return VideoQADataset(data_dir / "train.json").records[:n]


# ----------------------------------------------------------------------------- TRL


# TrainingArguments both TRL trainers get, so they run as ours does: float32 on the CPU, no checkpointing, a
# constant learning rate, plain AdamW, nothing logged or saved
TRL_CPU_ARGS: dict[str, Any] = dict(
    gradient_accumulation_steps=1,
    lr_scheduler_type="constant",
    warmup_steps=0,
    weight_decay=0.0,
    optim="adamw_torch",
    gradient_checkpointing=False,  # TRL's default is True; ours runs without
    bf16=False,  # TRL's default is True; ours runs float32
    fp16=False,
    use_cpu=True,
    dataloader_num_workers=0,
    report_to="none",
    logging_steps=10**6,
    save_strategy="no",
    disable_tqdm=True,
)


def trl_model(model_dir: Path, size: int) -> tuple[Any, Any]:
    """The tiny model in float32 and its processor, frames resized to `size` x `size` as ours, for TRL."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="sdpa"
    )
    processor = AutoProcessor.from_pretrained(str(model_dir), padding_side="left")
    pixels = size * size
    processor.image_processor.size = {
        "shortest_edge": pixels,
        "longest_edge": pixels,
    }  # = ours' min/max pixels
    return model, processor


def trl_lora(r: int) -> Any:
    """peft's LoRA config matching ours (`LoRAConfig(r, alpha=2r)`: its dropout and target modules)."""
    from peft import LoraConfig

    from lightning_veripo.lora import LoRAConfig

    lora = LoRAConfig(r=r, alpha=2 * r)
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, bias="none")  # fmt: skip


# ----------------------------------------------------------------------------- the report


def versions() -> dict[str, str]:
    import lightning
    import peft
    import torch
    import transformers
    import trl

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "lightning": lightning.__version__,
            "peft": peft.__version__}  # fmt: skip


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "platform": platform.platform()}


def command() -> str:
    """The command line that made a report, as RESULTS.md records it."""
    return " ".join([Path(sys.executable).name, *sys.argv])


def git_commit() -> str | None:
    """The checkout's commit, or None outside a git checkout."""
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or None


def fmt(x: float | None, spec: str, unit: str = "") -> str:
    """A table cell: `-` for a missing number."""
    return "-" if x is None else format(x, spec) + unit


def ratio(num: float, den: float) -> float | None:
    """num / den, or None (a `-` cell) where den is 0: a pass too small to move the high-water mark."""
    return num / den if den else None


def markdown_table(head: list[str], rows: list[list[Any]]) -> str:
    """A markdown table of already formatted cells."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, report: Any) -> Path:
    """Write a report (its folder made first) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return path
