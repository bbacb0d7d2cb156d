"""One command that checks lightning_veripo on one CUDA GPU at Qwen2.5-VL-3B's real sizes, without downloads.

    python benchmarks/gpu_check.py                  # one CUDA GPU: random-weight 3B in bf16 (< 8 min on H100)
    python benchmarks/gpu_check.py --out check.json --grpo-steps 4 --frames 32
    python benchmarks/gpu_check.py --tiny           # CPU, seconds: the tiny model (tests/test_gpu_check.py)
    python benchmarks/gpu_check.py --fsdp2          # the same through FSDP2 (configs/strategies/fsdp2.yaml's
                                                    # strategy on one device; the 3B with untied embeddings)

What it does, through the library's normal path:

1. builds a model of Qwen2.5-VL-3B-Instruct's sizes (`QWEN25_VL_3B` below: decoder 36 x 2048, 16 query /
   2 key-value heads, MLP 11008, vocabulary 151,936, tied embeddings; the 32-block vision tower) with random
   weights in bf16, and the offline tokenizer and processor of `lightning_veripo.tiny` (its ~490 tokens; the
   embedding keeps Qwen's 151,936 rows), saved with `save_pretrained`;
2. loads it with `VideoLLM` (LoRA on the LM projections, gradient checkpointing, sdpa attention);
3. runs GRPO steps (`GRPOModule`, beta > 0 so the reference pass runs too) then DPO steps (`DPOModule`) under a
   Lightning Trainer (bf16-true on the GPU) on synthetic clips (`lightning_veripo.data.synthetic`);
4. prints and writes (JSON: `--out`, else `$OUT/gpu_check.json` when `$OUT` is set) per stage: median step
   time, LM tokens per second, generated tokens per second, peak memory (`torch.cuda.max_memory_allocated`
   on a GPU, the process's peak RSS on the CPU) and model FLOPs utilisation.

FLOPs are the usual estimate: 6 x N x tokens for every token the language model runs with gradient (the
loss pass: forward + backward) and 2 x N x tokens for every token it runs without (generation's prefill and
decoding, the old-policy and reference passes), N = the language model's parameters without the input
embedding (the LM head counted). The vision tower and the recomputation of gradient checkpointing are not
counted, as MFU conventions have it. Tokens are the positions the language model is run on (padding
included). MFU = FLOPs / (step time x `--peak-tflops`, default 989: H100/H200 dense bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import command, offline_env, peak_rss_mib, write_json

# Qwen/Qwen2.5-VL-3B-Instruct's config.json, the sizes only (token ids come from the offline tokenizer).
QWEN25_VL_3B: dict[str, Any] = {
    "tie_word_embeddings": True,
    "text_config": {
        "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
        "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "hidden_act": "silu", "max_window_layers": 70,
        "rope_parameters": {"rope_type": "default", "type": "mrope", "rope_theta": 1000000.0,
                            "mrope_section": [16, 24, 24]},
    },
    "vision_config": {
        "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 2048,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu", "in_channels": 3, "tokens_per_second": 2,
    },
}  # fmt: skip


def qwen25_vl_3b_config(tiny_dir: Path, tied: bool = True) -> Any:
    """The config of a tiny model directory (its token ids, wired to its tokenizer) resized to the 3B; `tied`
    False unties the LM head from the embeddings (FSDP2 here shards them as separate units)."""
    from transformers import AutoConfig

    small = AutoConfig.from_pretrained(tiny_dir)
    spec = small.to_dict()
    spec["tie_word_embeddings"] = QWEN25_VL_3B["tie_word_embeddings"] and tied
    spec["text_config"].update(QWEN25_VL_3B["text_config"])
    spec["text_config"]["tie_word_embeddings"] = spec["tie_word_embeddings"]
    spec["text_config"]["layer_types"] = ["full_attention"] * spec["text_config"]["num_hidden_layers"]
    spec["vision_config"].update(QWEN25_VL_3B["vision_config"])
    return type(small).from_dict(spec)


def build_model(out_dir: Path, tiny: bool, device: str, seed: int, tied: bool = True) -> Path:
    """The tiny model (tokenizer, processor, token ids wired), then, unless `tiny`, its config resized to the
    3B sizes and random bf16 weights of those sizes (initialised on `device`) written over it."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    from lightning_veripo.tiny import make_tiny_model

    vocab = None if tiny else QWEN25_VL_3B["text_config"]["vocab_size"]
    make_tiny_model(out_dir, seed=seed, model_vocab_size=vocab)
    if tiny:
        return out_dir
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(
            qwen25_vl_3b_config(out_dir, tied), dtype=torch.bfloat16
        )
    model.generation_config = GenerationConfig.from_pretrained(out_dir)
    model.save_pretrained(out_dir)
    del model
    return out_dir


