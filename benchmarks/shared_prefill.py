"""One prefill per prompt (`VideoLLM(shared_prefill=True)`) vs one per rollout row: generation and the loss pass.

The tiny random Qwen2.5-VL and the synthetic clips of `grpo_step.py` (112x112 frames, 2 prompts, G = 8,
32 new tokens, LoRA r = 8), vision encoded once beforehand as `GRPOModule` does, so only the language model's
work is timed: `generate` (sampling the N*G rollouts) and the loss pass (`sequence_logprobs` on those rollouts
in training mode, forward + backward). Both paths run in the same process on the same batch under the same seed
(so they sample the same tokens), alternating, `--repeats` times per frame count; medians of wall and process
CPU seconds are reported (CPU time is steadier on a shared machine). `shared_prefill=False` is the path the
library had before.

    python benchmarks/shared_prefill.py --threads 1 --frames 16 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.harness import prepare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, nargs="+", default=[16, 32])
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--size", type=int, default=112, help="frame side in pixels (multiple of 28)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--arch", default="qwen2_5_vl", help="make_tiny_model's arch (qwen3_5: use --size 128)")
    a = p.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP
    os.environ["OMP_NUM_THREADS"] = str(a.threads)

    import torch

    from lightning_veripo.backbone import LoRAConfig, VideoLLM
    from lightning_veripo.data.videoqa import FrameSampling, VideoQACollator, VideoQADataset

    torch.set_num_threads(a.threads)

    with tempfile.TemporaryDirectory(prefix="shared_prefill_") as tmp:
        model_dir, data_dir = prepare(Path(tmp), max(a.frames), a.prompts, a.size, seed=0, arch=a.arch)
        backbone = VideoLLM(str(model_dir), lora=LoRAConfig(r=8, alpha=16)).load()
        print(
            "| frames | prompt tokens | pass | per-row wall / CPU (s) | shared wall / CPU (s) | per-row / shared (CPU) |"
        )
        print("|---|---|---|---|---|---|")
        for frames in a.frames:
            pixels = a.size * a.size
            sampling = FrameSampling(num_frames=frames, min_pixels=pixels, max_pixels=pixels)
            dataset = VideoQADataset(data_dir / "train.json", sampling=sampling)
            batch = VideoQACollator(backbone.processor, sampling)([dataset[i] for i in range(a.prompts)])
            vision = backbone.encode_vision(batch, requires_grad=False)
            times: dict[tuple[str, bool], list[tuple[float, float]]] = {}
            for rep in range(a.repeats + 1):  # the first round warms up
                for shared in (False, True) if rep % 2 == 0 else (True, False):
                    backbone.shared_prefill = shared
                    torch.manual_seed(rep)
                    wall, cpu = time.perf_counter(), time.process_time()
                    out = backbone.generate(batch, a.G, a.max_new_tokens, vision=vision)
                    took = [("generate", time.perf_counter() - wall, time.process_time() - cpu)]
                    backbone.model.train()
                    backbone.model.zero_grad(set_to_none=True)
                    wall, cpu = time.perf_counter(), time.process_time()
                    logps = backbone.sequence_logprobs(
                        batch, out.ids, out.mask, num_samples=a.G, vision=vision
                    )
                    (-(logps * out.mask).sum() / out.mask.sum()).backward()
                    took.append(("loss pass", time.perf_counter() - wall, time.process_time() - cpu))
                    for name, seconds, cpu_seconds in took if rep else ():
                        times.setdefault((name, shared), []).append((seconds, cpu_seconds))
            for name in ("generate", "loss pass"):
                per_row, once = (
                    [statistics.median(t[i] for t in times[(name, s)]) for i in (0, 1)] for s in (False, True)
                )
                print(f"| {frames} | {batch['input_ids'].shape[1]} | {name} | {per_row[0]:.3f} / {per_row[1]:.3f} "
                      f"| {once[0]:.3f} / {once[1]:.3f} | {per_row[1] / once[1]:.2f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
