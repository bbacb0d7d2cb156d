"""The vLLM rollout engine against a real vLLM CPU server on 127.0.0.1 serving the `small` tiny Qwen2.5-VL (vLLM's
CPU attention refuses the default tiny model's head_dim 16): GRPO steps through it, adapter sync, a stage boundary's
base reload, the rollout-vs-trainer mismatch, a fit killed and resumed (reconnecting by URL), full fine-tuning's
full-weight reload, and faults. The loop through vLLM and a SIGKILLed fit's own server: tests/test_vllm_loop.py.

The server runs in its own environment (`.ci/vllm-env` builds it); VERIPO_VLLM_PYTHON names its python. Without it
these tests skip with that reason; CI sets it with VERIPO_REQUIRE_VLLM=1, under which a missing one fails.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from helpers import RecordSteps, perturb_lora
from kill_run import KillAt
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_veripo.backbone import VideoLLM
from lightning_veripo.data.videoqa import FrameSampling, VideoQACollator, VideoQADataModule, VideoQADataset
from lightning_veripo.grpo import GRPOModule
from lightning_veripo.lora import LoRAConfig
from lightning_veripo.rewards import RewardSet
from lightning_veripo.rollout import Sampling, VLLMRollouts, VLLMServer, VLLMServerError, VLLMSettings
from lightning_veripo.tiny import make_tiny_model

PYTHON = os.environ.get("VERIPO_VLLM_PYTHON")
if not PYTHON and os.environ.get("VERIPO_REQUIRE_VLLM") == "1":  # CI: a skip here would hide the engine
    raise RuntimeError("VERIPO_REQUIRE_VLLM=1 but VERIPO_VLLM_PYTHON is not set: the vLLM tests would skip")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not PYTHON, reason="VERIPO_VLLM_PYTHON is not set: no vLLM environment (.ci/vllm-env builds one)"
    ),
]
G = 4
MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("small_model"), seed=0, size="small")


@pytest.fixture(scope="module")
def server(small_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One vLLM server for the module (start-up is the slow part); each test's engine connects by URL."""
    settings = VLLMSettings(python=PYTHON, max_lora_rank=8, startup_timeout_s=900)
    srv = VLLMServer(
        settings, str(small_model_dir), tmp_path_factory.mktemp("vllm") / "server.log", "float32"
    )
    srv.start()
    yield srv
    srv.stop()


def _engine(server: VLLMServer, tmp_path: Path, **options: Any) -> VLLMRollouts:
    return VLLMRollouts(VLLMSettings(url=server.url, work_dir=str(tmp_path / "sync"), **options))


def _backbone(model_dir: Path) -> VideoLLM:
    return VideoLLM(str(model_dir), lora=LoRAConfig(r=4, alpha=8)).load()


def _batch(backbone: VideoLLM, synthetic_dir: Path, sampling: FrameSampling) -> dict[str, Any]:
    dataset = VideoQADataset(synthetic_dir / "train.json", sampling=sampling)
    return VideoQACollator(backbone.processor, sampling)([dataset[0], dataset[1]])


def test_grpo_steps_through_vllm(small_model_dir, server, synthetic_dir, frame_sampling, tmp_path):
    backbone = _backbone(small_model_dir)
    module = GRPOModule(
        backbone, rewards=RewardSet(["accuracy", "format"]), num_generations=G, max_new_tokens=MAX_NEW_TOKENS,
        lr=1e-2, log_rollouts_every_n_steps=0, rollout_engine="vllm", rollout_correction="token",
        dynamic_sampling=False,  # random weights often score a whole group alike: keep every group in the loss
        vllm=VLLMSettings(url=server.url, work_dir=str(tmp_path / "sync")),
    )  # fmt: skip
    datamodule = VideoQADataModule(
        train_path=str(synthetic_dir / "train.json"), val_path=str(synthetic_dir / "val.json"),
        sampling=frame_sampling, batch_size=2, shuffle=False,
    )  # fmt: skip
    record = RecordSteps()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        default_root_dir=str(tmp_path),  # the engine's record goes there
        enable_model_summary=False, limit_val_batches=0, callbacks=[record],
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2
    for out, metrics in zip(record.outputs, record.metrics, strict=True):
        rollouts = out["rollouts"]
        assert len(rollouts) == 2 * G and [r.sample_index for r in rollouts] == list(range(G)) * 2
        for r in rollouts:
            assert 1 <= len(r.completion_ids) <= MAX_NEW_TOKENS and set(r.rewards) == {"accuracy", "format"}
        advantages = torch.tensor([r.advantage for r in rollouts]).view(2, G)
        assert advantages.sum(1).abs().max() < 1e-4  # group-relative
        assert torch.isfinite(out["loss"])
        # video log-probs: vLLM's vision tower differs slightly from HF's (field notes: up to 6.3e-3)
        assert 0.0 <= metrics["train/rollout_logp_diff_mean"] < 2e-2
        assert metrics["train/rollout_logp_diff_max"] < 5e-2
        assert metrics["train/rollout_logp_diff_corr"] > 0.99
        assert metrics["train/time_sync_s"] > 0.0
    assert module.engine.model_name.endswith("-v3")  # v1 at fit start, one per optimiser step


