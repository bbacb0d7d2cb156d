"""GRPO -> verifier -> DPO with the FSDP2 overlay (`configs/strategies/fsdp2.yaml`: Lightning's
ModelParallelStrategy, `fully_shard` applied in `configure_model`) on 2 CPU processes over gloo, through the real
`veripo fit` command, checked as tests/test_distributed.py checks DDP, plus what sharding adds: the distributed
checkpoint (trainable weights only, the policy identity), a kill and resume, the adapter exported from full
tensors, and a two-node launch simulated on this machine.

GRPO's sampling differs between ranks and one process (each rank draws from its own generator), so the sampled
fit is checked on its bookkeeping (each global batch rolled out G times, once; global advantages; the verifier's
files written once), and its first step against one process by replaying the rollouts that fit generated
(`fsdp2_for_tests.ReplayGRPOModule`: the recorded token ids instead of sampling; rewards, advantages, log-probs,
KL and loss computed by the real step): the FSDP2 fit (2 prompts per rank) must apply the gradient, after FSDP2's
reduce-scatter, and the loss of one process on the 4 prompts. DPO has no sampling: the FSDP2 fit (1 pair per
rank) must match one process fitting 2 pairs per step the same way.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_distributed import PROMPTS_PER_RANK, QUIET, G
from torch.distributed.checkpoint import FileSystemReader

from lightning_veripo import losses
from lightning_veripo.backbone import VideoLLM
from lightning_veripo.lora import LoRAConfig
from lightning_veripo.policy import POLICY_KEY, policy_identity
from lightning_veripo.sharding import FSDP2Strategy, uses_fsdp2
from lightning_veripo.verifier.run import read_rollouts, run_verifier_from_files

REPO = Path(__file__).resolve().parents[1]
STEPS = 2
FSDP2 = ["--config", str(REPO / "configs/strategies/fsdp2.yaml"), "--trainer.accelerator=cpu"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}


def _run(command: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV)


def _fit(*args: str, cwd: Path) -> None:
    done = _run([sys.executable, "-m", "lightning_veripo.cli", "fit", *args], cwd)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-6000:]}"


def _backbone_args(tiny_model_dir: Path, adapter: Path) -> list[str]:
    b = "--model.init_args.backbone.init_args."
    return [f"{b}model_name_or_path={tiny_model_dir}", f"{b}merge_adapters=[{adapter}]",
            f"{b}make_tiny_if_missing=false", f"{b}lora.dropout=0.0"]  # fmt: skip


def _grpo_args(tiny_model_dir: Path, synthetic_dir: Path, adapter: Path, cwd: Path, steps: int) -> list[str]:
    """A GRPO fit of `steps` steps, 2 prompts per rank, G = 4, checkpoint at every step, the verifier attached,
    the adapter and the policy's outputs exported at the end."""
    return [
        "--config", str(REPO / "configs/demo_grpo.yaml"), *QUIET, *_backbone_args(tiny_model_dir, adapter),
        f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={cwd}",
        f"--model.init_args.num_generations={G}", "--model.init_args.max_new_tokens=24",
        "--model.init_args.advantage_scale=batch", "--model.init_args.log_rollouts_every_n_steps=0",
        f"--data.init_args.train_path={synthetic_dir / 'train.json'}", "--data.init_args.val_path=null",
        "--data.init_args.synthetic=null", "--data.init_args.shuffle=false",
        f"--data.init_args.batch_size={PROMPTS_PER_RANK}",
        "--trainer.callbacks+=lightning_veripo.callbacks.VerifierCallback",
        f"--trainer.callbacks.init_args.out_dir={cwd / 'verifier'}", "--trainer.callbacks.init_args.progress=false",
        "--trainer.callbacks+=fsdp2_for_tests.ExportAdapterAndOutputs", f"--trainer.callbacks.init_args.out={cwd}",
        "--trainer.enable_checkpointing=true", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.init_args.dirpath={cwd / 'ckpt'}", "--trainer.callbacks.init_args.save_last=true",
        "--trainer.callbacks.init_args.every_n_train_steps=1", "--trainer.callbacks.init_args.save_top_k=-1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fsdp2_grpo(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, synthetic_dir: Path,
               warm_adapter: Path) -> Path:  # fmt: skip
    """The directory of a 2-process FSDP2 GRPO fit of STEPS steps (verifier/, ckpt/, adapter/, outputs)."""
    cwd = tmp_path_factory.mktemp("fsdp2_grpo")
    _fit(*_grpo_args(tiny_model_dir, synthetic_dir, warm_adapter, cwd, STEPS), *FSDP2, "--trainer.devices=2",
         cwd=cwd)  # fmt: skip
    return cwd


