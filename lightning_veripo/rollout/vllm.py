"""`vllm`: rollouts from a vLLM OpenAI-compatible server, kept in step with the trainer by weight sync.

Each prompt goes to `/v1/chat/completions` with the very frames the trainer's batch holds (lossless PNG frames
as a `video/jpeg` frame sequence, with the batch's frame indices and fps, so the server's timestamps are the
trainer's) and asks for G samples with per-token log-probs; the server's prompt token ids must equal the
trainer's, or the step fails naming the problem.

Sync, as verl, EasyR1 and TRL's async trainer do it: LoRA is adapter-only, after each optimiser step the adapter is
saved and loaded at runtime under a new name (`policy-<run>-v<N>`) that the next rollouts use; the base (with earlier
stages' adapters merged into it) is reloaded from a saved directory at the start of each fit, i.e. at each loop
stage boundary, and on resume; full fine-tuning reloads all weights after each step. After each sync the server's
multimodal and prefix caches are reset (a video request after a reload without that kills the engine). At each fit
start, once the base and the adapter are synced, and after each full reload, the server's greedy tokens on a text
prompt are checked against the trainer's policy (`check_greedy`).

The engine's record: every start (the server, started or given by URL), base reload, adapter sync and greedy check
is kept in `events` and, in a fit, appended to `vllm_engine.jsonl` in the trainer's `default_root_dir` (a loop
stage's directory), so a run shows what its rollouts were sampled from.
"""

from __future__ import annotations

import base64
import io
import json
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from lightning_veripo.completions import FORBIDDEN_GENERATION_TOKENS, Completions, completions_from_ids
from lightning_veripo.data.videoqa import build_messages
from lightning_veripo.rollout.engine import RolloutEngine, Sampled, Sampling
from lightning_veripo.rollout.vllm_server import VLLMServer, VLLMServerError, VLLMSettings

BASE_NAME = "base"  # the started server's --served-model-name


def frames_data_url(frames: np.ndarray) -> str:
    """[T, H, W, 3] uint8 frames -> one data URL of PNG frames (vLLM's comma-separated frame sequence)."""
    parts = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(frame, dtype=np.uint8)).save(buf, format="PNG")
        parts.append(base64.b64encode(buf.getvalue()).decode())
    return "data:video/jpeg;base64," + ",".join(parts)


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights of a peft-wrapped model (adapters excluded), under the unwrapped model's names."""
    out = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = tensor.detach().contiguous()
    return out


def vision_lora_modules(model: nn.Module) -> list[str]:
    """The names of the LoRA-adapted modules of the vision side (the tower and its merger): a vLLM server applies
    a runtime adapter to the language model only, unless it serves LoRA on the tower connector."""
    return [
        name
        for name, sub in model.named_modules()
        if hasattr(sub, "lora_A")
        and any(part in ("visual", "vision_tower", "merger") for part in name.split("."))
    ]