def test_adapter_sync_makes_the_server_serve_the_trained_policy(small_model_dir, server, tmp_path):
    backbone = _backbone(small_model_dir)
    module = SimpleNamespace(backbone=backbone)
    engine = _engine(server, tmp_path)
    engine.start(module)
    engine.check_greedy(module)  # B = 0: the adapter is the base
    perturb_lora(backbone, seed=0, std=0.3)
    with pytest.raises(VLLMServerError, match="greedy tokens .* differ from the trainer's"):
        engine.check_greedy(module)  # the server still serves the old adapter
    engine.sync(module)
    engine.check_greedy(module)
    assert engine.model_name.endswith("-v2")


def test_stage_boundary_reloads_the_merged_base(small_model_dir, server, tmp_path):
    backbone = _backbone(small_model_dir)
    module = SimpleNamespace(backbone=backbone)
    engine = _engine(server, tmp_path)
    engine.start(module)
    perturb_lora(backbone, seed=1, std=0.3)
    backbone.merge_and_reset()  # what the loop does between stages: the adapter is folded into the base
    engine.sync(module)  # a fresh adapter (B = 0) on the *old* base: not the policy
    with pytest.raises(VLLMServerError, match="differ from the trainer's"):
        engine.check_greedy(module)
    engine.start(module)  # the next stage's fit start: the merged base is reloaded
    engine.check_greedy(module)


def test_video_rollouts_with_the_batch_frames_and_their_mismatch(
    small_model_dir, server, synthetic_dir, frame_sampling, tmp_path
):
    backbone = _backbone(small_model_dir)
    module = SimpleNamespace(backbone=backbone)
    engine = _engine(server, tmp_path)
    engine.start(module)
    batch = _batch(backbone, synthetic_dir, frame_sampling)
    sampled = engine.sample(module, batch, None, Sampling(G, MAX_NEW_TOKENS, 1.0, 1.0, 0))
    c = sampled.completions
    assert c.ids.shape[0] == 2 * G and sampled.logprobs.shape == c.ids.shape
    with torch.no_grad():
        trainer_logps = backbone.sequence_logprobs(batch, c.ids, c.mask, num_samples=G)
    m = c.mask.bool()
    diff = (trainer_logps - sampled.logprobs)[m].abs()
    assert float(diff.max()) < 5e-2 and float(diff.mean()) < 2e-2
    torch.manual_seed(0)
    again = engine.sample(module, batch, None, Sampling(G, MAX_NEW_TOKENS, 1.0, 1.0, 0)).completions
    torch.manual_seed(0)
    same = engine.sample(module, batch, None, Sampling(G, MAX_NEW_TOKENS, 1.0, 1.0, 0)).completions
    assert torch.equal(again.ids, same.ids)  # each request's seed comes from the trainer's torch RNG
    assert len({tuple(row.tolist()) for row in same.ids[:G]}) > 1  # a seeded request's G samples still differ
    torch.manual_seed(1)
    other = engine.sample(module, batch, None, Sampling(G, MAX_NEW_TOKENS, 1.0, 1.0, 0)).completions
    assert not torch.equal(other.ids, same.ids)
    del batch["videos"]
    with pytest.raises(ValueError, match="has no 'videos'"):
        engine.sample(module, batch, None, Sampling(G, MAX_NEW_TOKENS, 1.0, 1.0, 0))


