"""DPOModule: the loss equals DPO computed by hand from the model's logits; training leaves the reference alone;
the reference cache is computed once; TensorBoard gets the DPO tags; checkpoints hold only the adapter."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from helpers import perturb_lora
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_veripo.backbone import VideoLLM
from lightning_veripo.data.preference import PreferenceCollator, PreferenceDataModule, PreferenceDataset
from lightning_veripo.data.videoqa import FrameSampling
from lightning_veripo.dpo import DPOModule, load_ref_cache, pair_completions, ref_cache_path
from lightning_veripo.lora import LoRAConfig
from lightning_veripo.losses import dpo_loss
from lightning_veripo.records import VideoQARecord
from lightning_veripo.verifier.pairs import PreferencePair

LORA = LoRAConfig(r=4, alpha=8)
COMPLETIONS = [  # (chosen, rejected): lengths differ within and across pairs
    ("<think>the red square moves</think><answer>A</answer>", "<answer>C</answer>"),
    (
        "<think>it goes left</think><answer>A</answer>",
        "<think>up, wait, no: up and then it stops</think><answer>C",
    ),
    ("<think>three squares</think><answer>3</answer>", "<answer>2</answer>"),
    ("<think>blue</think><answer>C</answer>", "<think>hmm</think>"),
]
DPO_TAGS = [
    "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
    "logps/rejected",
]  # fmt: skip


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> Path:
    """Four pairs of the synthetic train set; even ones carry the rollout's frame indices."""
    raws = json.loads((synthetic_dir / "train.json").read_text())
    lines = []
    for i, (chosen, rejected) in enumerate(COMPLETIONS):
        record = VideoQARecord.from_dict(dict(raws[i], path=str(synthetic_dir / raws[i]["path"])))
        sampling = {"frames_indices": [0, 3, 4, 7], "fps": 8.0} if i % 2 == 0 else {}
        pair = PreferencePair(record.problem_id, record, "", record.path, sampling, chosen, rejected, 1, 0, 1, 1,
                              "consistency:wrong_answer")  # fmt: skip
        lines.append(json.dumps(pair.to_dict()))
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def collate(
    backbone: VideoLLM, pairs_path: Path, sampling: FrameSampling, indices: list[int]
) -> dict[str, Any]:
    dataset = PreferenceDataset(pairs_path, sampling)
    return PreferenceCollator(backbone.processor, sampling)([dataset[i] for i in indices])


