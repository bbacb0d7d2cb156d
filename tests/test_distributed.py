"""GRPO -> verifier -> DPO with `strategy=ddp` on 2 CPU processes (gloo), through the real `veripo fit` command,
checked against what one process computes for the same global batch.

Sampling differs between ranks and a single process (each rank draws from its own generator), so GRPO is checked
on its bookkeeping: every prompt of each global batch was rolled out G times, once; the advantages the ranks
recorded equal the single-process formula applied to the *global* batch's rewards (with `advantage_scale=batch`
a rank that normalised by its own rewards would be caught); the verifier judged every rollout of both ranks and
wrote its files once, the same files a single process writes from those rollouts. DPO has no sampling, so the
DDP fit (1 pair per rank) must apply the same gradient as one process fitting 2 pairs per step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_veripo import losses
from lightning_veripo.verifier.run import read_rollouts, run_verifier_from_files

REPO = Path(__file__).resolve().parents[1]
G, PROMPTS_PER_RANK, STEPS = 4, 2, 2
QUIET = ["--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=0",
         "--trainer.num_sanity_val_steps=0", "--seed_everything=0"]  # fmt: skip


def _fit(*args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
    command = [sys.executable, "-m", "lightning_veripo.cli", "fit", *args]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-6000:]}"


def _backbone_args(tiny_model_dir: Path, warm_adapter: Path) -> list[str]:
    b = "--model.init_args.backbone.init_args."
    return [f"{b}model_name_or_path={tiny_model_dir}", f"{b}merge_adapters=[{warm_adapter}]",
            f"{b}make_tiny_if_missing=false", f"{b}lora.dropout=0.0"]  # fmt: skip


@pytest.fixture(scope="module")
def ddp_grpo(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, synthetic_dir: Path,
             warm_adapter: Path) -> Path:  # fmt: skip
    """The verifier directory of a 2-process DDP GRPO fit: 2 prompts per rank, G = 4, 2 steps."""
    cwd = tmp_path_factory.mktemp("ddp_grpo")
    out = cwd / "verifier"
    _fit(
        "--config", str(REPO / "configs/demo_grpo.yaml"), *QUIET, *_backbone_args(tiny_model_dir, warm_adapter),
        "--trainer.strategy=ddp", "--trainer.devices=2", f"--trainer.max_steps={STEPS}",
        "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={cwd}",
        f"--model.init_args.num_generations={G}", "--model.init_args.max_new_tokens=24",
        "--model.init_args.advantage_scale=batch", "--model.init_args.log_rollouts_every_n_steps=0",
        f"--data.init_args.train_path={synthetic_dir / 'train.json'}", "--data.init_args.val_path=null",
        "--data.init_args.synthetic=null", "--data.init_args.shuffle=false",
        f"--data.init_args.batch_size={PROMPTS_PER_RANK}",
        "--trainer.callbacks+=lightning_veripo.callbacks.VerifierCallback",
        f"--trainer.callbacks.init_args.out_dir={out}", "--trainer.callbacks.init_args.progress=false",
        cwd=cwd,
    )  # fmt: skip
    return out


@pytest.mark.slow
def test_ddp_grpo_rolls_out_each_global_batch_once_with_global_advantages(
    ddp_grpo: Path, synthetic_dir: Path
) -> None:
    rollouts = read_rollouts(ddp_grpo / "rollouts.jsonl")
    ids = [str(r["problem_id"]) for r in json.loads((synthetic_dir / "train.json").read_text())]
    world = 2 * PROMPTS_PER_RANK
    assert len(rollouts) == STEPS * world * G
    assert len({(r.step, r.record.problem_id, r.sample_index) for r in rollouts}) == len(
        rollouts
    )  # no duplicate
    for step in range(STEPS):
        these = [r for r in rollouts if r.step == step]
        # the single process's batch `step` of a sequential loader: records step*world .. step*world + world-1
        assert sorted({r.record.problem_id for r in these}) == sorted(ids[step * world : (step + 1) * world])
        these.sort(key=lambda r: (r.record.problem_id, r.sample_index))
        assert [r.sample_index for r in these] == list(range(G)) * world
        rewards = torch.tensor([r.reward for r in these], dtype=torch.float32)
        expected = losses.group_advantages(rewards, G, scale="batch")
        recorded = torch.tensor([r.advantage for r in these], dtype=torch.float32)
        torch.testing.assert_close(recorded, expected, rtol=1e-5, atol=1e-5)
        per_rank = torch.cat([losses.group_advantages(half, G, "batch") for half in rewards.view(2, -1)])
        if rewards.std() > 0 and not torch.allclose(per_rank, expected, atol=1e-4):
            assert not torch.allclose(recorded, per_rank, atol=1e-4)  # the check can tell the two apart


@pytest.mark.slow
def test_ddp_verifier_judges_every_rank_rollout_and_writes_once(ddp_grpo: Path, tmp_path: Path) -> None:
    verdicts = (ddp_grpo / "verdicts.jsonl").read_text().splitlines()
    rollouts = (ddp_grpo / "rollouts.jsonl").read_text().splitlines()
    assert len(verdicts) == len(rollouts) == STEPS * 2 * PROMPTS_PER_RANK * G
    pairs = (ddp_grpo / "pairs.jsonl").read_text().splitlines()
    assert len(set(pairs)) == len(pairs)  # rank 1 wrote nothing of its own
    stats = json.loads((ddp_grpo / "stats.json").read_text())
    assert stats["num_rollouts"] == len(rollouts)
    # one process re-judging the gathered rollouts writes byte-identical files
    run_verifier_from_files(ddp_grpo / "rollouts.jsonl", tmp_path, progress=False)
    for name in ("rollouts.jsonl", "pairs.jsonl"):
        assert (tmp_path / name).read_bytes() == (ddp_grpo / name).read_bytes(), name
    untimed = ("judge_time_s", "wall_time_s")
    assert {
        k: v for k, v in json.loads((tmp_path / "stats.json").read_text()).items() if k not in untimed
    } == {k: v for k, v in stats.items() if k not in untimed}

    def decisions(path: Path) -> list[dict]:  # a verdict minus its timing
        return [
            {k: v for k, v in json.loads(x).items() if k != "latency_s"}
            for x in path.read_text().splitlines()
        ]

    assert decisions(tmp_path / "verdicts.jsonl") == decisions(ddp_grpo / "verdicts.jsonl")
    assert len(pairs) >= 4, "the warm-started model should give mixed groups, hence pairs for the DPO test"


def _dpo_gradients(
    cwd: Path, pairs: Path, tiny_model_dir: Path, warm_adapter: Path, ddp: bool
) -> dict[str, torch.Tensor]:
    """The LoRA gradients of the first DPO step, as the optimiser receives them (after DDP's all-reduce)."""
    grads = cwd / "grads.pt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    _fit(
        "--config", str(REPO / "configs/demo_dpo.yaml"), *QUIET, *_backbone_args(tiny_model_dir, warm_adapter),
        *(["--trainer.strategy=ddp", "--trainer.devices=2"] if ddp else ["--trainer.devices=1"]),
        "--trainer.max_steps=1", "--trainer.max_epochs=-1", f"--trainer.default_root_dir={cwd}",
        "--trainer.enable_checkpointing=false", f"--data.init_args.pairs_path={pairs}",
        "--data.init_args.shuffle=false", f"--data.init_args.batch_size={1 if ddp else 2}",
        "--trainer.callbacks+=gradients_for_tests.SaveGradients", f"--trainer.callbacks.init_args.path={grads}",
        cwd=cwd, env=env,
    )  # fmt: skip
    return torch.load(grads, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_ddp_dpo_on_the_verifier_pairs_equals_one_process_on_the_global_batch(
    ddp_grpo: Path, tiny_model_dir: Path, warm_adapter: Path, tmp_path: Path
) -> None:
    pairs = ddp_grpo / "pairs.jsonl"
    (tmp_path / "ddp").mkdir()
    (tmp_path / "single").mkdir()
    two = _dpo_gradients(tmp_path / "ddp", pairs, tiny_model_dir, warm_adapter, ddp=True)
    one = _dpo_gradients(tmp_path / "single", pairs, tiny_model_dir, warm_adapter, ddp=False)
    assert two.keys() == one.keys() and any("lora_B" in k for k in one)
    scale = max(g.abs().max().item() for g in one.values())
    assert scale > 0, "the first DPO step must have a gradient"
    # DDP averages two 1-pair gradients where one process takes the mean over 2 pairs: the same sum in another
    # order (and other padding), so the gradients agree to float32 rounding of the largest one, nothing more.
    tolerance = 1e-5 * scale
    worst = max(one, key=lambda k: (two[k] - one[k]).abs().max().item())
    diff = (two[worst] - one[worst]).abs().max().item()
    assert diff <= tolerance, f"largest gradient difference {diff:.3g} at {worst} (tolerance {tolerance:.3g})"


@pytest.mark.slow
def test_ddp_rank_whose_groups_are_all_dropped_joins_the_others_backward(
    tmp_path: Path, tiny_model_dir: Path, synthetic_dir: Path
) -> None:
    """Rank 0 gets a colour question (constant reward: its group is dropped), rank 1 a direction question (kept).

    Without the zero-weighted pass rank 1 would wait forever in DDP's gradient all-reduce; here the fit ends, the
    adapter moves (rank 1's gradient, averaged) and both ranks' rollouts reach the verifier."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    out, ckpt = tmp_path / "verifier", tmp_path / "ckpt"
    b = "--model.init_args.backbone.init_args."
    command = [
        sys.executable, "-m", "lightning_veripo.cli", "fit", "--config", str(REPO / "configs/demo_grpo.yaml"), *QUIET,
        f"{b}model_name_or_path={tiny_model_dir}", f"{b}make_tiny_if_missing=false", f"{b}lora.dropout=0.0",
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}",
        f"--model.init_args.num_generations={G}", "--model.init_args.max_new_tokens=8",
        "--model.init_args.rewards.names=[rewards_for_tests.constant_for_colour_questions]",
        "--model.init_args.log_rollouts_every_n_steps=0",
        f"--data.init_args.train_path={synthetic_dir / 'train.json'}", "--data.init_args.val_path=null",
        "--data.init_args.synthetic=null", "--data.init_args.shuffle=false", "--data.init_args.batch_size=1",
        "--trainer.callbacks+=lightning_veripo.callbacks.VerifierCallback",
        f"--trainer.callbacks.init_args.out_dir={out}", "--trainer.callbacks.init_args.progress=false",
        "--trainer.enable_checkpointing=true", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.init_args.dirpath={ckpt}", "--trainer.callbacks.init_args.filename=final",
        "--trainer.callbacks.init_args.every_n_train_steps=1",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-6000:]
    rollouts = read_rollouts(out / "rollouts.jsonl")
    assert sorted({r.record.problem_id for r in rollouts}) == ["train-colour-00000", "train-direction-00001"]
    colour = [r for r in rollouts if "colour" in r.record.problem_id]
    assert all(r.reward == 0.0 and r.advantage == 0.0 for r in colour)  # the dropped group
    state = torch.load(ckpt / "final.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in state.items())