def _varying_grpo(backbone: VideoLLM, tmp_path: Path, url: str, lr: float = 1e-2) -> GRPOModule:
    """GRPO through the server with a reward that differs between random completions: every step updates."""
    return GRPOModule(
        backbone, rewards=RewardSet(["rewards_for_tests.completion_chars"]), num_generations=G,
        max_new_tokens=MAX_NEW_TOKENS, lr=lr, log_rollouts_every_n_steps=0, rollout_engine="vllm",
        dynamic_sampling=False, vllm=VLLMSettings(url=url, work_dir=str(tmp_path / "sync")),
    )  # fmt: skip


def _fit(module, synthetic_dir, frame_sampling, root: Path, max_steps: int, callbacks=(), ckpt_path=None):
    datamodule = VideoQADataModule(
        train_path=str(synthetic_dir / "train.json"), val_path=str(synthetic_dir / "val.json"),
        sampling=frame_sampling, batch_size=2, shuffle=False,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, default_root_dir=str(root), enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[*callbacks, ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_train_steps=1)],
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    return trainer


def _text_logprobs(model: torch.nn.Module, backbone: VideoLLM, tokens: list[int]) -> torch.Tensor:
    """`model`'s log-probs of `tokens` after the engine's check prompt (teacher-forced)."""
    ids = backbone.tokenizer("the answer is", return_tensors="pt")["input_ids"]
    full = torch.cat([ids, torch.tensor([tokens])], 1)
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=full).logits[0, ids.shape[1] - 1 : -1].float(), -1)
    return logps.gather(-1, full[0, ids.shape[1] :, None])[:, 0]


def _events(engine: VLLMRollouts, kind: str) -> list[dict[str, Any]]:
    return [e for e in engine.events if e["event"] == kind]


def test_a_fit_killed_at_a_step_resumes_reconnecting_to_the_given_url_and_resyncing_its_adapter(
    small_model_dir, server, synthetic_dir, frame_sampling, tmp_path
):
    """SIGTERM at step 2 (Lightning writes step 2's checkpoint, then stops: the engine's on_exception leaves the
    given server running); a new process' worth of objects resumes from last.ckpt: the engine reconnects to the
    URL, reloads the base, syncs the resumed adapter before the first rollout and checks the server's greedy
    tokens and their log-probs against the resumed policy; the fit ends at max_steps."""
    root = tmp_path / "fit"
    killed = _varying_grpo(_backbone(small_model_dir), tmp_path, server.url)
    with pytest.raises(SIGTERMException):
        _fit(killed, synthetic_dir, frame_sampling, root, 4, [KillAt(signal.SIGTERM, 2)])
    assert killed.engine.server is None  # stopped (a given server is only let go of)
    last = root / "checkpoints" / "last.ckpt"
    shutil.copy(last, tmp_path / "step2.ckpt")  # last.ckpt moves on in the resumed fit
    resumed = _varying_grpo(_backbone(small_model_dir), tmp_path, server.url)
    record = RecordSteps()
    trainer = _fit(resumed, synthetic_dir, frame_sampling, root, 4, [record], ckpt_path=str(last))
    assert trainer.global_step == 4 and len(record.outputs) == 2  # steps 3 and 4 only
    events = resumed.engine.events
    start = events[0]
    assert start["event"] == "start" and start["url"] == server.url and not start["started"]
    assert start["global_step"] == 2  # the engine starts once the checkpoint (weights, step) is restored
    kinds = [e["event"] for e in events]
    assert kinds[:5] == [
        "start",
        "base_reload",
        "adapter_sync",
        "greedy_check",
        "adapter_sync",
    ]  # before step 3
    assert len(_events(resumed.engine, "adapter_sync")) == 1 + 2
    check = _events(resumed.engine, "greedy_check")[0]
    assert check["passed"] and check["logprob_gap"] < 1e-4, check
    # teeth: the server served the step-2 adapter, not the fresh one (= the base) nor the killed run's start
    step2 = VideoLLM(str(small_model_dir), lora=LoRAConfig(r=4, alpha=8)).load()
    state = torch.load(tmp_path / "step2.ckpt", weights_only=True)["state_dict"]
    assert any("lora_B" in k for k in state)
    loaded = step2.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items()}, strict=False)
    assert not loaded.unexpected_keys
    served = torch.tensor(check["server_logprobs"])
    trained = _text_logprobs(step2.model, step2, check["tokens"])
    with step2.model.disable_adapter():
        untrained = _text_logprobs(step2.model, step2, check["tokens"])
    assert (served - trained).abs().max() < 1e-4
    assert (served - untrained).abs().max() > 1e-3, "two GRPO steps must have moved the adapter"
    assert all(m["train/time_sync_s"] > 0 for m in record.metrics)