@pytest.mark.slow
def test_fsdp2_grpo_rolls_out_each_global_batch_once_with_global_advantages(
    fsdp2_grpo: Path, synthetic_dir: Path
) -> None:
    rollouts = read_rollouts(fsdp2_grpo / "verifier" / "rollouts.jsonl")
    ids = [str(r["problem_id"]) for r in json.loads((synthetic_dir / "train.json").read_text())]
    world = 2 * PROMPTS_PER_RANK
    assert len(rollouts) == STEPS * world * G
    assert len({(r.step, r.record.problem_id, r.sample_index) for r in rollouts}) == len(rollouts)
    for step in range(STEPS):
        these = sorted(
            (r for r in rollouts if r.step == step), key=lambda r: (r.record.problem_id, r.sample_index)
        )
        assert sorted({r.record.problem_id for r in these}) == sorted(ids[step * world : (step + 1) * world])
        assert [r.sample_index for r in these] == list(range(G)) * world
        rewards = torch.tensor([r.reward for r in these], dtype=torch.float32)
        expected = losses.group_advantages(rewards, G, scale="batch")
        recorded = torch.tensor([r.advantage for r in these], dtype=torch.float32)
        torch.testing.assert_close(recorded, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fsdp2_verifier_judges_every_rank_rollout_and_writes_once(fsdp2_grpo: Path, tmp_path: Path) -> None:
    out = fsdp2_grpo / "verifier"
    rollouts = (out / "rollouts.jsonl").read_text().splitlines()
    assert (
        len((out / "verdicts.jsonl").read_text().splitlines())
        == len(rollouts)
        == STEPS * 2 * PROMPTS_PER_RANK * G
    )
    run_verifier_from_files(out / "rollouts.jsonl", tmp_path, progress=False)
    for name in ("rollouts.jsonl", "pairs.jsonl"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
    assert len((out / "pairs.jsonl").read_text().splitlines()) >= 4, "the DPO test needs pairs"


@pytest.mark.slow
def test_fsdp2_checkpoint_is_distributed_holds_trainable_weights_only_and_its_policy(
    fsdp2_grpo: Path,
    tiny_model_dir: Path,
    warm_adapter: Path,
) -> None:
    last = fsdp2_grpo / "ckpt" / "last.ckpt"
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    keys = [
        k
        for k in FileSystemReader(str(last)).read_metadata().state_dict_metadata
        if k.startswith("state_dict.")
    ]
    assert keys and all("lora_" in k for k in keys), [k for k in keys if "lora_" not in k][:3]
    built = VideoLLM(str(tiny_model_dir), lora=LoRAConfig(r=8, alpha=16), merge_adapters=[str(warm_adapter)])
    trainable = {f"state_dict.backbone.{n}" for n, p in built.load().named_parameters() if p.requires_grad}
    assert set(keys) == trainable
    meta = torch.load(last / "meta.pt", map_location="cpu", weights_only=False)
    assert meta[POLICY_KEY] == policy_identity(str(tiny_model_dir), [str(warm_adapter)])


@pytest.mark.slow
def test_fsdp2_adapter_exported_once_loads_into_one_process_with_the_sharded_outputs(
    fsdp2_grpo: Path,
    tiny_model_dir: Path,
    warm_adapter: Path,
) -> None:
    adapter = fsdp2_grpo / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    lora = LoRAConfig(r=8, alpha=16, dropout=0.0)
    one = VideoLLM(
        str(tiny_model_dir), lora=lora, merge_adapters=[str(warm_adapter)], adapter_path=str(adapter)
    )
    one.load().eval()
    fresh = VideoLLM(str(tiny_model_dir), lora=lora, merge_adapters=[str(warm_adapter)]).load().eval()
    for rank in (0, 1):
        saved = torch.load(fsdp2_grpo / f"outputs_rank{rank}.pt", map_location="cpu", weights_only=True)
        with torch.no_grad():
            logps = one.sequence_logprobs(saved["batch"], saved["ids"], saved["mask"], num_samples=G)
            untrained = fresh.sequence_logprobs(saved["batch"], saved["ids"], saved["mask"], num_samples=G)
        torch.testing.assert_close(logps, saved["logps"], rtol=1e-4, atol=1e-5)
        assert (untrained - saved["logps"]).abs().max() > 1e-4, (
            "the fit moved the adapter: the check can fail"
        )


@pytest.mark.slow
def test_fsdp2_fit_killed_at_a_step_resumes_to_the_uninterrupted_result(
    fsdp2_grpo: Path,
    tmp_path: Path,
    tiny_model_dir: Path,
    synthetic_dir: Path,
    warm_adapter: Path,
) -> None:
    """SIGKILL on both ranks at step 2 (before its checkpoint); the same command resumed from step 1's
    distributed checkpoint gives the uninterrupted fit's rollouts and adapter."""
    args = [
        *_grpo_args(tiny_model_dir, synthetic_dir, warm_adapter, tmp_path, STEPS),
        *FSDP2,
        "--trainer.devices=2",
    ]
    killed = _run([sys.executable, "-m", "lightning_veripo.cli", "fit", *args,
                   "--trainer.callbacks+=kill_run.KillAt", f"--trainer.callbacks.init_args.signum={int(signal.SIGKILL)}",
                   "--trainer.callbacks.init_args.step=2"], tmp_path)  # fmt: skip
    assert killed.returncode != 0
    assert (tmp_path / "ckpt" / "epoch=0-step=1.ckpt").is_dir()
    assert not (tmp_path / "ckpt" / "epoch=0-step=2.ckpt").exists()
    _fit(*args, f"--ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}", cwd=tmp_path)
    resumed = (tmp_path / "verifier" / "rollouts.jsonl").read_text()
    assert resumed == (fsdp2_grpo / "verifier" / "rollouts.jsonl").read_text()
    from safetensors.torch import load_file

    a = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    b = load_file(fsdp2_grpo / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def _dpo(
    cwd: Path, pairs: Path, tiny_model_dir: Path, adapter: Path, sharded: bool, extra: list[str]
) -> tuple[dict, torch.Tensor]:
    """The trainable weights' gradients (as full tensors) and the global-batch loss of the first DPO step."""
    _fit(
        "--config", str(REPO / "configs/demo_dpo.yaml"), *QUIET, *_backbone_args(tiny_model_dir, adapter),
        *([*FSDP2, "--trainer.devices=2"] if sharded else ["--trainer.devices=1"]),
        "--trainer.max_steps=1", "--trainer.max_epochs=-1", f"--trainer.default_root_dir={cwd}",
        "--trainer.enable_checkpointing=false", f"--data.init_args.pairs_path={pairs}",
        "--data.init_args.shuffle=false", f"--data.init_args.batch_size={1 if sharded else 2}",
        "--trainer.callbacks+=gradients_for_tests.SaveGradients", f"--trainer.callbacks.init_args.path={cwd / 'g.pt'}",
        "--trainer.callbacks+=fsdp2_for_tests.SaveGlobalLoss", f"--trainer.callbacks.init_args.path={cwd / 'l.pt'}",
        *extra, cwd=cwd,
    )  # fmt: skip
    return torch.load(cwd / "g.pt", weights_only=True), torch.load(cwd / "l.pt", weights_only=True)


# full fine-tuning with the frozen reference copy (a config overlay: jsonargparse cannot null `lora` from the
# command line once a config has set it)
FULL_FT = "model:\n  init_args:\n    backbone:\n      init_args:\n        lora: null\n        reference_copy: true\n"


@pytest.mark.slow
@pytest.mark.parametrize("tuning", ["lora", "full"])
def test_fsdp2_dpo_on_the_verifier_pairs_equals_one_process_on_the_global_batch(
    fsdp2_grpo: Path, tiny_model_dir: Path, warm_adapter: Path, tmp_path: Path, tuning: str
) -> None:
    """LoRA (reference: the adapter disabled) and full fine-tuning (reference: a frozen copy, sharded too)."""
    pairs = fsdp2_grpo / "verifier" / "pairs.jsonl"
    (tmp_path / "full.yaml").write_text(FULL_FT)
    extra = ["--config", str(tmp_path / "full.yaml")] if tuning == "full" else []
    (tmp_path / "fsdp2").mkdir()
    (tmp_path / "one").mkdir()
    two, loss_two = _dpo(tmp_path / "fsdp2", pairs, tiny_model_dir, warm_adapter, True, extra)
    one, loss_one = _dpo(tmp_path / "one", pairs, tiny_model_dir, warm_adapter, False, extra)
    trained = "lora_B" if tuning == "lora" else "layers.0.mlp.down_proj.weight"
    assert two.keys() == one.keys() and any(trained in k for k in one)
    torch.testing.assert_close(loss_two, loss_one, rtol=1e-5, atol=1e-6)
    scale = max(g.abs().max().item() for g in one.values())
    assert scale > 0, "the first DPO step must have a gradient"
    worst = max(one, key=lambda k: (two[k] - one[k]).abs().max().item())
    diff = (two[worst] - one[worst]).abs().max().item()
    assert diff <= 1e-5 * scale, f"largest gradient difference {diff:.3g} at {worst} (scale {scale:.3g})"


def _replayed_grpo(
    cwd: Path, rollouts: Path, tiny_model_dir: Path, synthetic_dir: Path, adapter: Path, sharded: bool,
    extra: list[str],
) -> tuple[dict, torch.Tensor]:  # fmt: skip
    """The trainable weights' gradients (as full tensors) and the global-batch loss of the first GRPO step on the
    rollouts recorded at step 0 in `rollouts` (the 4 prompts of the first global batch, G each)."""
    config = yaml.safe_load((REPO / "configs/demo_grpo.yaml").read_text())
    config["model"]["class_path"] = "fsdp2_for_tests.ReplayGRPOModule"
    config["model"]["init_args"]["replay_path"] = str(rollouts)
    (cwd / "replay.yaml").write_text(yaml.safe_dump(config))
    m = "--model.init_args."
    _fit(
        "--config", str(cwd / "replay.yaml"), *QUIET, *_backbone_args(tiny_model_dir, adapter),
        *([*FSDP2, "--trainer.devices=2"] if sharded else ["--trainer.devices=1"]),
        "--trainer.max_steps=1", f"--trainer.default_root_dir={cwd}", "--trainer.enable_checkpointing=false",
        f"{m}num_generations={G}", f"{m}max_new_tokens=24", f"{m}advantage_scale=batch", f"{m}beta=0.04",
        f"{m}max_grad_norm=0", f"{m}log_rollouts_every_n_steps=0",
        f"--data.init_args.train_path={synthetic_dir / 'train.json'}", "--data.init_args.val_path=null",
        "--data.init_args.synthetic=null", "--data.init_args.shuffle=false",
        f"--data.init_args.batch_size={PROMPTS_PER_RANK if sharded else 2 * PROMPTS_PER_RANK}",
        "--trainer.callbacks+=gradients_for_tests.SaveGradients", f"--trainer.callbacks.init_args.path={cwd / 'g.pt'}",
        "--trainer.callbacks+=fsdp2_for_tests.SaveGlobalLoss", f"--trainer.callbacks.init_args.path={cwd / 'l.pt'}",
        *extra, cwd=cwd,
    )  # fmt: skip
    return torch.load(cwd / "g.pt", weights_only=True), torch.load(cwd / "l.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("tuning", ["lora", "full"])
def test_fsdp2_grpo_first_step_on_replayed_rollouts_equals_one_process_on_the_global_batch(
    fsdp2_grpo: Path,
    tiny_model_dir: Path,
    synthetic_dir: Path,
    warm_adapter: Path,
    tmp_path: Path,
    tuning: str,
) -> None:
    """The sampled fit's step-0 rollouts replayed, with the KL to the reference (beta > 0), batch-scaled
    advantages and DAPO's token-level loss, whose ranks hold different numbers of completion tokens."""
    rollouts = fsdp2_grpo / "verifier" / "rollouts.jsonl"
    (tmp_path / "full.yaml").write_text(FULL_FT)
    extra = ["--config", str(tmp_path / "full.yaml")] if tuning == "full" else []
    (tmp_path / "fsdp2").mkdir()
    (tmp_path / "one").mkdir()
    args = (rollouts, tiny_model_dir, synthetic_dir, warm_adapter)
    two, loss_two = _replayed_grpo(tmp_path / "fsdp2", *args, sharded=True, extra=extra)
    one, loss_one = _replayed_grpo(tmp_path / "one", *args, sharded=False, extra=extra)
    trained = "lora_B" if tuning == "lora" else "layers.0.mlp.down_proj.weight"
    assert two.keys() == one.keys() and any(trained in k for k in one)
    torch.testing.assert_close(loss_two, loss_one, rtol=1e-5, atol=1e-6)
    scale = max(g.abs().max().item() for g in one.values())
    assert scale > 0, "the first GRPO step must have a gradient (a replayed group with mixed rewards)"
    worst = max(one, key=lambda k: (two[k] - one[k]).abs().max().item())
    diff = (two[worst] - one[worst]).abs().max().item()
    assert diff <= 1e-5 * scale, f"largest gradient difference {diff:.3g} at {worst} (scale {scale:.3g})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fsdp2_two_nodes_simulated_with_torchrun_take_a_grpo_step(
    tmp_path: Path,
    tiny_model_dir: Path,
    synthetic_dir: Path,
    warm_adapter: Path,
) -> None:
    """Two launcher processes (`torchrun --nnodes 2`, one process each), rendezvous on 127.0.0.1: one GRPO step
    with activation checkpointing on, both nodes' rollouts reach the verifier, the checkpoint has 2 shards."""
    port = _free_port()
    args = [*_grpo_args(tiny_model_dir, synthetic_dir, warm_adapter, tmp_path, 1), *FSDP2,
            "--trainer.devices=1", "--trainer.num_nodes=2",
            "--trainer.strategy.init_args.activation_checkpointing=true"]  # fmt: skip
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={rank}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                "-m",
                "lightning_veripo.cli",
                "fit",
                *args,
            ],
            cwd=tmp_path,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=900)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-6000:]
    rollouts = read_rollouts(tmp_path / "verifier" / "rollouts.jsonl")
    assert len(rollouts) == 2 * PROMPTS_PER_RANK * G
    assert sorted(p.name for p in (tmp_path / "ckpt" / "last.ckpt").glob("*.distcp")) == ["__0_0.distcp",
                                                                                           "__1_0.distcp"]  # fmt: skip


