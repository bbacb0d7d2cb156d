"""Stage speed: a GRPO stage vs a DPO stage per prompt (ours), and DPOModule vs TRL's DPOTrainer on the same pairs.

VerIPO argues that its DPO stage ("pair fast align") is much cheaper than its GRPO stage ("group slow search"):
the paper reports DPO about 7x faster. This benchmark measures both stages of lightning_veripo on the same
tiny Qwen2.5-VL and the same synthetic clips, then compares our DPO step with TRL's on the same pairs.

    python benchmarks/stage_speed.py          # both parts, DPO frames 4 16 32, 2 runs per configuration (~9 min)
    python benchmarks/stage_speed.py --quick  # a smoke test: 1 run, DPO frames 4 only, fewer steps (~2.5 min)
    python benchmarks/stage_speed.py --part b --frames 8 64 --threads 1

Setup (untimed, once): the tiny random model is warm-started with `SFTModule` as configs/demo_sft.yaml does (its
LoRA, lr, steps and batch size are read from the YAML), the adapter is merged into the weights and the result is
saved whole: the base model of every run below, ours and TRL's. Without a warm start the random model samples
noise at temperature 1, every question is `all_wrong` and the verifier builds no pair. `--warm-start full`
fine-tunes all weights instead (`--sft-steps`, `--sft-lr`).

Part A, GRPO stage vs DPO stage (ours only). A GRPO fit (`GRPOModule`, the demo's settings: G=8,
max_new_tokens=40, temperature 1, beta 0, LoRA r=8) of N steps with `VerifierCallback` (rule judge, default
`PairConfig`) writes real pairs.jsonl; the GRPO adapter is kept. A DPO fit (`DPOModule`, the demo's settings:
beta 0.1, sigmoid, batch 4, LoRA r=8, from the GRPO policy as the VerIPO loop does) runs one epoch on those
pairs, once with a reference pass per step and once with `precompute_ref_logps`. Each fit is timed from
Lightning's `on_train_start` to `on_train_end` (model loading excluded; the verifier, which runs in
`on_train_end` after the timer, is reported apart) and per step; "per prompt" divides by the prompts a fit
trained on (GRPO: questions x 1, each with G rollouts; DPO: pairs, each one prompt with two completions).

Part B, DPOModule vs TRL 1.16 DPOTrainer on the same pairs: the same base model, pairs, LoRA, beta, loss
(sigmoid), batch, learning rate, seed, no truncation, no gradient clipping, float32, sequential batches. The
pairs' recorded frame indices are replaced by F evenly spaced ones for each swept F. TRL's DPOTrainer has no
video input (its vision collator passes `images` only), so TRL gets each clip as stills: F/2 of the F frames
(every other one) by default, which Qwen2.5-VL's image processor turns into the vision patches and LM
placeholder tokens of our F-frame video (see benchmarks/grpo_step.py); `--trl-frames all` gives all F. Rows:
ours, ours with precomputed reference log-probs (TRL refuses `precompute_ref_log_probs` for vision data), TRL.

Agreement check (once): with both adapters set to the same random LoRA weights (so policy != reference), the
first batch of pairs given to both as a single still image (the same pixels, the same prompt and completion
tokens), our `DPOModule.dpo_step` and TRL's `DPOTrainer.compute_loss` must give the same loss, log-probs and
rewards within a tolerance.

Every configuration runs in its own subprocess (peak RSS from `getrusage`), orders alternate between repeats,
with `OMP_WAIT_POLICY=PASSIVE` and the load average recorded at every step (helpers shared with grpo_step.py).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import harness

DEFAULT_OUT = harness.REPO / "benchmarks" / "results" / "stage_speed.json"
DEMO_SFT = harness.REPO / "configs" / "demo_sft.yaml"
DPO_IMPLS = ("ours", "ours_precompute", "trl")
TRAINER_QUIET = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "limit_val_batches": 0,
    "num_sanity_val_steps": 0,
}


# ----------------------------------------------------------------------------- worker helpers


def _sampling(frames: int, size: int) -> Any:
    from lightning_veripo.data.videoqa import FrameSampling

    return FrameSampling(num_frames=frames, min_pixels=size * size, max_pixels=size * size)


def _lora(r: int) -> Any:
    from lightning_veripo.backbone import LoRAConfig

    return LoRAConfig(r=r, alpha=2 * r)


class CallCounter:
    """Forward calls of the whole model (vision + LM) per step: a forward pre-hook, snapshots around each step."""

    def __init__(self) -> None:
        self.calls = 0
        self.per_step: list[int] = []
        self._start = 0

    def attach(self, model: Any) -> None:
        def hook(module: Any, args: tuple) -> None:
            self.calls += 1

        model.register_forward_pre_hook(hook)

    def begin(self) -> None:
        self._start = self.calls

    def end(self) -> None:
        self.per_step.append(self.calls - self._start)


class FitTimer:
    """A Lightning callback: fit-loop span, per-step spans (harness.Timings) and what each batch held."""

    def __init__(self, count_row: Any) -> None:
        import lightning as L

        counter = harness.VisionCounter()
        self.timings = harness.Timings(counter)
        self.prompts: list[int] = []
        self.row_tokens: list[int] = []
        self.outputs: list[Any] = []
        self.lm_calls = CallCounter()
        self.loop_s = 0.0
        self._t0 = 0.0
        outer = self

        class _Callback(L.Callback):
            def on_train_start(self, trainer: Any, module: Any) -> None:
                counter.attach(module.backbone._vision_tower(module.backbone.hf_model))
                outer.lm_calls.attach(module.backbone.hf_model)
                outer._t0 = time.perf_counter()

            def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
                outer.prompts.append(int(batch["input_ids"].shape[0]))
                outer.row_tokens.append(count_row(batch))
                outer.lm_calls.begin()
                outer.timings.begin()

            def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, i: int) -> None:
                outer.timings.end()
                outer.lm_calls.end()
                outer.outputs.append(outputs)

            def on_train_end(self, trainer: Any, module: Any) -> None:
                outer.loop_s = time.perf_counter() - outer._t0

        self.callback = _Callback()

    def summary(self, warmup: int, extra: dict[str, Any]) -> dict[str, Any]:
        n = sum(self.prompts)
        out = harness.summary(self.timings, warmup, extra)
        out.update(
            loop_s=self.loop_s,
            steps=len(self.prompts),
            prompts=n,
            prompts_per_step=self.prompts,
            loop_per_prompt_s=self.loop_s / max(n, 1),
            loop_per_step_s=self.loop_s / max(len(self.prompts), 1),
            steady_per_prompt_s=statistics.median(
                t / p for t, p in zip(self.timings.step[warmup:], self.prompts[warmup:], strict=True)
            ),
            steady_cpu_per_prompt_s=statistics.median(
                t / p for t, p in zip(self.timings.cpu[warmup:], self.prompts[warmup:], strict=True)
            ),
            row_tokens=self.row_tokens,
            model_forward_calls_per_step=self.lm_calls.per_step,
        )
        return out


def _trainer(timer: FitTimer, extra_callbacks: tuple = (), **kw: Any) -> Any:
    import lightning as L

    return L.Trainer(**TRAINER_QUIET, callbacks=[timer.callback, *extra_callbacks], **kw)


def _dpo_row_tokens(batch: dict[str, Any]) -> int:
    """Padded prompt + completion length of the rows our DPO step scores."""
    return int(
        batch["input_ids"].shape[1] + max(batch["chosen"].ids.shape[1], batch["rejected"].ids.shape[1])
    )


# ----------------------------------------------------------------------------- workers: setup and part A


def warm_start_settings(a: argparse.Namespace) -> dict[str, Any]:
    """How the tiny model is warm-started: configs/demo_sft.yaml's LoRA, lr, steps and batch (`demo`), or a full
    fine-tune of `--sft-steps` steps at `--sft-lr` (`full`)."""
    if a.warm_start == "full":
        return {"lora": None, "lr": a.sft_lr, "steps": a.sft_steps, "batch_size": 4}
    import yaml

    config = yaml.safe_load(DEMO_SFT.read_text())
    init = config["model"]["init_args"]
    return {
        "lora": init["backbone"]["init_args"].get("lora"),
        "lr": float(init.get("lr", 1e-3)),
        "steps": int(config["trainer"]["max_steps"]),
        "batch_size": int(config["data"]["init_args"].get("batch_size", 1)),
    }


def run_sft(a: argparse.Namespace) -> dict[str, Any]:
    """Warm start (untimed setup): `SFTModule` on reference completions; the result (a LoRA warm start merged into
    the weights) is saved as a whole model, the base of every later run, ours and TRL's."""
    harness.setup_process(a.threads, a.omp_wait_policy)
    import lightning as L

    from lightning_veripo.backbone import LoRAConfig, VideoLLM
    from lightning_veripo.data.videoqa import VideoQADataModule
    from lightning_veripo.sft import SFTModule

    L.seed_everything(a.seed, verbose=False)
    t0 = time.perf_counter()
    ws = warm_start_settings(a)
    backbone = VideoLLM(
        str(a.model_dir), dtype="float32", lora=LoRAConfig(**ws["lora"]) if ws["lora"] else None
    )
    module = SFTModule(backbone, lr=ws["lr"])
    data = VideoQADataModule(
        train_path=str(a.data_dir / "train.json"),
        sampling=_sampling(a.grpo_frames, a.size),
        batch_size=ws["batch_size"],
    )
    L.Trainer(**TRAINER_QUIET, max_steps=ws["steps"]).fit(module, datamodule=data)
    if ws["lora"]:
        backbone.model.merge_and_unload().save_pretrained(a.save_dir)
        backbone.processor.save_pretrained(a.save_dir)
    else:
        backbone.save_pretrained(a.save_dir)
    return {
        **ws,
        "sft_s": time.perf_counter() - t0,
        "sft_loss_last": float(module.trainer.callback_metrics["train/sft_loss"]),
    }


