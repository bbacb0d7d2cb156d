"""VideoLLM: rollouts, per-token log-probs, the reference policy, stage-boundary merges and checkpoints."""

from __future__ import annotations

import pytest
import torch
from helpers import hand_logprobs, perturb_lora

from lightning_veripo.backbone import VideoLLM
from lightning_veripo.completions import FORBIDDEN_GENERATION_TOKENS
from lightning_veripo.lora import LoRAConfig

LORA = LoRAConfig(r=4, alpha=8)


def _make_end_token_likely(backbone: VideoLLM, batch: dict) -> None:
    """Point <|im_end|>'s output embedding along the mean final hidden state, so a random model's rollouts
    end at varied lengths (untouched, about 1 in 256 tokens is an end token and nearly every row truncates)."""
    end = backbone.token_ids(["<|im_end|>"])[0]
    with torch.no_grad():
        hidden = backbone.hf_model(**_hf_inputs(batch), output_hidden_states=True).hidden_states[-1]
        direction = hidden.mean((0, 1))
        backbone.hf_model.lm_head.weight[end] = 4.0 * direction / direction.norm() ** 2


def _lora_grads(backbone: VideoLLM) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in backbone.model.named_parameters() if "lora_" in n}


def _sample(backbone: VideoLLM, batch: dict, num_samples: int, max_new_tokens: int = 12, seed: int = 0):
    torch.manual_seed(seed)
    return backbone.generate(batch, num_samples=num_samples, max_new_tokens=max_new_tokens)


def _hf_inputs(batch: dict) -> dict:
    """The processor's tensors only (what `model.generate` / `model.forward` take)."""
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------------- generation


def test_generate_returns_num_samples_completions_per_prompt(backbone, video_batch):
    out = _sample(backbone, video_batch, num_samples=8, max_new_tokens=12)

    assert out.ids.ndim == 2 and out.ids.shape[0] == 16 and 1 <= out.ids.shape[1] <= 12
    assert out.mask.shape == out.ids.shape
    assert len(out.text) == 16 and all(isinstance(t, str) for t in out.text)
    assert out.truncated.shape == (16,) and out.truncated.dtype == torch.bool


def test_generation_never_emits_vision_placeholders_or_new_turns(backbone, video_batch):
    forbidden = torch.tensor(backbone.token_ids(FORBIDDEN_GENERATION_TOKENS))
    assert len(forbidden) == len(FORBIDDEN_GENERATION_TOKENS)

    for seed in range(3):
        torch.manual_seed(seed)
        out = backbone.generate(video_batch, num_samples=8, max_new_tokens=24, temperature=3.0)
        assert not torch.isin(out.ids, forbidden).any(), f"seed {seed}: {out.text}"


def test_completion_mask_covers_up_to_and_including_the_first_end_token(backbone):
    im_end, eot = backbone.token_ids(["<|im_end|>", "<|endoftext|>"])
    a, b = backbone.tokenizer.encode("A B", add_special_tokens=False)[:2]
    ids = torch.tensor(
        [
            [a, b, im_end, a, im_end],  # ends at 2; tokens after the first end are not part of it
            [a, eot, b, b, b],  # <|endoftext|> ends a completion too
            [im_end, a, a, a, a],  # empty answer: only the end token counts
            [a, b, a, b, a],  # no end token: every token counts
        ]
    )
    out = backbone.completions_from_ids(ids, max_new_tokens=5)

    assert out.mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert (out.ids[out.mask == 0] == backbone.pad_token_id).all()
    assert out.text[0] == backbone.tokenizer.decode([a, b]) and out.text[2] == ""


def test_generated_masks_end_at_the_first_end_token(backbone, video_batch):
    _make_end_token_likely(backbone, video_batch)
    out = _sample(backbone, video_batch, num_samples=8, max_new_tokens=16)
    is_end = torch.isin(out.ids, torch.tensor(backbone.end_token_ids))

    assert 0 < int(is_end.any(-1).sum()) < 16, "want rows that end and rows that run out of tokens"
    for row, mask, ends in zip(out.ids, out.mask, is_end, strict=True):
        length = int(ends.int().argmax()) + 1 if ends.any() else out.ids.shape[1]
        assert mask.tolist() == [1] * length + [0] * (len(mask) - length), row.tolist()


def test_generated_truncated_flag_is_set_exactly_for_rows_without_an_end_token(backbone, video_batch):
    _make_end_token_likely(backbone, video_batch)
    out = _sample(backbone, video_batch, num_samples=8, max_new_tokens=16)
    has_end = torch.isin(out.ids, torch.tensor(backbone.end_token_ids)).any(-1)

    assert 0 < int(out.truncated.sum()) < 16
    assert out.truncated.tolist() == (~has_end).tolist()
    assert out.ids.shape[1] == 16