def test_full_fine_tuning_reloads_the_full_weights_after_each_step(
    small_model_dir, server, synthetic_dir, frame_sampling, tmp_path
):
    """lora=None: after every optimiser step all the weights are saved and reloaded by the server (no adapter),
    whose greedy tokens and their log-probs then equal the trainer's; the mismatch is logged every step."""
    backbone = VideoLLM(str(small_model_dir), lora=None).load()
    module = _varying_grpo(backbone, tmp_path, server.url, lr=1e-3)
    record = RecordSteps()
    trainer = _fit(module, synthetic_dir, frame_sampling, tmp_path / "fit", 2, [record])
    assert trainer.global_step == 2
    engine = module.engine
    reloads, checks = _events(engine, "base_reload"), _events(engine, "greedy_check")
    assert [r["weights"] for r in reloads] == ["full"] * 3  # fit start, then after each of the 2 steps
    assert not _events(engine, "adapter_sync") and engine.model_name == "base"
    assert len(checks) == 3 and all(c["passed"] and c["logprob_gap"] < 1e-4 for c in checks), checks
    saved = json.loads((Path(reloads[-1]["path"]) / "config.json").read_text())
    assert saved["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    # teeth: after the steps the server serves the trained weights, not the checkpoint it was started on
    start = VideoLLM(str(small_model_dir), lora=None).load()
    last = checks[-1]
    served = torch.tensor(last["server_logprobs"])
    assert (served - _text_logprobs(backbone.model, backbone, last["tokens"])).abs().max() < 1e-4
    assert (served - _text_logprobs(start.model, start, last["tokens"])).abs().max() > 1e-3
    for metrics in record.metrics:
        assert 0.0 <= metrics["train/rollout_logp_diff_mean"] < 2e-2
        assert metrics["train/rollout_logp_diff_corr"] > 0.99 and metrics["train/time_sync_s"] > 0.0
    records = [json.loads(line) for line in (tmp_path / "fit" / "vllm_engine.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records] == [e["event"] for e in engine.events]


class _NoLogprobs(http.server.BaseHTTPRequestHandler):
    """An OpenAI-style server that answers without log-probs (as some proxies do)."""

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.end_headers()

    def do_POST(self) -> None:  # noqa: N802
        body = json.dumps({"choices": [{"index": 0, "message": {"content": "x"}, "logprobs": None}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_server_without_logprobs_is_refused_at_start(small_model_dir, tmp_path):
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _NoLogprobs)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        engine = VLLMRollouts(VLLMSettings(url=f"http://127.0.0.1:{httpd.server_port}"))
        with pytest.raises(VLLMServerError, match="returned no per-token log-probs"):
            engine.start(SimpleNamespace(backbone=_backbone(small_model_dir)))
    finally:
        httpd.shutdown()


def test_a_server_that_dies_or_does_not_answer_is_named(server, tmp_path):
    """Runs last: it kills the module's server."""
    silent = VLLMServer(
        VLLMSettings(url="http://127.0.0.1:9", retries=1, request_timeout_s=2), "x", tmp_path / "l"
    )
    with pytest.raises(
        VLLMServerError, match=r"http://127.0.0.1:9 did not answer POST /v1/chat/completions after 2"
    ):
        silent.post("/v1/chat/completions", {})
    assert server.process is not None
    server.process.kill()
    server.process.wait()
    with pytest.raises(
        VLLMServerError, match=r"has died \(exit status -9\) before POST /v1/chat/completions"
    ):
        server.post("/v1/chat/completions", {})