def run_grpo(a: argparse.Namespace) -> dict[str, Any]:
    """Part A: a GRPO fit of the demo's settings with the VerifierCallback; writes pairs and the adapter."""
    harness.setup_process(a.threads, a.omp_wait_policy)
    import lightning as L

    from lightning_veripo.backbone import VideoLLM
    from lightning_veripo.callbacks.verifier import VerifierCallback
    from lightning_veripo.data.videoqa import VideoQADataModule
    from lightning_veripo.grpo import GRPOModule

    L.seed_everything(a.seed, verbose=False)
    backbone = VideoLLM(str(a.model_dir), dtype="float32", lora=_lora(a.lora_r))
    module = GRPOModule(
        backbone,
        num_generations=a.G,
        max_new_tokens=a.max_new_tokens,
        temperature=1.0,
        beta=a.grpo_beta,
        lr=a.grpo_lr,
        log_rollouts_every_n_steps=0,
    )  # everything else at GRPOModule's defaults, as configs/demo_grpo.yaml
    data = VideoQADataModule(
        train_path=str(a.data_dir / "train.json"),
        sampling=_sampling(a.grpo_frames, a.size),
        batch_size=a.grpo_prompts,
        shuffle=False,
    )
    timer = FitTimer(lambda batch: int(batch["input_ids"].shape[1]))
    verifier = VerifierCallback(
        out_dir=str(a.save_dir / "verifier"), progress=False, log_pairs_to_tensorboard=0
    )
    _trainer(timer, (verifier,), max_steps=a.grpo_steps).fit(module, datamodule=data)
    if a.save_adapter:
        backbone.save_pretrained(a.save_dir / "adapter")
    lengths = [len(r.completion_ids) for out in timer.outputs for r in out["rollouts"]]
    stats = verifier.stats or {}
    return timer.summary(
        1,
        {
            "pairs_path": str(a.save_dir / "verifier" / "pairs.jsonl"),
            "adapter": str(a.save_dir / "adapter") if a.save_adapter else None,
            "rollouts": len(lengths),
            "mean_completion_tokens": statistics.mean(lengths),
            "truncated_fraction": statistics.mean(
                float(r.truncated) for out in timer.outputs for r in out["rollouts"]
            ),
            "verifier": {
                k: stats.get(k)
                for k in (
                    "pairs",
                    "pairs_by_reason",
                    "questions_with_pairs",
                    "questions_skipped",
                    "accuracy",
                    "consistent_rate",
                    "wall_time_s",
                )
            },  # fmt: skip
            "vision_input": f"video: {a.grpo_frames} frames of {a.size}x{a.size} per prompt",
        },
    )