def test_truncated_flag_marks_completions_that_hit_max_new_tokens_without_an_end(backbone):
    im_end = backbone.token_ids(["<|im_end|>"])[0]
    a = backbone.tokenizer.encode("A", add_special_tokens=False)[0]
    ids = torch.tensor([[a, a, a, a], [a, a, a, im_end], [a, im_end, a, a]])

    assert backbone.completions_from_ids(ids, max_new_tokens=4).truncated.tolist() == [True, False, False]
    # Shorter than the budget without an end token (e.g. the whole batch stopped): not truncated.
    assert backbone.completions_from_ids(ids, max_new_tokens=8).truncated.tolist() == [False, False, False]


def test_greedy_generation_with_precomputed_vision_equals_hf_generate_from_pixels(backbone, video_batch):
    vision = backbone.encode_vision(video_batch)
    ours = backbone.generate(video_batch, num_samples=1, max_new_tokens=16, do_sample=False, vision=vision)

    inputs = _hf_inputs(video_batch)
    with torch.no_grad():
        out = backbone.hf_model.generate(
            **inputs,
            max_new_tokens=16,
            do_sample=False,
            suppress_tokens=backbone.token_ids(FORBIDDEN_GENERATION_TOKENS),
            eos_token_id=backbone.end_token_ids,
            pad_token_id=backbone.pad_token_id,
        )
    theirs = backbone.completions_from_ids(out[:, inputs["input_ids"].shape[1] :], 16)

    assert torch.equal(ours.ids, theirs.ids)
    assert ours.text == theirs.text


# ---------------------------------------------------------------------- log-probs


def test_sequence_logprobs_equal_a_hand_computation_from_the_model_logits(backbone, video_batch):
    perturb_lora(backbone)
    completions = _sample(backbone, video_batch, num_samples=3, max_new_tokens=10)

    with torch.no_grad():
        ours = backbone.sequence_logprobs(video_batch, completions.ids, completions.mask, num_samples=3)
    expected = hand_logprobs(backbone, video_batch, completions, num_samples=3)

    assert ours.shape == completions.ids.shape and ours.dtype == torch.float32
    assert (ours[completions.mask == 0] == 0).all()
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_shared_vision_equals_reencoding_in_values_and_lora_gradients(backbone, video_batch):
    perturb_lora(backbone)
    completions = _sample(backbone, video_batch, num_samples=4, max_new_tokens=10)

    shared = backbone.sequence_logprobs(video_batch, completions.ids, completions.mask, num_samples=4)
    shared.sum().backward()
    shared_grads = _lora_grads(backbone)
    backbone.model.zero_grad(set_to_none=True)
    reencoded = backbone.sequence_logprobs(
        video_batch, completions.ids, completions.mask, num_samples=4, share_vision=False
    )
    reencoded.sum().backward()
    reencoded_grads = _lora_grads(backbone)

    torch.testing.assert_close(shared, reencoded, atol=1e-5, rtol=0)
    assert shared_grads.keys() == reencoded_grads.keys() and len(shared_grads) > 0
    assert any(g.abs().max() > 0 for g in shared_grads.values())
    for name in shared_grads:
        torch.testing.assert_close(shared_grads[name], reencoded_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_reference_equals_policy_while_lora_b_is_zero(backbone, video_batch):
    lora_b = [p for n, p in backbone.model.named_parameters() if "lora_B" in n]
    assert lora_b and all((p == 0).all() for p in lora_b)
    completions = _sample(backbone, video_batch, num_samples=2)

    with torch.no_grad():
        policy = backbone.sequence_logprobs(video_batch, completions.ids, completions.mask, num_samples=2)
    reference = backbone.sequence_logprobs(video_batch, completions.ids, completions.mask, 2, reference=True)

    torch.testing.assert_close(reference, policy, atol=1e-6, rtol=0)


def test_reference_is_the_base_model_with_the_adapter_disabled(backbone, video_batch, tiny_model_dir):
    perturb_lora(backbone)
    completions = _sample(backbone, video_batch, num_samples=2)
    base = VideoLLM(str(tiny_model_dir), lora=None).load()

    reference = backbone.sequence_logprobs(video_batch, completions.ids, completions.mask, 2, reference=True)
    with torch.no_grad():
        expected = base.sequence_logprobs(video_batch, completions.ids, completions.mask, num_samples=2)

    assert not reference.requires_grad
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=0)