def write_pairs(data_dir: Path, n: int) -> Path:
    """n preference pairs on the synthetic train clips: the record's reasoning and answer vs a bare wrong one."""
    from lightning_veripo.data.videoqa import VideoQADataset
    from lightning_veripo.verifier.pairs import PreferencePair

    lines = []
    for record in VideoQADataset(data_dir / "train.json").records[:n]:
        chosen = f"<think>{record.process or ''}</think>{record.solution}"  # solution keeps its <answer> tags
        pair = PreferencePair(record.problem_id, record, "", record.path, {}, chosen, "<answer>?</answer>",
                              0, 0, 0, 1, "consistency:wrong_answer")  # fmt: skip
        lines.append(json.dumps(pair.to_dict()))
    path = data_dir / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


class StageMeter:
    """A Lightning callback: step wall times and the tokens the language model runs, with and without grad."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.step_s: list[float] = []
        self.tokens: list[dict[str, int]] = []
        self.generated: list[int] = []
        self._now = {"grad": 0, "no_grad": 0}
        self._t0 = 0.0
        self.handle: Any = None

    def count(self, module: Any, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("inputs_embeds")
        x = x if x is not None else kwargs.get("input_ids", args[0] if args else None)
        self._now["grad" if torch_grad_enabled() else "no_grad"] += int(x.shape[0] * x.shape[1])

    def attach(self, language_model: Any) -> None:
        self.handle = language_model.register_forward_pre_hook(self.count, with_kwargs=True)

    def begin(self) -> None:
        self._sync()
        self._now = {"grad": 0, "no_grad": 0}
        self._t0 = time.perf_counter()

    def end(self, outputs: Any) -> None:
        self._sync()
        self.step_s.append(time.perf_counter() - self._t0)
        self.tokens.append(dict(self._now))
        rollouts = outputs.get("rollouts") if isinstance(outputs, dict) else None
        self.generated.append(sum(len(r.completion_ids) for r in rollouts) if rollouts else 0)

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def torch_grad_enabled() -> bool:
    import torch

    return torch.is_grad_enabled()


def lm_parameters(hf_model: Any) -> int:
    """Parameters of the language model without its input embedding, with the LM head (tied or not)."""
    decoder = hf_model.model.language_model
    embedding = decoder.get_input_embeddings().weight
    head = hf_model.get_output_embeddings().weight
    return sum(p.numel() for p in decoder.parameters()) - embedding.numel() + head.numel()


def summarise(
    meter: StageMeter, warmup: int, params: int, peak_tflops: float, peak_memory_mib: float
) -> dict:
    timed = slice(warmup, None)
    step_s, tokens, generated = meter.step_s[timed], meter.tokens[timed], meter.generated[timed]
    seconds = sum(step_s)
    grad_tokens = sum(t["grad"] for t in tokens)
    no_grad_tokens = sum(t["no_grad"] for t in tokens)
    flops = 6 * params * grad_tokens + 2 * params * no_grad_tokens
    return {
        "steps_timed": len(step_s),
        "warmup_step_s": meter.step_s[:warmup],
        "step_s": step_s,
        "step_median_s": statistics.median(step_s),
        "lm_tokens_with_grad_per_step": grad_tokens / len(step_s),
        "lm_tokens_without_grad_per_step": no_grad_tokens / len(step_s),
        "lm_tokens_per_s": (grad_tokens + no_grad_tokens) / seconds,
        **({"generated_tokens_per_s": sum(generated) / seconds} if any(generated) else {}),
        "model_tflops_per_step": flops / len(step_s) / 1e12,
        "mfu": flops / seconds / (peak_tflops * 1e12),
        "peak_memory_mib": peak_memory_mib,
    }


def run(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    import lightning as L
    import torch

    from lightning_veripo.backbone import LoRAConfig, VideoLLM
    from lightning_veripo.data.preference import PreferenceDataModule
    from lightning_veripo.data.synthetic import make_synthetic_data
    from lightning_veripo.data.videoqa import FrameSampling, VideoQADataModule
    from lightning_veripo.dpo import DPOModule
    from lightning_veripo.grpo import GRPOModule
    from lightning_veripo.rollout import VLLMSettings
    from lightning_veripo.sharding import FSDP2Strategy, is_sharded

    cuda = not a.tiny
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU visible; run with --tiny for the CPU check")
    L.seed_everything(a.seed, verbose=False)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model_dir = build_model(work / "model", a.tiny, "cuda" if cuda else "cpu", a.seed, tied=not a.fsdp2)
    timings["build_model_s"] = time.perf_counter() - t0
    n_records = max(a.prompts * (a.grpo_steps + 1), a.pairs * (a.dpo_steps + 1))
    data_dir = make_synthetic_data(work / "data", num_train=n_records, num_val=1, seed=a.seed,
                                   tasks=("colour", "direction", "count"), size=a.size, num_frames=a.frames)  # fmt: skip
    pairs = write_pairs(data_dir, n_records)
    sampling = FrameSampling(num_frames=a.frames, min_pixels=a.size * a.size, max_pixels=a.size * a.size)

    t0 = time.perf_counter()
    backbone = VideoLLM(str(model_dir), dtype="float32" if a.tiny else "bfloat16", lora=LoRAConfig(r=a.lora_r,
                        alpha=2 * a.lora_r), gradient_checkpointing=True).load()  # fmt: skip
    timings["load_model_s"] = time.perf_counter() - t0
    params = lm_parameters(backbone.hf_model)

    def trainer(meter: StageMeter, steps: int) -> L.Trainer:
        class Meter(L.Callback):
            def on_train_batch_start(
                self, trainer: L.Trainer, module: Any, batch: Any, batch_idx: int
            ) -> None:
                meter.begin()

            def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any,
                                   batch_idx: int) -> None:  # fmt: skip
                meter.end(outputs)

        strategy = FSDP2Strategy() if a.fsdp2 else "auto"
        return L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, strategy=strategy, precision="bf16-true" if cuda else "32-true",
                         max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Meter()])  # fmt: skip

    def peak_memory_mib() -> float:
        if cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        return peak_rss_mib()

    stages: dict[str, Any] = {}

    def run_stage(name: str, module: Any, datamodule: Any, steps: int) -> None:
        """Fit `module` for warmup + `steps` steps with a fresh meter on the language model; record the stage."""
        meter = StageMeter(cuda)
        meter.attach(backbone.hf_model.model.language_model)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        trainer(meter, a.warmup + steps).fit(module, datamodule=datamodule)
        timings[f"{name}_fit_s"] = time.perf_counter() - t0
        stages[name] = summarise(meter, a.warmup, params, a.peak_tflops, peak_memory_mib())
        meter.handle.remove()

    grpo = GRPOModule(backbone, num_generations=a.G, max_new_tokens=a.max_new_tokens, beta=0.04, lr=1e-6,
                      dynamic_sampling=False,  # random weights score 0 everywhere: keep every group in the loss
                      log_rollouts_every_n_steps=0, rollout_engine=a.engine,
                      vllm=VLLMSettings(python=a.vllm_python, extra_args=tuple(a.vllm_args)))  # fmt: skip
    data = VideoQADataModule(train_path=str(data_dir / "train.json"), sampling=sampling, batch_size=a.prompts,
                             shuffle=False)  # fmt: skip
    run_stage("grpo", grpo, data, a.grpo_steps)
    pair_data = PreferenceDataModule(str(pairs), sampling=sampling, batch_size=a.pairs, shuffle=False)
    run_stage("dpo", DPOModule(backbone, beta=0.1, lr=1e-6), pair_data, a.dpo_steps)

    import lightning
    import transformers

    device = torch.cuda.get_device_name(0) if cuda else (platform.processor() or platform.machine())
    return {
        "check": "gpu_check",
        "command": command(),
        "model": ("tiny (lightning_veripo.tiny)" if a.tiny else "Qwen2.5-VL-3B sizes, random weights, bf16")
        + (", FSDP2 (untied embeddings)" if a.fsdp2 else ""),
        "strategy": "FSDP2Strategy (lightning_veripo.sharding), 1 device" if a.fsdp2 else "single device",
        "sharded": is_sharded(backbone.model),  # fully_shard applied by configure_model
        "device": device,
        "lm_parameters": params,
        "parameters": sum(p.numel() for p in backbone.hf_model.parameters()),
        "settings": {
            k: getattr(a, k)
            for k in (
                "G",
                "prompts",
                "pairs",
                "max_new_tokens",
                "frames",
                "size",
                "lora_r",
                "warmup",
                "grpo_steps",
                "dpo_steps",
                "peak_tflops",
            )
        },  # fmt: skip
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "lightning": lightning.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "timings": timings,
        "stages": stages,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tiny", action="store_true", help="the tiny model on the CPU (seconds), to test the script"
    )
    p.add_argument("--fsdp2", action="store_true",
                   help="fit through FSDP2Strategy (fully_shard per layer) on the one device")  # fmt: skip
    p.add_argument("--G", type=int, default=None, help="rollouts per prompt (default 8; tiny 2)")
    p.add_argument("--prompts", type=int, default=1, help="prompts per GRPO step")
    p.add_argument(
        "--pairs", type=int, default=None, help="preference pairs per DPO step (default 4; tiny 2)"
    )
    p.add_argument("--max-new-tokens", type=int, default=None, help="rollout length (default 256; tiny 4)")
    p.add_argument("--frames", type=int, default=None, help="frames per clip (default 16; tiny 4)")
    p.add_argument("--size", type=int, default=None, help="frame side in pixels (default 448; tiny 56)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first, per stage")
    p.add_argument("--grpo-steps", type=int, default=None, help="timed GRPO steps (default 3; tiny 1)")
    p.add_argument("--dpo-steps", type=int, default=None, help="timed DPO steps (default 3; tiny 1)")
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200: 989)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="GRPO's rollout engine")
    p.add_argument(
        "--vllm-python", default=os.environ.get("VERIPO_VLLM_PYTHON"), help="the vLLM env's python"
    )
    p.add_argument(
        "--vllm-args", nargs="*", default=["--gpu-memory-utilization=0.3"], help="vLLM server args"
    )
    p.add_argument(
        "--workdir", type=Path, default=None, help="where the model and clips go (default: a temp dir)"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="JSON results (default $OUT/gpu_check.json if $OUT is set)"
    )
    a = p.parse_args(argv)
    tiny_or = {  # (GPU default, --tiny default)
        "G": (8, 2), "pairs": (4, 2), "max_new_tokens": (256, 4), "frames": (16, 4), "size": (448, 56),
        "grpo_steps": (3, 1), "dpo_steps": (3, 1),
    }  # fmt: skip
    for name, (gpu, tiny) in tiny_or.items():
        if getattr(a, name) is None:
            setattr(a, name, tiny if a.tiny else gpu)
    if a.size % 28:
        p.error("--size must be a multiple of 28 (Qwen2.5-VL patch 14 x merge 2)")
    offline_env()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        report = run(a, a.workdir or Path(tmp))
    report["total_wall_s"] = time.perf_counter() - started
    memory = "peak GPU memory" if not a.tiny else "peak RSS"
    print(f"{report['model']} on {report['device']}: {report['parameters'] / 1e6:,.1f}M parameters, "
          f"{report['lm_parameters'] / 1e6:,.1f}M in the language model without its input embedding")  # fmt: skip
    for name, s in report["stages"].items():
        generated = (
            f"  generated tokens/s {s['generated_tokens_per_s']:.0f}" if "generated_tokens_per_s" in s else ""
        )
        print(f"{name:4s}: step {s['step_median_s']:.2f}s  LM tokens/s {s['lm_tokens_per_s']:.0f}{generated}  "
              f"{memory} {s['peak_memory_mib']:.0f} MiB  MFU {100 * s['mfu']:.3g}%")  # fmt: skip
    print(
        f"total {report['total_wall_s']:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in report['timings'].items())})"
    )
    out = a.out or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    if out is not None:
        write_json(out, report)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