# ----------------------------------------------------------------------------- workers: DPO (parts A and B)


def run_dpo_ours(a: argparse.Namespace) -> dict[str, Any]:
    """DPOModule on a pairs file: one epoch (part A, `--epochs 1`) or warmup + steps (part B)."""
    harness.setup_process(a.threads, a.omp_wait_policy)
    import lightning as L

    from lightning_veripo.backbone import VideoLLM
    from lightning_veripo.data.preference import PreferenceDataModule
    from lightning_veripo.dpo import DPOModule

    L.seed_everything(a.seed, verbose=False)
    precompute = a.worker == "ours_precompute"
    backbone = VideoLLM(
        str(a.model_dir),
        dtype="float32",
        lora=_lora(a.lora_r),
        merge_adapters=[a.merge_adapter] if a.merge_adapter else None,
    )
    module = DPOModule(
        backbone, beta=a.beta, loss_type="sigmoid", lr=a.dpo_lr, precompute_ref_logps=precompute
    )
    precompute_s: list[float] = []
    if precompute:
        original = module.precompute_reference

        def timed(loader: Any) -> None:
            t0 = time.perf_counter()
            original(loader)
            precompute_s.append(time.perf_counter() - t0)

        module.precompute_reference = timed  # type: ignore[method-assign]
    data = PreferenceDataModule(
        pairs_path=str(a.pairs),
        sampling=_sampling(a.num_frames, a.size),
        batch_size=a.dpo_batch,
        shuffle=False,
    )
    timer = FitTimer(_dpo_row_tokens)
    limits = {"max_epochs": a.epochs} if a.epochs else {"max_steps": a.warmup + a.steps, "max_epochs": -1}
    _trainer(timer, **limits).fit(module, datamodule=data)
    n_pairs = len(data.dataset("train"))
    return timer.summary(
        a.warmup,
        {
            "pairs_in_file": n_pairs,
            "precompute_s": sum(precompute_s),
            "precompute_per_pair_s": sum(precompute_s) / n_pairs if precompute else 0.0,
            "ref_logps_computed": module.ref_logps_computed,
            "scored_sequence_tokens_padded": timer.row_tokens[-1],
            "mean_completion_tokens": None,
            "vision_input": f"video: {a.num_frames} frames of {a.size}x{a.size} per pair",
        },
    )


def _frames_for(pair: Any, num_frames: int, size: int, trl_frames: str) -> list[Any]:
    """The stills TRL gets for one pair: the frames our collator decodes, every other one when matched."""
    import numpy as np
    from PIL import Image

    from lightning_veripo.data.preference import load_video_at
    from lightning_veripo.data.videoqa import load_video

    indices = pair.sampling.get("frames_indices")
    frames, _ = (
        load_video_at(pair.video, indices) if indices else load_video(pair.video, _sampling(num_frames, size))
    )
    if trl_frames == "matched":
        frames = frames[::2]
    return [Image.fromarray(np.asarray(f)) for f in frames]


def _trl_row(processor: Any, pair: Any, images: list[Any]) -> dict[str, Any]:
    """A TRL preference row in the *standard* (pre-rendered) format, so its tokens equal ours: the prompt is
    our chat template with one image placeholder per still, the completions end with <|im_end|> as ours do
    (TRL's conversational format would render a newline after it, one more token per completion)."""
    from lightning_veripo.completions import END_OF_TURN
    from lightning_veripo.data.videoqa import build_prompt

    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": build_prompt(pair.record)}]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return {"prompt": prompt, "chosen": pair.chosen + END_OF_TURN, "rejected": pair.rejected + END_OF_TURN,
            "images": images}  # fmt: skip


