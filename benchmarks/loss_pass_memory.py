"""Peak memory of GRPO's loss pass at Qwen2.5-VL's vocabulary: chunked vs unchunked completion log-probs.

The tiny Qwen2.5-VL with its embedding and LM head padded to 151,936 rows (as `grpo_step.py --real-vocab`)
scores prompts x G random completions of T tokens the way `GRPOModule`'s loss pass does:
`VideoLLM.sequence_logprobs` over the shared vision features with gradient, then `.backward()` into the LoRA
weights; and once without gradient, as the reference pass does. Each (T, chunk setting) runs in its own
subprocess: one warm-up pass, then for each measured pass the kernel's resident-set high-water mark is reset
(`/proc/self/clear_refs`) and the pass's peak above the RSS at its start is read back (tracemalloc does not
see torch's allocations). `--chunks none` is `logprob_chunk_tokens=None`: the LM head and the float32
log-softmax over every completion position at once, as before chunking.

    python benchmarks/loss_pass_memory.py --threads 1                   # T 32 128, chunks none 256 64 (~8 min)
    python benchmarks/loss_pass_memory.py --completion-tokens 512 --chunks none 256
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import harness

DEFAULT_OUT = harness.REPO / "benchmarks" / "results" / "loss_pass_memory.json"


def measure(a: argparse.Namespace) -> dict[str, Any]:
    """One subprocess: the loss pass (with gradient) and the reference pass (without) at one chunk setting."""
    harness.setup_process(a.threads, "PASSIVE")
    import torch

    from lightning_veripo.backbone import FORBIDDEN_GENERATION_TOKENS, LoRAConfig, VideoLLM
    from lightning_veripo.data.videoqa import FrameSampling, VideoQACollator, VideoQADataset

    chunk = None if a.chunk == "none" else int(a.chunk)
    torch.manual_seed(a.seed)  # LoRA's A matrices: the same policy in every subprocess, so the sums agree
    lora = LoRAConfig(r=8, alpha=16)
    backbone = VideoLLM(str(a.model_dir), lora=lora, logprob_chunk_tokens=chunk).load()
    with torch.no_grad():  # a non-zero adapter, so the reference differs from the policy
        for name, param in backbone.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    side = a.size * a.size
    sampling = FrameSampling(num_frames=a.frames, min_pixels=side, max_pixels=side)
    dataset = VideoQADataset(a.data_dir / "train.json", sampling=sampling)
    batch = VideoQACollator(backbone.processor, sampling)([dataset[i] for i in range(a.prompts)])
    forbidden = set(backbone.token_ids(FORBIDDEN_GENERATION_TOKENS))
    text_ids = torch.tensor([i for i in range(len(backbone.tokenizer)) if i not in forbidden])
    picks = torch.randint(
        len(text_ids), (a.prompts * a.G, a.completion_tokens), generator=torch.Generator().manual_seed(1)
    )
    ids, mask = text_ids[picks], torch.ones_like(picks)
    vision = backbone.encode_vision(batch)

    def loss_pass() -> float:
        backbone.model.zero_grad(set_to_none=True)
        logps = backbone.sequence_logprobs(batch, ids, mask, a.G, vision=vision)
        logps.sum().backward()
        return float(logps.detach().sum())

    def reference_pass() -> float:
        with torch.no_grad():
            return float(
                backbone.sequence_logprobs(batch, ids, mask, a.G, reference=True, vision=vision).sum()
            )

    out: dict[str, Any] = {"logprob_chunk_tokens": chunk, "rows": a.prompts * a.G,
                           "prompt_tokens": int(batch["input_ids"].shape[1])}  # fmt: skip
    for name, fn in (("loss", loss_pass), ("reference", reference_pass)):
        fn()  # warm-up: lazy initialisation and the allocator's first growth are not the pass's cost
        gc.collect()
        start = harness.rss_mib()
        if not harness.reset_peak_rss():
            raise SystemExit(
                "cannot reset the RSS high-water mark (/proc/self/clear_refs): Linux >= 4.0 needed"
            )
        t0 = time.perf_counter()
        out[f"{name}_logps_sum"] = fn()
        out[f"{name}_s"] = time.perf_counter() - t0
        out[f"{name}_peak_above_start_mib"] = harness.hwm_mib() - start
        out[f"{name}_rss_at_start_mib"] = start
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--completion-tokens", type=int, nargs="+", default=[32, 128], help="T per completion")
    p.add_argument(
        "--chunks", nargs="+", default=["none", "256", "64"], help="logprob_chunk_tokens; none = unchunked"
    )
    p.add_argument("--G", type=int, default=8, help="completions per prompt")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--size", type=int, default=112, help="frame side in pixels (multiple of 28)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--chunk", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker_out:
        a.completion_tokens = a.completion_tokens[0]
        a.worker_out.write_text(json.dumps(measure(a)))
        return 0

    started = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="loss_pass_memory_") as tmp:
        model_dir, data_dir = harness.prepare(Path(tmp), a.frames, a.prompts, a.size, a.seed, real_vocab=True)
        for tokens in a.completion_tokens:
            for chunk in a.chunks:
                out = Path(tmp) / f"{tokens}-{chunk}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-out", str(out), "--chunk", chunk,
                       "--model-dir", str(model_dir), "--data-dir", str(data_dir), "--completion-tokens", str(tokens),
                       "--G", str(a.G), "--prompts", str(a.prompts), "--frames", str(a.frames), "--size", str(a.size),
                       "--threads", str(a.threads), "--seed", str(a.seed)]  # fmt: skip
                m = harness.run_worker(cmd, out, f"T={tokens} chunk={chunk}")
                m.pop("process_wall_s")
                r = {"completion_tokens": tokens, "chunk": chunk, **m}
                results.append(r)
                print(f"T={tokens:>4} chunk={chunk:>5}: loss pass peak +{r['loss_peak_above_start_mib']:.0f} MiB "
                      f"({r['loss_s']:.2f}s), reference pass +{r['reference_peak_above_start_mib']:.0f} MiB", flush=True)  # fmt: skip
    head = ["completion tokens", "rows x tokens", "chunk", "loss pass peak above start (MiB)", "unchunked / this",
            "loss pass (s)", "reference pass peak (MiB)", "unchunked / this"]  # fmt: skip
    rows = []
    for r in results:
        base = next(
            (b for b in results if b["completion_tokens"] == r["completion_tokens"] and b["chunk"] == "none"),
            r,
        )
        loss, reference = (harness.ratio(base[f"{k}_peak_above_start_mib"], r[f"{k}_peak_above_start_mib"])
                           for k in ("loss", "reference"))  # fmt: skip
        rows.append([r["completion_tokens"], r["rows"] * r["completion_tokens"], r["chunk"],
                     f"{r['loss_peak_above_start_mib']:.0f}", harness.fmt(loss, ".1f", "x"), f"{r['loss_s']:.2f}",
                     f"{r['reference_peak_above_start_mib']:.0f}", harness.fmt(reference, ".1f", "x")])  # fmt: skip
    settings = {k: getattr(a, k) for k in ("G", "prompts", "frames", "size", "threads", "seed", "chunks")}
    settings.update(vocab_rows=harness.QWEN25_VL_VOCAB, dtype="float32", lora="r 8 on the LM projections")
    report = {"benchmark": "loss_pass_memory", "command": harness.command(), "commit": harness.git_commit(),
              "settings": settings, "versions": harness.versions(), "machine": harness.machine(),
              "total_wall_s": time.time() - started, "results": results}  # fmt: skip
    print("\n" + harness.markdown_table(head, rows))
    harness.write_json(a.out, report)
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