class VLLMRollouts(RolloutEngine):
    """Rollouts from a vLLM server (`VLLMSettings`): started or connected at fit start, stopped at its end."""

    name = "vllm"

    def __init__(self, settings: VLLMSettings) -> None:
        self.settings = settings
        self.server: VLLMServer | None = None
        self.version = 0
        self.run_id = uuid.uuid4().hex[:8]
        self.model_name = BASE_NAME
        self.last_sync: dict[str, float] = {}
        self.events: list[dict[str, Any]] = []
        self.record_path: Path | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    # ------------------------------------------------------------------ lifecycle
    def work_dir(self) -> Path:
        if self.settings.work_dir:
            path = Path(self.settings.work_dir)
        else:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="veripo-vllm-")
            path = Path(self._tmp.name)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def record(self, event: str, **info: Any) -> None:
        """One line of the engine's record (`events`, and `vllm_engine.jsonl` in a fit)."""
        entry = {"event": event, "time": round(time.time(), 3), **info}
        self.events.append(entry)
        if self.record_path is not None:
            self.record_path.parent.mkdir(parents=True, exist_ok=True)
            with self.record_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def _record_path(self, module: Any) -> Path | None:
        trainer = getattr(module, "_trainer", None)
        if trainer is None:
            return None
        rank = trainer.global_rank
        return Path(trainer.default_root_dir) / (
            "vllm_engine.jsonl" if rank == 0 else f"vllm_engine.rank{rank}.jsonl"
        )

    def start(self, module: Any) -> None:
        backbone = module.backbone
        adapted = vision_lora_modules(backbone.model) if backbone.lora is not None else []
        if adapted and not self.settings.tower_connector_lora:
            raise ValueError(
                f"GRPOModule(rollout_engine='vllm'): the LoRA adapter is on {len(adapted)} vision module(s) "
                f"({', '.join(adapted[:3])}{', ...' if len(adapted) > 3 else ''}), which a vLLM server serves "
                "only with LoRA on the tower connector (--enable-tower-connector-lora); set "
                "vllm.tower_connector_lora=True for a server that has it, or target the language model only "
                "(rollouts would otherwise silently ignore those layers' adapter)"
            )
        self.record_path = self._record_path(module)
        if self.server is None or not self.server.alive():
            self.server = VLLMServer(
                self.settings, backbone.model_name_or_path, self.work_dir() / "server.log",
                dtype=backbone.dtype_name,  # vLLM's CPU build serves float32 checkpoints in bfloat16 otherwise
            )  # fmt: skip
            self.server.start()
        server = self.server
        self.record("start", url=server.url, started=server.process is not None,
                    pid=server.process.pid if server.process is not None else None,
                    global_step=int(getattr(module, "global_step", 0)))  # fmt: skip
        self._check_logprobs()
        # the base as the trainer holds it: merged stages, resumed runs (checked here under full FT)
        self.reload_base(module)
        if backbone.lora is not None:
            self.sync(module)  # the adapter as the trainer holds it (a resumed fit's)
            if self.settings.check_greedy:
                self.check_greedy(module)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def _require(self) -> VLLMServer:
        if self.server is None:
            raise VLLMServerError("the vLLM rollout engine was used before start() (fit start) connected it")
        return self.server

    def _check_logprobs(self) -> None:
        reply = self._require().post("/v1/chat/completions", {
            "model": BASE_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "logprobs": True, "top_logprobs": 0, "temperature": 0.0,
        })  # fmt: skip
        content = ((reply or {}).get("choices") or [{}])[0].get("logprobs") or {}
        if not content.get("content"):
            raise VLLMServerError(
                f"the vLLM server at {self._require().url} returned no per-token log-probs for a request that "
                "asked for them; the trainer's mismatch metric and correction need them (is it vLLM's "
                "OpenAI-compatible server with --max-logprobs >= 0?)"
            )

    # ------------------------------------------------------------------ weight sync
    def _reset_caches(self) -> None:
        server = self._require()
        for path in ("/reset_mm_cache", "/reset_encoder_cache", "/reset_prefix_cache"):
            server.post(path)

    def reload_base(self, module: Any) -> float:
        """Write the trainer's base weights (adapters merged so far; all weights under full FT) and reload them."""
        t0 = time.perf_counter()
        backbone = module.backbone
        out = self.work_dir() / "base"
        weights = base_weights(backbone.hf_model) if backbone.lora is not None else None
        backbone.hf_model.save_pretrained(out, state_dict=weights)
        self._require().post(
            "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(out)}}
        )
        self._reset_caches()
        self.last_sync = {"reload_s": time.perf_counter() - t0}
        self.record("base_reload", path=str(out), weights="base" if backbone.lora is not None else "full",
                    seconds=round(self.last_sync["reload_s"], 4))  # fmt: skip
        if self.settings.check_greedy and backbone.lora is None:
            self.check_greedy(module)
        return self.last_sync["reload_s"]

    def sync(self, module: Any) -> float:
        """After an optimiser step: the new adapter under a new name (LoRA), or a full reload (full FT)."""
        backbone = module.backbone
        if backbone.lora is None:
            return self.reload_base(module) if self.version or self.server is not None else 0.0
        t0 = time.perf_counter()
        self.version += 1
        name = f"policy-{self.run_id}-v{self.version}"  # new per engine: a reconnecting fit never clashes
        out = self.work_dir() / name
        backbone.model.save_pretrained(out)
        server = self._require()
        server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(out)})
        previous, self.model_name = self.model_name, name
        if previous != BASE_NAME:
            server.post("/v1/unload_lora_adapter", {"lora_name": previous})
        self._reset_caches()
        self.last_sync = {"adapter_s": time.perf_counter() - t0}
        self.record("adapter_sync", name=name, path=str(out), seconds=round(self.last_sync["adapter_s"], 4))
        return self.last_sync["adapter_s"]

    def check_greedy(
        self, module: Any, prompt: str = "the answer is", max_new_tokens: int = 8, tie_tol: float = 1e-3
    ) -> dict[str, Any]:
        """The server's greedy tokens on a text prompt must be the trainer's policy's greedy tokens: fed back
        through the trainer, each must have the top log-prob (within `tie_tol`, as random tiny models have near
        ties that float rounding may break either way). Returns (and records) the served tokens, the server's
        log-probs of them and their largest distance from the trainer's (`logprob_gap`)."""
        backbone = module.backbone
        ids = backbone.tokenizer(prompt, return_tensors="pt")["input_ids"]
        reply = self._require().post("/v1/completions", {
            "model": self.model_name, "prompt": ids[0].tolist(), "max_tokens": max_new_tokens,
            "temperature": 0.0, "return_token_ids": True, "ignore_eos": True, "logprobs": 0,
        })  # fmt: skip
        choice = reply["choices"][0]
        served = list(choice["token_ids"])
        served_logps = [float(x) for x in ((choice.get("logprobs") or {}).get("token_logprobs") or [])]
        model = backbone.model
        full = torch.cat([ids, torch.tensor([served], dtype=torch.long)], 1).to(
            next(model.parameters()).device
        )
        training = model.training
        model.eval()  # the policy itself, no dropout
        try:
            with torch.no_grad():
                logits = model(input_ids=full).logits[0, ids.shape[1] - 1 : -1].float()
        finally:
            model.train(training)
        logps = torch.log_softmax(logits, -1)
        chosen = logps.gather(-1, full[0, ids.shape[1] :, None])[:, 0]
        gaps = (logps.max(-1).values - chosen).tolist()
        bad = [(i, served[i], int(logps[i].argmax()), gap) for i, gap in enumerate(gaps) if gap > tie_tol]
        logprob_gap = (
            max(abs(a - b) for a, b in zip(served_logps, chosen.tolist(), strict=True))
            if len(served_logps) == len(served) and served
            else None
        )
        result = {"model": self.model_name, "tokens": served, "server_logprobs": served_logps,
                  "logprob_gap": logprob_gap, "passed": not bad}  # fmt: skip
        self.record("greedy_check", **result)
        if bad:
            i, got, want, gap = bad[0]
            raise VLLMServerError(
                f"weight sync check failed: the vLLM server's greedy tokens {served} differ from the trainer's "
                f"policy on the text prompt {prompt!r} (model {self.model_name!r}): at position {i} it chose "
                f"{got}, the trainer {want}, {gap:.3g} below in log-prob; the server is not serving the trained "
                "policy"
            )
        return result

    # ------------------------------------------------------------------ sampling
    def request(
        self, batch: dict[str, Any], p: int, sampling: Sampling, forbidden: list[int]
    ) -> dict[str, Any]:
        """The chat request of prompt `p`: its record's messages with the batch's own frames."""
        record = batch["records"][p]
        content: list[dict[str, Any]] = []
        body: dict[str, Any] = {}
        video = (batch.get("videos") or [None] * (p + 1))[p]
        for part in build_messages(record)[0]["content"]:
            if part["type"] == "text":
                content.append({"type": "text", "text": part["text"]})
            elif part["type"] == "video":
                if video is None:
                    raise ValueError(
                        "the vLLM engine sends the batch's own frames: this batch has no 'videos' "
                        "(VideoQACollator keeps them)"
                    )
                meta = video["metadata"]
                content.append({"type": "video_url", "video_url": {"url": frames_data_url(video["frames"])}})
                body["media_io_kwargs"] = {"video": {
                    "num_frames": -1, "fps": float(meta["fps"]), "frames_indices": [int(i) for i in meta["frames_indices"]],
                    "total_num_frames": int(meta["total_num_frames"]),
                }}  # fmt: skip
                body["mm_processor_kwargs"] = {"size": video["size"], "do_sample_frames": False}
            else:
                raise ValueError(
                    f"the vLLM engine sends videos and text; problem {record.problem_id} has an image"
                )
        body.update({
            "model": self.model_name, "messages": [{"role": "user", "content": content}],
            "n": sampling.num_generations, "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k or -1,
            "logprobs": True, "top_logprobs": 0, "return_token_ids": True, "skip_special_tokens": False,
            "logit_bias": {str(i): -100 for i in forbidden},
        })  # fmt: skip
        return body

    def sample(
        self, module: Any, batch: dict[str, Any], vision: dict[str, Any] | None, sampling: Sampling
    ) -> Sampled:
        backbone = module.backbone
        server = self._require()
        forbidden = backbone.token_ids(FORBIDDEN_GENERATION_TOKENS)
        rows: list[list[int]] = []
        logps: list[list[float]] = []
        n_prompts = batch["input_ids"].shape[0]
        bodies = [self.request(batch, p, sampling, forbidden) for p in range(n_prompts)]
        # a sampling seed per request, drawn from the trainer's torch RNG (seed_everything; checkpointed with the
        # random states): the same seeds and weights give the same rollouts (unseeded, every run sampled others)
        for body, seed in zip(bodies, torch.randint(0, 2**31 - 1, (n_prompts,)).tolist(), strict=True):
            body["seed"] = int(seed)
        with ThreadPoolExecutor(max_workers=max(1, n_prompts)) as pool:  # concurrent: the server batches them
            replies = list(pool.map(lambda body: server.post("/v1/chat/completions", body), bodies))
        for p, reply in enumerate(replies):
            prompt = batch["input_ids"][p][batch["attention_mask"][p].bool()].tolist()
            if reply.get("prompt_token_ids") is not None and reply["prompt_token_ids"] != prompt:
                raise VLLMServerError(
                    f"the vLLM server's prompt for problem {batch['records'][p].problem_id} has "
                    f"{len(reply['prompt_token_ids'])} tokens, the trainer's {len(prompt)} (or they differ): "
                    "the frames, the chat template or the vision placeholders disagree"
                )
            choices = sorted(reply["choices"], key=lambda c: c["index"])
            if len(choices) != sampling.num_generations:
                raise VLLMServerError(
                    f"the vLLM server returned {len(choices)} samples, not {sampling.num_generations}"
                )
            for choice in choices:
                content = (choice.get("logprobs") or {}).get("content")
                if not content:
                    raise VLLMServerError(
                        f"the vLLM server at {server.url} returned a sample without log-probs"
                    )
                rows.append(list(choice["token_ids"]))
                logps.append([float(t["logprob"]) for t in content])
        return self._completions(backbone, rows, logps, sampling.max_new_tokens)

    @staticmethod
    def _completions(
        backbone: Any, rows: list[list[int]], logps: list[list[float]], max_new_tokens: int
    ) -> Sampled:
        width = max(1, max(len(r) for r in rows))
        pad = backbone.pad_token_id
        device = next(backbone.model.parameters()).device
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        lp = torch.zeros((len(rows), width), dtype=torch.float32)
        for i, (r, values) in enumerate(zip(rows, logps, strict=True)):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            lp[i, : len(values)] = torch.tensor(values[: len(r)], dtype=torch.float32)
        completions: Completions = completions_from_ids(backbone.tokenizer, ids, max_new_tokens)
        completions = completions._replace(ids=completions.ids.to(device), mask=completions.mask.to(device),
                                           truncated=completions.truncated.to(device))  # fmt: skip
        return Sampled(completions, (lp * completions.mask.cpu()).to(device))