def _trl_trainer(
    a: argparse.Namespace, rows: list[dict[str, Any]], max_steps: int, callbacks: list[Any]
) -> Any:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, processor = harness.trl_model(a.model_dir, a.size)
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_dpo_bench_"),
        per_device_train_batch_size=a.dpo_batch,
        beta=a.beta,
        loss_type=["sigmoid"],
        max_length=None,  # ours never truncates
        precompute_ref_log_probs=False,  # TRL refuses it for vision data
        learning_rate=a.dpo_lr,
        max_grad_norm=0.0,  # Lightning's default: no clipping
        max_steps=max_steps,
        seed=a.seed,
        train_sampling_strategy="sequential",  # = ours' shuffle=False: the same pairs in the same batches
        **harness.TRL_CPU_ARGS,
    )
    return DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=processor,
                      peft_config=harness.trl_lora(a.lora_r), callbacks=callbacks)  # fmt: skip


def run_dpo_trl(a: argparse.Namespace) -> dict[str, Any]:
    """TRL's DPOTrainer on the same pairs, frames given as stills; warmup + steps."""
    harness.setup_process(a.threads, a.omp_wait_policy)
    import torch
    from transformers import AutoProcessor, TrainerCallback

    from lightning_veripo.data.preference import read_pairs

    torch.manual_seed(a.seed)
    pairs, _ = read_pairs(a.pairs)
    processor = AutoProcessor.from_pretrained(str(a.model_dir))
    rows = [_trl_row(processor, p, _frames_for(p, a.num_frames, a.size, a.trl_frames)) for p in pairs]
    counter = harness.VisionCounter()
    timings = harness.Timings(counter)
    model_calls = CallCounter()

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            model_calls.begin()
            timings.begin()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            timings.end()
            model_calls.end()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.t0 = time.perf_counter()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.loop_s = time.perf_counter() - self.t0

    timer = StepTimer()
    trainer = _trl_trainer(a, rows, a.warmup + a.steps, [timer])
    base = trainer.model.get_base_model()
    counter.attach(base.model.visual)
    model_calls.attach(base)
    scored = harness.ScoredLength()
    scored.attach(base)
    trainer.train()
    shutil.rmtree(trainer.args.output_dir, ignore_errors=True)  # save_strategy="no": nothing in it to keep
    out = harness.summary(
        timings,
        a.warmup,
        {
            "scored_sequence_tokens_padded": scored.last,
            "mean_completion_tokens": None,
            "vision_input": (f"{len(rows[0]['images'])} images of {a.size}x{a.size} per pair "
                             f"({'every other frame of' if a.trl_frames == 'matched' else 'all'} {a.num_frames} frames)"),
        },
    )  # fmt: skip
    out.update(loop_s=timer.loop_s, steps=len(timings.step), pairs_in_file=len(pairs), precompute_s=0.0,
               model_forward_calls_per_step=model_calls.per_step)  # fmt: skip
    return out


def run_agree(a: argparse.Namespace) -> dict[str, Any]:
    """Ours vs TRL on one batch with identical inputs and weights: loss, log-probs and rewards must agree."""
    harness.setup_process(a.threads, a.omp_wait_policy)
    import dataclasses

    import torch
    from PIL import Image

    from lightning_veripo.backbone import VideoLLM
    from lightning_veripo.data.preference import (
        PreferenceCollator,
        PreferenceDataset,
        load_video_at,
        read_pairs,
    )
    from lightning_veripo.dpo import DPOModule

    pairs, _ = read_pairs(a.pairs)
    pairs = pairs[: a.dpo_batch]
    # The same single still per pair on both sides: the first of the frames the rollout saw, as a PNG record.
    stills_dir = Path(tempfile.mkdtemp(prefix="dpo_agree_"))
    still_pairs, stills = [], []
    for i, p in enumerate(pairs):
        indices = p.sampling.get("frames_indices") or [0]
        frame = Image.fromarray(load_video_at(p.video, indices[:1])[0][0])
        path = stills_dir / f"still_{i}.png"
        frame.save(path)
        stills.append(frame)
        record = dataclasses.replace(p.record, data_type="image", path=str(path))
        still_pairs.append(dataclasses.replace(p, record=record, video=str(path), sampling={}))
    pairs_file = stills_dir / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in still_pairs))

    # ours, with random LoRA weights so that the policy differs from the reference (B = 0 at init: loss = log 2)
    torch.manual_seed(a.seed)
    backbone = VideoLLM(str(a.model_dir), dtype="float32", lora=_lora(a.lora_r)).load()
    gen = torch.Generator().manual_seed(a.seed + 1)
    lora_weights = {}
    with torch.no_grad():
        for name, p in sorted(backbone.model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                lora_weights[name] = p.detach().clone()
    module = DPOModule(backbone, beta=a.beta, loss_type="sigmoid")
    sampling = _sampling(a.num_frames, a.size)
    dataset = PreferenceDataset(pairs_file, sampling)
    batch = PreferenceCollator(backbone.processor, sampling)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        out = module.dpo_step(batch)
    ours = {
        "loss": float(out.loss),
        "logps/chosen": float(out.policy.chosen.mean()),
        "logps/rejected": float(out.policy.rejected.mean()),
        "rewards/chosen": float(out.chosen_rewards.mean()),
        "rewards/rejected": float(out.rejected_rewards.mean()),
        "ref_logps/chosen": float(out.reference.chosen.mean()),
    }
    ours_tokens = _dpo_row_tokens(batch)
    del backbone, module

    # TRL on the same stills, prompts and completions, with the same LoRA weights
    processor = _processor(a)
    rows = [_trl_row(processor, p, [s]) for p, s in zip(pairs, stills, strict=True)]
    trainer = _trl_trainer(a, rows, 1, [])
    trl_params = dict(trainer.model.named_parameters())
    missing = sorted(set(lora_weights) ^ {n for n in trl_params if "lora_" in n})
    if missing:
        raise RuntimeError(f"LoRA parameter names differ between ours and TRL: {missing[:4]}")
    with torch.no_grad():
        for name, value in lora_weights.items():
            trl_params[name].copy_(value)
        inputs = trainer._prepare_inputs(trainer.data_collator([dict(r) for r in rows]))
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, inputs)
    metrics = trainer._metrics["train"]
    trl = {"loss": float(loss), **{k: float(metrics[k][-1]) for k in ("logps/chosen", "logps/rejected", "rewards/chosen",
                                                                         "rewards/rejected")}}  # fmt: skip
    diffs = {k: abs(ours[k] - trl[k]) for k in trl}
    rel = {k: diffs[k] / max(abs(trl[k]), 1e-8) for k in trl}
    ok = all(diffs[k] <= a.agree_atol + a.agree_rtol * abs(trl[k]) for k in trl)
    shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
    shutil.rmtree(stills_dir, ignore_errors=True)
    return {
        "pairs": len(rows),
        "input": f"1 still image of {a.size}x{a.size} per pair (the first frame the rollout saw), image records",
        "ours": ours,
        "trl": trl,
        "abs_diff": diffs,
        "rel_diff": rel,
        "atol": a.agree_atol,
        "rtol": a.agree_rtol,
        "agree": ok,
        "row_tokens_ours": ours_tokens,
        "row_tokens_trl": int(inputs["input_ids"].shape[1]),
        "loss_at_init_would_be": math.log(2),
    }