def hand_logps(backbone: VideoLLM, prompt: dict[str, Any], text: str, reference: bool) -> tuple[float, float]:
    """(sum, mean) log-prob of `text` + <|im_end|> after one unpadded prompt, straight from the HF logits."""
    tok = backbone.tokenizer
    ids = torch.tensor(
        [tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]]
    )
    P = prompt["input_ids"].shape[1]
    inputs = {k: prompt[k] for k in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")}
    inputs["input_ids"] = torch.cat([prompt["input_ids"], ids], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "mm_token_type_ids" in prompt:
        inputs["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(ids)], 1)
    model = backbone.model
    with torch.no_grad(), model.disable_adapter() if reference else contextlib.nullcontext():
        logits = model(**inputs).logits[0, P - 1 : -1].double()
    token_logps = torch.log_softmax(logits, -1).gather(-1, ids[0, :, None])[:, 0]
    return token_logps.sum().item(), token_logps.mean().item()


@pytest.mark.parametrize(
    ("loss_type", "weights", "sft_weight"),
    [("sigmoid", None, 0.0), ("ipo", None, 0.0), (["sigmoid", "ipo", "hinge"], [0.6, 0.3, 0.1], 0.5)],
    ids=["sigmoid", "ipo", "weighted+sft"],
)
def test_loss_equals_dpo_of_hand_computed_logps(
    backbone: VideoLLM, pairs_path: Path, frame_sampling: FrameSampling, loss_type: Any, weights: Any,
    sft_weight: float,
) -> None:  # fmt: skip
    perturb_lora(backbone)
    module = DPOModule(backbone, beta=0.1, loss_type=loss_type, loss_weights=weights, sft_weight=sft_weight)
    out = module.dpo_step(collate(backbone, pairs_path, frame_sampling, [0, 1]))

    logps = {}  # (policy|ref, chosen|rejected) -> [(sum, mean)] per pair
    for i in (0, 1):
        prompt = collate(backbone, pairs_path, frame_sampling, [i])
        for who in ("policy", "ref"):
            for j, side in enumerate(("chosen", "rejected")):
                logps.setdefault((who, side), []).append(
                    hand_logps(backbone, prompt, COMPLETIONS[i][j], who == "ref")
                )

    def pick(who: str, side: str, mean: bool) -> torch.Tensor:
        return torch.tensor([v[1] if mean else v[0] for v in logps[(who, side)]], dtype=torch.float64)

    types = [loss_type] if isinstance(loss_type, str) else loss_type
    expected = torch.zeros(2, dtype=torch.float64)
    for t, w in zip(types, weights or [1.0], strict=True):
        m = t == "ipo"
        losses, _, _ = dpo_loss(pick("policy", "chosen", m), pick("policy", "rejected", m),
                                pick("ref", "chosen", m), pick("ref", "rejected", m), beta=0.1, loss_type=t)  # fmt: skip
        expected += w * losses.double()
    if sft_weight:
        chosen_tokens = out.policy.chosen.double() / out.policy.chosen_mean.double()
        expected += sft_weight * -pick("policy", "chosen", False) / chosen_tokens.mean()
    assert (
        pick("policy", "chosen", False) - pick("ref", "chosen", False)
    ).abs().min() > 1e-2  # policy != ref
    torch.testing.assert_close(out.losses.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss.double(), expected.mean(), atol=1e-5, rtol=1e-5)


def test_one_step_encodes_each_video_once(
    backbone: VideoLLM, pairs_path: Path, frame_sampling: FrameSampling
) -> None:
    perturb_lora(backbone)
    calls = []
    tower = VideoLLM._vision_tower(backbone.hf_model)
    handle = tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        DPOModule(backbone).dpo_step(collate(backbone, pairs_path, frame_sampling, [0, 1, 2]))
    finally:
        handle.remove()
    assert len(calls) == 1  # policy and reference, chosen and rejected: one vision pass for the batch


def test_all_masked_rows_give_finite_loss_and_gradients(
    backbone: VideoLLM, pairs_path: Path, frame_sampling: FrameSampling
) -> None:
    batch = collate(backbone, pairs_path, frame_sampling, [0, 1])
    batch["chosen"] = batch["chosen"]._replace(mask=torch.zeros_like(batch["chosen"].mask))
    batch["rejected"] = batch["rejected"]._replace(mask=batch["rejected"].mask * torch.tensor([[0], [1]]))
    out = DPOModule(backbone, loss_type=["sigmoid", "ipo"], sft_weight=1.0).dpo_step(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in backbone.trainable_parameters() if p.grad is not None)


def test_pairs_interleave_prompt_major() -> None:
    from lightning_veripo.completions import Completions

    chosen = Completions(torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]), [], None)
    rejected = Completions(torch.tensor([[6], [7]]), torch.tensor([[1], [1]]), [], None)
    ids, mask = pair_completions(chosen, rejected, pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [6, 0, 0], [4, 5, 0], [7, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0]]


def test_bad_loss_configuration_is_reported_at_once(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"one weight per loss_type.*'nope'.*unknown DPO loss_type") as info:
        DPOModule(VideoLLM(str(tiny_model_dir), lora=LORA), loss_type=["sigmoid", "nope"], loss_weights=[1.0])
    assert "DPOModule" in str(info.value)


# ---------------------------------------------------------------------------- training with a real Trainer


def make_trainer(root: Path, max_steps: int, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps, accelerator="cpu", log_every_n_steps=1, num_sanity_val_steps=0, limit_val_batches=1,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, **kwargs,
    )  # fmt: skip


def adapter_weights(module: DPOModule) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in module.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    pairs_path: Path,
    frame_sampling: FrameSampling,
) -> SimpleNamespace:
    """Three real optimizer steps (lr 1e-2, so the adapter visibly moves) with validation, TensorBoard and
    a checkpoint per step; the policy's and reference's log-probs of one batch before and after."""
    root = tmp_path_factory.mktemp("dpo_fit")
    module = DPOModule(VideoLLM(str(tiny_model_dir), lora=LORA), lr=1e-2)
    module.configure_model()
    batch = collate(module.backbone, pairs_path, frame_sampling, [0, 1])

    def logps() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            out = module.dpo_step(batch)
        return out.policy.stacked(), out.reference.stacked()

    before = logps()
    logger = TensorBoardLogger(root / "tb", name="dpo")
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True)
    trainer = make_trainer(root, 3, logger=logger, callbacks=[checkpoints])
    dm = PreferenceDataModule(
        str(pairs_path), val_pairs_path=str(pairs_path), sampling=frame_sampling, batch_size=2
    )
    trainer.fit(module, dm)
    return SimpleNamespace(
        module=module, trainer=trainer, before=before, after=logps(), log_dir=Path(logger.log_dir), root=root,
        last=Path(checkpoints.last_model_path),
    )  # fmt: skip