def test_perturbed_adapter_makes_policy_differ_from_reference(backbone, video_batch):
    completions = _sample(backbone, video_batch, num_samples=2)
    perturb_lora(backbone)

    with torch.no_grad():
        policy = backbone.sequence_logprobs(video_batch, completions.ids, completions.mask, num_samples=2)
    reference = backbone.sequence_logprobs(video_batch, completions.ids, completions.mask, 2, reference=True)

    assert (policy - reference).abs().max() > 1e-3


def test_merge_and_reset_keeps_the_policy_and_makes_it_the_reference(backbone, video_batch):
    perturb_lora(backbone)
    completions = _sample(backbone, video_batch, num_samples=2)
    args = (video_batch, completions.ids, completions.mask, 2)
    with torch.no_grad():
        before = backbone.sequence_logprobs(*args)

    backbone.merge_and_reset()
    with torch.no_grad():
        after = backbone.sequence_logprobs(*args)
    reference = backbone.sequence_logprobs(*args, reference=True)

    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(reference, after, atol=1e-5, rtol=0)
    fresh = [(n, p) for n, p in backbone.model.named_parameters() if "lora_" in n]
    assert fresh and all(p.requires_grad for _, p in fresh)
    assert all((p == 0).all() for n, p in fresh if "lora_B" in n)


def test_full_finetuning_reference_is_a_frozen_copy_unchanged_by_training(tiny_model_dir, video_batch):
    full = VideoLLM(str(tiny_model_dir), lora=None).load()
    completions = _sample(full, video_batch, num_samples=2)
    args = (video_batch, completions.ids, completions.mask, 2)
    reference_before = full.sequence_logprobs(*args, reference=True)

    optimizer = torch.optim.SGD(full.trainable_parameters(), lr=0.5)
    (-full.sequence_logprobs(*args).sum()).backward()
    optimizer.step()
    with torch.no_grad():
        policy_after = full.sequence_logprobs(*args)
    reference_after = full.sequence_logprobs(*args, reference=True)

    with full.reference() as reference_model:
        assert not any(p.requires_grad for p in reference_model.parameters())
    assert (policy_after - reference_before).abs().max() > 1e-3
    torch.testing.assert_close(reference_after, reference_before, atol=0, rtol=0)


# ---------------------------------------------------------------------- checkpoints and setup


def test_save_pretrained_with_lora_writes_an_adapter_that_loads_back(
    backbone, video_batch, tiny_model_dir, tmp_path
):
    perturb_lora(backbone)
    completions = _sample(backbone, video_batch, num_samples=2)
    args = (video_batch, completions.ids, completions.mask, 2)
    with torch.no_grad():
        saved = backbone.sequence_logprobs(*args)

    out = backbone.save_pretrained(tmp_path / "adapter")
    restored = VideoLLM(str(tiny_model_dir), lora=LORA, adapter_path=str(out)).load()
    with torch.no_grad():
        loaded = restored.sequence_logprobs(*args)

    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists() and not (out / "pytorch_model.bin").exists()
    torch.testing.assert_close(loaded, saved, atol=1e-6, rtol=0)


def test_adapter_path_without_lora_is_refused_before_anything_loads(tmp_path):
    """An adapter to continue needs LoRA settings; one to fold into the weights goes in merge_adapters."""
    with pytest.raises(ValueError, match=r"adapter_path=.*needs `lora` settings.*merge_adapters"):
        VideoLLM(str(tmp_path / "no-model-here"), lora=None, adapter_path=str(tmp_path / "adapter"))


@pytest.mark.parametrize("lora", [LORA, None], ids=["lora", "full fine-tuning"])
def test_vision_tower_is_frozen_by_default(tiny_model_dir, lora):
    backbone = VideoLLM(str(tiny_model_dir), lora=lora).load()
    visual = backbone.hf_model.model.visual

    assert sum(1 for _ in visual.parameters()) > 0
    assert not any(p.requires_grad for p in visual.parameters())
    assert any(p.requires_grad for p in backbone.trainable_parameters())