def _processor(a: argparse.Namespace) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(a.model_dir))


WORKERS = {
    "sft": run_sft,
    "grpo": run_grpo,
    "ours": run_dpo_ours,
    "ours_precompute": run_dpo_ours,
    "trl": run_dpo_trl,
    "agree": run_agree,
}
PATH_FIELDS = ("model_dir", "data_dir", "save_dir", "pairs", "workdir", "out")


# ----------------------------------------------------------------------------- driver


def _run_worker(a: argparse.Namespace, name: str, tmp: Path, tag: str, **fields: Any) -> dict[str, Any]:
    """Run one worker in a fresh interpreter with the driver's settings plus `fields`; return its JSON."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    config.update({k: (str(v) if isinstance(v, Path) else v) for k, v in fields.items()})
    config_path, out = tmp / f"{tag}.config.json", tmp / f"{tag}.json"
    config_path.write_text(json.dumps(config))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--worker-config", str(config_path),
           "--worker-out", str(out)]  # fmt: skip
    return harness.run_worker(cmd, out, f"worker {tag}")


def _load_worker_config(path: Path, name: str) -> argparse.Namespace:
    config = json.loads(Path(path).read_text())
    for k in PATH_FIELDS:
        if config.get(k) is not None:
            config[k] = Path(config[k])
    config["worker"] = name
    return argparse.Namespace(**config)


def pairs_with_frames(pairs: Path, num_frames: int, out: Path) -> Path:
    """A copy of a pairs file whose recorded frame indices are `num_frames` evenly spaced frames of each clip."""
    import decord

    from lightning_veripo.data.videoqa import FrameSampling

    sampling, lines = FrameSampling(num_frames=num_frames), []
    for line in pairs.read_text().splitlines():
        if line.strip():
            pair = json.loads(line)
            reader = decord.VideoReader(pair["video"], num_threads=1)
            indices = sampling.frame_indices(len(reader), float(reader.get_avg_fps()) or 1.0)
            pair["sampling"] = {**pair["sampling"], "frames_indices": indices}
            lines.append(json.dumps(pair))
    out.write_text("".join(x + "\n" for x in lines))
    return out


def _fresh_copy(pairs: Path, tmp: Path, tag: str) -> Path:
    """Pairs in a directory of their own, so a precompute run never finds an earlier run's reference cache."""
    target = tmp / "pairs-copies" / tag / "pairs.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pairs, target)
    return target


def _pool_stage(runs: list[dict[str, Any]]) -> dict[str, Any]:
    step = [x for r in runs for x in r["step_s"]]
    return {
        "runs": len(runs),
        "steps": runs[0]["steps"],
        "prompts": runs[0]["prompts"],
        "loop_s_median": statistics.median(r["loop_s"] for r in runs),
        "loop_per_prompt_s": statistics.median(r["loop_per_prompt_s"] for r in runs),
        "loop_per_step_s": statistics.median(r["loop_per_step_s"] for r in runs),
        "steady_per_prompt_s": statistics.median(r["steady_per_prompt_s"] for r in runs),
        "steady_cpu_per_prompt_s": statistics.median(r["steady_cpu_per_prompt_s"] for r in runs),
        "step_median_s": statistics.median(step),
        "cpu_median_s": statistics.median(x for r in runs for x in r["cpu_s"]),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "vision_calls_per_step": runs[0]["vision_calls_per_step"],
        "vision_patches_per_step": runs[0]["vision_patches_per_step"],
        "loadavg": harness.mean_load(runs),
        "precompute_s": statistics.median(r.get("precompute_s", 0.0) for r in runs),
        "detail": runs,
    }