def test_training_moves_the_policy_but_not_the_reference(trained: SimpleNamespace) -> None:
    (policy_before, ref_before), (policy_after, ref_after) = trained.before, trained.after
    assert trained.trainer.global_step == 3
    assert (policy_after - policy_before).abs().max() > 1e-2
    torch.testing.assert_close(ref_after, ref_before, atol=1e-6, rtol=0)


def test_tensorboard_has_the_dpo_tags(trained: SimpleNamespace) -> None:
    events = EventAccumulator(str(trained.log_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {f"train/{t}" for t in DPO_TAGS} | {f"val/{t}" for t in DPO_TAGS} | {"train/step_time_s"}
    assert expected <= tags, f"missing {sorted(expected - tags)}"
    assert len(events.Scalars("train/loss")) == 3


def test_checkpoint_holds_only_the_adapter(trained: SimpleNamespace) -> None:
    state = torch.load(trained.last, map_location="cpu", weights_only=False)["state_dict"]
    assert state and all("lora_" in k for k in state)
    assert set(state) == set(adapter_weights(trained.module))


def test_resuming_from_the_checkpoint_restores_the_adapter_and_continues(
    trained: SimpleNamespace, tiny_model_dir: Path, pairs_path: Path, frame_sampling: FrameSampling
) -> None:
    seen: dict[str, torch.Tensor] = {}

    class AtStart(Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: DPOModule) -> None:
            seen.update(adapter_weights(pl_module))

    module = DPOModule(VideoLLM(str(tiny_model_dir), lora=LORA), lr=1e-2)
    trainer = make_trainer(
        trained.root / "resume", 4, logger=False, enable_checkpointing=False, callbacks=[AtStart()]
    )
    trainer.fit(module, PreferenceDataModule(str(pairs_path), sampling=frame_sampling, batch_size=2),
                ckpt_path=trained.last)  # fmt: skip
    saved = torch.load(trained.last, map_location="cpu", weights_only=False)["state_dict"]
    assert seen.keys() == saved.keys()
    for k, v in saved.items():
        torch.testing.assert_close(seen[k], v, atol=0, rtol=0)
    assert trainer.global_step == 4


def test_precomputed_reference_is_computed_once_and_reused(
    tmp_path: Path, tiny_model_dir: Path, pairs_path: Path, frame_sampling: FrameSampling
) -> None:
    local = tmp_path / "pairs.jsonl"
    local.write_text(pairs_path.read_text())
    cache = ref_cache_path(local)

    def fit(max_steps: int, batch_size: int) -> DPOModule:
        module = DPOModule(VideoLLM(str(tiny_model_dir), lora=LORA), lr=1e-2, precompute_ref_logps=True)
        dm = PreferenceDataModule(str(local), sampling=frame_sampling, batch_size=batch_size)
        make_trainer(tmp_path, max_steps, logger=False, enable_checkpointing=False).fit(module, dm)
        return module

    first = fit(1, batch_size=2)
    assert first.ref_logps_computed == len(COMPLETIONS) and cache.is_file()
    written = cache.stat().st_mtime_ns

    # the cached values are what a per-step reference pass computes
    first.ref_cache = None
    batch = collate(first.backbone, local, frame_sampling, [2, 3])
    with torch.no_grad():
        fresh = first.dpo_step(batch).reference.stacked()
    dataset = PreferenceDataset(local, frame_sampling)
    stored = load_ref_cache(cache, first.reference_identity(dataset))
    torch.testing.assert_close(
        torch.stack([stored[k] for k in dataset.keys[2:]]), fresh, atol=1e-4, rtol=1e-5
    )

    second = fit(2, batch_size=4)  # two epochs, a new run: nothing recomputed, the file untouched
    assert second.ref_logps_computed == 0 and cache.stat().st_mtime_ns == written


def test_a_stale_reference_cache_is_ignored(tmp_path: Path, tiny_model_dir: Path, pairs_path: Path) -> None:
    from lightning_veripo.dpo import save_ref_cache

    path = tmp_path / "pairs.jsonl.ref_logps.pt"
    module = DPOModule(VideoLLM(str(tiny_model_dir), lora=LORA))
    identity = module.reference_identity(PreferenceDataset(pairs_path))
    save_ref_cache(path, identity, {"k": torch.zeros(4)})
    assert set(load_ref_cache(path, identity)) == {"k"}
    with pytest.warns(UserWarning, match=r"different \['merge_adapters'\]; recomputing"):
        assert load_ref_cache(path, dict(identity, merge_adapters=["iter_0/dpo/adapter"])) == {}