def test_gpu_check_runs_its_fsdp2_path_on_the_cpu(tmp_path: Path) -> None:
    """`benchmarks/gpu_check.py --fsdp2` (what a lent GPU runs) fits GRPO and DPO with the model sharded."""
    out = tmp_path / "check.json"
    done = _run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--tiny", "--fsdp2", "--out", str(out),
                 "--workdir", str(tmp_path / "work")], REPO, timeout=600)  # fmt: skip
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    report = json.loads(out.read_text())
    assert report["sharded"] is True and report["strategy"].startswith("FSDP2Strategy")
    for name in ("grpo", "dpo"):
        assert report["stages"][name]["step_median_s"] > 0 and report["stages"][name]["peak_memory_mib"] > 0


def test_fsdp2_strategy_refuses_tensor_parallelism_it_has_no_plan_for() -> None:
    with pytest.raises(
        ValueError, match="tensor_parallel_size=2: lightning_veripo has no tensor-parallel plan"
    ):
        FSDP2Strategy(tensor_parallel_size=2)
    with pytest.raises(ValueError, match="mixed_precision='fp8'"):
        FSDP2Strategy(mixed_precision="fp8")  # type: ignore[arg-type]
    assert uses_fsdp2(FSDP2Strategy(mixed_precision="bf16"))