def part_a(a: argparse.Namespace, tmp: Path, model_dir: Path, data_dir: Path) -> dict[str, Any]:
    order = ("grpo", "dpo") if a.quick else ("grpo", "dpo", "dpo_precompute")  # quick: part B has precompute
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in order}
    source: dict[str, Any] = {}
    for rep in range(a.repeats):
        for stage in order if rep % 2 == 0 else order[::-1]:  # the first GRPO run writes the pairs
            tag = f"a-{stage}-{rep}"
            if stage == "grpo":
                m = _run_worker(a, "grpo", tmp, tag, model_dir=model_dir, data_dir=data_dir,
                                save_dir=tmp / tag, save_adapter=not source)  # fmt: skip
                if not source:
                    source = {
                        "pairs": Path(m["pairs_path"]),
                        "adapter": m["adapter"],
                        "verifier": m["verifier"],
                    }
                    if not m["verifier"]["pairs"]:
                        raise SystemExit(f"the GRPO fit built no preference pairs: {m['verifier']}; try more "
                                         f"--grpo-steps, or --warm-start full")  # fmt: skip
            else:
                impl = "ours_precompute" if stage == "dpo_precompute" else "ours"
                m = _run_worker(a, impl, tmp, tag, model_dir=model_dir, pairs=_fresh_copy(source["pairs"], tmp, tag),
                                merge_adapter=source["adapter"], num_frames=a.grpo_frames, epochs=1, warmup=1)  # fmt: skip
            runs[stage].append(m)
            print(f"[part A, run {rep + 1}/{a.repeats}] {stage:14s}: fit loop {m['loop_s']:.1f}s, {m['prompts']} prompts "
                  f"in {m['steps']} steps, {m['loop_per_prompt_s'] * 1000:.0f} ms/prompt, peak RSS {m['peak_rss_mib']:.0f} MiB, "
                  f"load {harness.mean_load([m]):.1f} ({m['process_wall_s']:.0f}s)", flush=True)  # fmt: skip
    pooled = {k: _pool_stage(v) for k, v in runs.items()}
    g = pooled["grpo"]
    ratios = {}
    for k in order[1:]:
        d = pooled[k]
        ratios[k] = {
            "per_prompt_fit_loop": g["loop_per_prompt_s"] / d["loop_per_prompt_s"],
            "per_prompt_steady": g["steady_per_prompt_s"] / d["steady_per_prompt_s"],
            "per_prompt_step_cpu": g["steady_cpu_per_prompt_s"] / d["steady_cpu_per_prompt_s"],
            "per_step_fit_loop": g["loop_per_step_s"] / d["loop_per_step_s"],
            "whole_stage": g["loop_s_median"] / d["loop_s_median"],
        }
    return {"verifier": source["verifier"], "stages": pooled, "ratios_grpo_over_dpo": ratios,
            "_pairs_path": source["pairs"]}  # fmt: skip


def _pool_dpo(runs: list[dict[str, Any]]) -> dict[str, Any]:
    pooled = harness.pool(runs)
    pooled["precompute_s"] = statistics.median(r.get("precompute_s", 0.0) for r in runs)
    pooled["precompute_per_pair_s"] = statistics.median(r.get("precompute_per_pair_s", 0.0) for r in runs)
    pooled["model_forward_calls_per_step"] = runs[0]["model_forward_calls_per_step"][-1]
    return pooled


def part_b(a: argparse.Namespace, tmp: Path, model_dir: Path, pairs: Path) -> list[dict[str, Any]]:
    results = []
    for f in a.frames:
        pairs_f = pairs_with_frames(pairs, f, tmp / f"pairs-{f}f.jsonl")
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in DPO_IMPLS}
        for rep in range(a.repeats):
            for impl in DPO_IMPLS if rep % 2 == 0 else DPO_IMPLS[::-1]:
                tag = f"b-{impl}-{f}-{rep}"
                m = _run_worker(a, impl, tmp, tag, model_dir=model_dir, pairs=_fresh_copy(pairs_f, tmp, tag),
                                num_frames=f, epochs=0, merge_adapter=None)  # fmt: skip
                runs[impl].append(m)
                print(f"[part B, {f:>2} frames, run {rep + 1}/{a.repeats}] {impl:15s}: step median {m['step_median_s']:.3f}s "
                      f"peak RSS {m['peak_rss_mib']:.0f} MiB  load {harness.mean_load([m]):.1f}  ({m['process_wall_s']:.0f}s)", flush=True)  # fmt: skip
        row: dict[str, Any] = {"frames": f, **{impl: _pool_dpo(runs[impl]) for impl in DPO_IMPLS}}
        o, p, t = row["ours"], row["ours_precompute"], row["trl"]
        row["ratios"] = {
            "trl_over_ours": {"step_time": t["step_median_s"] / o["step_median_s"],
                              "step_cpu": t["cpu_median_s"] / o["cpu_median_s"],
                              "iter_time": t["iter_median_s"] / o["iter_median_s"],
                              "peak_rss": t["peak_rss_mib"] / o["peak_rss_mib"],
                              "peak_minus_before_train": t["peak_minus_before_train_mib"]
                              / max(o["peak_minus_before_train_mib"], 1e-9)},
            "trl_over_ours_precompute": {"step_time": t["step_median_s"] / p["step_median_s"],
                                         "peak_rss": t["peak_rss_mib"] / p["peak_rss_mib"]},
            "ours_over_ours_precompute": {"step_time": o["step_median_s"] / p["step_median_s"]},
        }  # fmt: skip
        results.append(row)
    return results