@pytest.mark.parametrize("where", ["absolute", "dot-relative", "bare name"])
def test_missing_local_model_path_raises_file_not_found(tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    path = {"absolute": str(tmp_path / "missing-model"), "dot-relative": "./models/missing-model"}.get(
        where, "missing-model"
    )

    with pytest.raises(FileNotFoundError, match=r"missing-model.*veripo make-tiny-model"):
        VideoLLM(path).load()


def test_generate_before_load_raises_runtime_error(tiny_model_dir, video_batch):
    with pytest.raises(RuntimeError, match=r"not loaded.*load\(\)"):
        VideoLLM(str(tiny_model_dir)).generate(video_batch)


def test_tokenize_completions_appends_the_end_token_and_masks_the_padding(backbone):
    texts = ["<think>red</think><answer>A</answer>", "B"]
    out = backbone.tokenize_completions(texts)
    im_end = backbone.token_ids(["<|im_end|>"])[0]
    lengths = [len(backbone.tokenizer.encode(t, add_special_tokens=False)) + 1 for t in texts]

    assert out.mask.sum(-1).tolist() == lengths
    assert [int(row[n - 1]) for row, n in zip(out.ids, lengths, strict=True)] == [im_end, im_end]
    assert backbone.completions_from_ids(out.ids).text == texts


# ---------------------------------------------------------------------- missing paths fail fast, offline


def _forbid_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Make every outgoing connection fail at once and record where it went: "fails fast" means none is tried
    (no hub request, no retries), which a count checks on any machine, unlike a wall-clock limit."""
    import socket

    tried: list[object] = []

    def refuse(self: socket.socket, address: object, *args: object) -> None:
        tried.append(address)
        raise OSError(f"test: network connection to {address!r} refused")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return tried


def _forbid_transformers_loading(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make any model load through transformers fail at once (and record its name): no hub, no retries."""
    from transformers import AutoModelForImageTextToText

    asked: list[str] = []

    def refuse(name: str, *args: object, **kwargs: object) -> None:
        asked.append(str(name))
        raise OSError(f"test: transformers was asked for {name!r}")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", staticmethod(refuse))
    return asked


@pytest.mark.parametrize(
    "path",
    ["work/tiny", "./work/tiny", "~/no-such-veripo-model", "work/models/tiny", "models/tiny/"],
    ids=["first-component-exists", "dot-relative", "home", "two-slashes", "trailing-slash"],
)
def test_missing_local_path_fails_fast_instead_of_asking_the_hub(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    (tmp_path / "work").mkdir()
    asked = _forbid_transformers_loading(monkeypatch)
    tried = _forbid_network(monkeypatch)

    with pytest.raises(FileNotFoundError) as err:
        VideoLLM(path).load()

    assert tried == []  # no hub request, no retry
    assert asked == []  # never handed to transformers as a hub repo id
    message = str(err.value)
    assert repr(path) in message and "veripo make-tiny-model" in message and "make_tiny_if_missing" in message


def test_missing_hub_name_fails_fast_while_the_hub_is_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked = _forbid_transformers_loading(monkeypatch)
    tried = _forbid_network(monkeypatch)

    with pytest.raises(
        FileNotFoundError, match=r"'veripo-test-org/no-such-model'.*HF_HUB_OFFLINE.*make-tiny-model"
    ):
        VideoLLM("veripo-test-org/no-such-model").load()

    assert tried == []
    assert asked == []


def test_hub_name_that_is_not_a_local_path_goes_to_transformers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    asked = _forbid_transformers_loading(monkeypatch)

    with pytest.raises(OSError, match="transformers was asked"):
        VideoLLM("Qwen/Qwen2.5-VL-3B-Instruct").load()

    assert asked == ["Qwen/Qwen2.5-VL-3B-Instruct"]


def test_model_path_under_home_is_expanded(tmp_path, monkeypatch, tiny_model_dir):
    home = tmp_path / "home"
    home.mkdir()
    (home / "tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    monkeypatch.setenv("HOME", str(home))

    backbone = VideoLLM("~/tiny", lora=LORA).load()

    assert backbone.hf_model.config.model_type == "qwen2_5_vl"


def test_full_fine_tuning_without_reference_copy_keeps_one_model_and_refuses_reference_use(
    tiny_model_dir,
) -> None:
    from lightning_veripo.grpo import GRPOModule

    with_copy = VideoLLM(str(tiny_model_dir)).load()
    without = VideoLLM(str(tiny_model_dir), reference_copy=False).load()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(with_copy) == 2 * count(without)  # the frozen copy is the only difference
    with pytest.raises(RuntimeError, match="reference_copy=False"):
        with without.reference():
            pass
    with pytest.raises(ValueError, match="needs a reference policy"):
        GRPOModule(VideoLLM(str(tiny_model_dir), reference_copy=False), beta=0.04)
    GRPOModule(VideoLLM(str(tiny_model_dir), reference_copy=False), beta=0.0)  # no reference pass: fine