def table_a(res: dict[str, Any], a: argparse.Namespace) -> str:
    names = {"grpo": f"GRPO (G={a.G}, {a.max_new_tokens} new tokens, beta {a.grpo_beta:g})",
             "dpo": "DPO (reference pass per step)", "dpo_precompute": "DPO (precomputed reference)"}  # fmt: skip
    lines = ["| stage | prompts / run | steps | fit loop (s) | per prompt, fit loop (ms) | per prompt, steady (ms) "
             "| per prompt, step CPU (ms) | per step, fit loop (ms) | step median (ms) | precompute (s) "
             "| vision calls / step | peak RSS (MiB) | load avg |",
             "|" + "---|" * 13]  # fmt: skip
    names = {k: v for k, v in names.items() if k in res["stages"]}
    for k, name in names.items():
        s = res["stages"][k]
        lines.append(f"| {name} | {s['prompts']} | {s['steps']} | {s['loop_s_median']:.2f} | {s['loop_per_prompt_s'] * 1e3:.0f} "
                     f"| {s['steady_per_prompt_s'] * 1e3:.0f} | {s['steady_cpu_per_prompt_s'] * 1e3:.0f} "
                     f"| {s['loop_per_step_s'] * 1e3:.0f} | {s['step_median_s'] * 1e3:.0f} "
                     f"| {s['precompute_s']:.2f} | {s['vision_calls_per_step']} | {s['peak_rss_mib']:.0f} | {s['loadavg']:.1f} |")  # fmt: skip
    lines += ["", "| GRPO / DPO | per prompt, fit loop | per prompt, steady | per prompt, step CPU | per step, fit loop "
              "| whole stage (same questions) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for k in res["ratios_grpo_over_dpo"]:
        r = res["ratios_grpo_over_dpo"][k]
        lines.append(f"| vs {names[k]} | {r['per_prompt_fit_loop']:.1f}x | {r['per_prompt_steady']:.1f}x "
                     f"| {r['per_prompt_step_cpu']:.1f}x "
                     f"| {r['per_step_fit_loop']:.1f}x | {r['whole_stage']:.1f}x |")  # fmt: skip
    return "\n".join(lines)


def table_b(results: list[dict[str, Any]]) -> str:
    lines = ["| frames | impl | step median (ms) | step min (ms) | step CPU median (ms) | iter median (ms) | model forwards / step "
             "| vision calls / step | vision patches / step | LM tokens / row | precompute (s) | peak RSS (MiB) "
             "| peak - RSS before train (MiB) | load avg |",
             "|" + "---|" * 14]  # fmt: skip
    for r in results:
        for impl in DPO_IMPLS:
            m = r[impl]
            lines.append(f"| {r['frames']} | {impl} | {m['step_median_s'] * 1e3:.0f} | {m['step_min_s'] * 1e3:.0f} "
                         f"| {m['cpu_median_s'] * 1e3:.0f} | {harness.fmt(m['iter_median_s'] and m['iter_median_s'] * 1e3, '.0f')} "
                         f"| {m['model_forward_calls_per_step']} "
                         f"| {m['vision_calls_per_step']} | {m['vision_patches_per_step']} | {m['scored_sequence_tokens_padded']} "
                         f"| {m['precompute_s']:.2f} | {m['peak_rss_mib']:.0f} | {m['peak_minus_before_train_mib']:.0f} "
                         f"| {statistics.mean(m['loadavg_1min_at_step_start']):.1f} |")  # fmt: skip
    lines += ["", "| frames | step TRL / ours | step CPU TRL / ours | iter TRL / ours | peak RSS TRL / ours "
              "| peak - before-train TRL / ours | step TRL / ours-precompute | step ours / ours-precompute |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        x, y, z = (
            r["ratios"]["trl_over_ours"],
            r["ratios"]["trl_over_ours_precompute"],
            r["ratios"]["ours_over_ours_precompute"],
        )
        lines.append(f"| {r['frames']} | {x['step_time']:.2f}x | {x['step_cpu']:.2f}x | {x['iter_time']:.2f}x | {x['peak_rss']:.2f}x "
                     f"| {x['peak_minus_before_train']:.2f}x | {y['step_time']:.2f}x | {z['step_time']:.2f}x |")  # fmt: skip
    return "\n".join(lines)


def table_agree(res: dict[str, Any]) -> str:
    lines = ["| quantity (batch mean) | ours | TRL | abs diff |", "|---|---|---|---|"]
    for k in res["trl"]:
        lines.append(f"| {k} | {res['ours'][k]:.6f} | {res['trl'][k]:.6f} | {res['abs_diff'][k]:.1e} |")
    verdict = "agree" if res["agree"] else "DISAGREE"
    lines.append(f"\n{verdict} within atol {res['atol']:g} + rtol {res['rtol']:g} ({res['pairs']} pairs, {res['input']}; "
                 f"LM tokens / row: ours {res['row_tokens_ours']}, TRL {res['row_tokens_trl']})")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__)
    p.add_argument(
        "--quick", action="store_true", help="1 run, fewer steps, DPO frames 4 only (a smoke test)"
    )
    p.add_argument("--part", choices=("a", "b", "all"), default="all",
                   help="a: GRPO vs DPO stage; b: ours vs TRL DPO (still runs one GRPO fit for its pairs)")  # fmt: skip
    p.add_argument(
        "--frames", type=int, nargs="+", default=None, help="part B frame counts (default 4 16 32)"
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="runs per configuration, order alternating (default 2)"
    )
    p.add_argument("--warm-start", choices=("demo", "full"), default="demo",
                   help="demo: SFTModule with configs/demo_sft.yaml's LoRA/lr/steps/batch, merged into the weights; "
                        "full: full fine-tuning, --sft-steps at --sft-lr")  # fmt: skip
    p.add_argument("--sft-steps", type=int, default=100, help="warm-start steps with --warm-start full")
    p.add_argument("--sft-lr", type=float, default=3e-3, help="warm-start lr with --warm-start full")
    p.add_argument("--grpo-steps", type=int, default=None, help="GRPO steps per run (default 8; quick 4)")
    p.add_argument(
        "--grpo-prompts", type=int, default=2, help="prompts per GRPO step (configs/demo_grpo.yaml)"
    )
    p.add_argument("--grpo-frames", type=int, default=4, help="frames per video in part A (the demo's)")
    p.add_argument("--G", type=int, default=8, help="rollouts per prompt")
    p.add_argument("--max-new-tokens", type=int, default=40, help="the demo's")
    p.add_argument("--grpo-beta", type=float, default=0.0, help="GRPO KL weight (paper and demo: 0)")
    p.add_argument("--grpo-lr", type=float, default=3e-3, help="the demo's")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (paper and demo)")
    p.add_argument("--dpo-lr", type=float, default=1e-3, help="the demo's")
    p.add_argument("--dpo-batch", type=int, default=4, help="pairs per DPO step (the demo's)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2r) on the LM projections")
    p.add_argument("--warmup", type=int, default=None, help="part B untimed steps (default 2; quick 1)")
    p.add_argument("--steps", type=int, default=None, help="part B timed steps per run (default 6; quick 3)")
    p.add_argument("--size", type=int, default=112, help="frame side in pixels (multiple of 28)")
    harness.add_worker_arguments(p)
    p.add_argument("--agree-atol", type=float, default=1e-4)
    p.add_argument("--agree-rtol", type=float, default=1e-4)
    p.add_argument(
        "--workdir", type=Path, default=None, help="keep the model, clips and warm start here (reused)"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    p.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--worker-config", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        wa = _load_worker_config(a.worker_config, a.worker)
        a.worker_out.write_text(json.dumps(WORKERS[a.worker](wa)))
        return 0

    a.frames = a.frames or ([4] if a.quick else [4, 16, 32])
    a.repeats = a.repeats if a.repeats is not None else (1 if a.quick else 2)
    a.grpo_steps = a.grpo_steps if a.grpo_steps is not None else (4 if a.quick else 8)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    a.steps = a.steps if a.steps is not None else (3 if a.quick else 6)
    harness.check_frames(p, a.size, a.frames, a.trl_frames)
    load = harness.warn_if_loaded()
    started = time.time()
    report: dict[str, Any] = {
        "benchmark": "stage_speed",
        "command": harness.command(),
    }
    with tempfile.TemporaryDirectory(prefix="stage_speed_bench_") as tmp_name:
        tmp = Path(tmp_name)
        work = a.workdir or tmp
        max_frames = max([32, a.grpo_frames, *a.frames])
        base_dir, data_dir = harness.prepare(
            work, max_frames, max(32, a.grpo_steps * a.grpo_prompts), a.size, a.seed
        )
        steps = f"-{a.sft_steps}steps-lr{a.sft_lr:g}" if a.warm_start == "full" else ""
        model_dir = work / f"warm-start-{a.warm_start}{steps}-{a.size}px-{a.grpo_frames}f"
        setup: dict[str, Any] = {"warm_start": str(model_dir)}
        if not (model_dir / "config.json").exists():
            setup.update(
                _run_worker(a, "sft", tmp, "sft", model_dir=base_dir, data_dir=data_dir, save_dir=model_dir)
            )
            kind = f"LoRA {setup['lora']}" if setup["lora"] else "full fine-tuning"
            print(f"[setup] warm start ({a.warm_start}): {setup['steps']} SFT steps, {kind}, in {setup['sft_s']:.0f}s "
                  f"(last loss {setup['sft_loss_last']:.3f})", flush=True)  # fmt: skip
        if a.part in ("a", "all"):
            res_a = part_a(a, tmp, model_dir, data_dir)
            pairs = res_a.pop("_pairs_path")
            report["part_a"] = res_a
        else:
            m = _run_worker(a, "grpo", tmp, "pairs-source", model_dir=model_dir, data_dir=data_dir,
                            save_dir=tmp / "pairs-source", save_adapter=False)  # fmt: skip
            pairs = Path(m["pairs_path"])
            setup["pairs_source_verifier"] = m["verifier"]
            if not m["verifier"]["pairs"]:
                raise SystemExit(f"the GRPO fit built no preference pairs: {m['verifier']}")
        setup["pairs_file_lines"] = sum(1 for x in pairs.read_text().splitlines() if x.strip())
        report["setup"] = setup
        if a.part in ("b", "all"):
            report["agreement"] = _run_worker(a, "agree", tmp, "agree", model_dir=model_dir, pairs=pairs,
                                              num_frames=a.grpo_frames)  # fmt: skip
            print("\n" + table_agree(report["agreement"]), flush=True)
            report["part_b"] = part_b(a, tmp, model_dir, pairs)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                if k not in ("worker", "worker_config", "worker_out", "quick")}  # fmt: skip
    settings.update(loadavg_1min_at_start=load, loss_type="sigmoid", dtype="float32", gradient_checkpointing=False,
                    lora="LoRA on the LM projections (alpha = 2r), vision tower frozen", quick=a.quick)  # fmt: skip
    report.update(
        settings=settings,
        versions=harness.versions(),
        machine=harness.machine(),
        total_wall_s=time.time() - started,
    )
    if "part_a" in report:
        print("\nPart A: GRPO stage vs DPO stage (ours)\n" + table_a(report["part_a"], a))
    if "part_b" in report:
        print("\nPart B: DPO step, ours vs TRL DPOTrainer\n" + table_b(report["part_b"]))
    harness.write_json(a.out, report)
    print(f"\nwrote {a.out}  (total {report['total_wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
