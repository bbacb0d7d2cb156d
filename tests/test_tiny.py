"""The offline tiny Qwen2.5-VL and tiny causal LM: real classes, real tokenizer, deterministic per seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2ForCausalLM,
)
from transformers.video_utils import VideoMetadata

from lightning_veripo.tiny import QWEN_SPECIAL_TOKENS, REASONING_TOKENS, make_tiny_causal_lm, make_tiny_model


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def test_tiny_model_loads_through_auto_classes_as_real_qwen2_5_vl(tiny_model_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)

    assert type(model) is Qwen2_5_VLForConditionalGeneration
    assert type(processor) is Qwen2_5_VLProcessor


def test_tokenizer_has_qwen_special_and_reasoning_tokens_as_single_tokens(tiny_model_dir):
    tok = AutoProcessor.from_pretrained(tiny_model_dir).tokenizer
    vocab = tok.get_vocab()

    for token in QWEN_SPECIAL_TOKENS + REASONING_TOKENS:
        assert token in vocab, token
        assert tok.encode(token, add_special_tokens=False) == [vocab[token]], token
    ids = tok.encode("<think></think><answer></answer>", add_special_tokens=False)
    assert ids == [vocab[t] for t in REASONING_TOKENS]


def test_tiny_model_config_points_at_its_own_special_tokens(tiny_model_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    vocab = AutoProcessor.from_pretrained(tiny_model_dir).tokenizer.get_vocab()
    config = model.config

    assert config.video_token_id == vocab["<|video_pad|>"]
    assert config.image_token_id == vocab["<|image_pad|>"]
    assert config.vision_start_token_id == vocab["<|vision_start|>"]
    assert config.text_config.eos_token_id == vocab["<|im_end|>"]
    assert config.text_config.pad_token_id == vocab["<|endoftext|>"]
    assert config.text_config.vocab_size == len(vocab)


def test_same_seed_gives_identical_weights_and_another_seed_different(tiny_model_dir, tmp_path):
    same = _weights(make_tiny_model(tmp_path / "same", seed=0))
    other = _weights(make_tiny_model(tmp_path / "other", seed=1))
    reference = _weights(tiny_model_dir)

    assert same.keys() == reference.keys()
    assert all(torch.equal(same[k], reference[k]) for k in reference)
    assert other.keys() == reference.keys()
    assert any(not torch.equal(other[k], reference[k]) for k in reference if reference[k].numel() > 1)


def test_tiny_model_generates_text_from_a_video(tiny_model_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    frames = np.random.default_rng(0).integers(0, 256, size=(4, 56, 56, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What colour?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(
        text=[text],
        videos=[frames],
        video_metadata=[VideoMetadata(total_num_frames=4, fps=4.0, frames_indices=[0, 1, 2, 3])],
        do_sample_frames=False,
        return_tensors="pt",
    )

    assert (inputs["input_ids"] == model.config.video_token_id).sum() > 0
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :prompt_len], inputs["input_ids"])
    assert prompt_len < out.shape[1] <= prompt_len + 6


def test_tiny_causal_lm_loads_through_auto_model_for_causal_lm(tmp_path):
    out = make_tiny_causal_lm(tmp_path / "judge", seed=0)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)

    assert type(model) is Qwen2ForCausalLM
    ids = tok("<think>The square is red.</think><answer>A</answer>", return_tensors="pt")["input_ids"]
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))


@pytest.mark.parametrize(
    ("arch", "model_class"),
    [("qwen3_vl", "Qwen3VLForConditionalGeneration"), ("qwen3_5", "Qwen3_5ForConditionalGeneration"),
     ("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration")],
)  # fmt: skip
def test_make_tiny_model_command_builds_the_architecture_named_by_arch(tmp_path, arch, model_class):
    import json

    from lightning_veripo.cli import main

    assert main(["make-tiny-model", str(tmp_path / "m"), "--arch", arch, "--num-layers", "2"]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())

    assert config["model_type"] == arch and config["architectures"] == [model_class]
    assert config["text_config"]["num_hidden_layers"] == 2
    assert type(AutoProcessor.from_pretrained(tmp_path / "m")).__name__ == "Qwen3VLProcessor"


def test_tiny_qwen3_5_mixes_linear_and_full_attention_and_its_moe_routes_to_experts(tmp_path):
    dense = AutoModelForImageTextToText.from_pretrained(make_tiny_model(tmp_path / "d", arch="qwen3_5"))
    moe = AutoModelForImageTextToText.from_pretrained(make_tiny_model(tmp_path / "m", arch="qwen3_5_moe"))

    for model in (dense, moe):
        layers = model.model.language_model.layers
        assert model.config.text_config.layer_types == ["linear_attention", "full_attention"]
        assert hasattr(layers[0], "linear_attn") and hasattr(layers[1], "self_attn")
    experts = moe.model.language_model.layers[0].mlp
    assert experts.gate.num_experts == 4 and experts.gate.top_k == 2


def test_model_vocab_size_pads_the_embedding_and_head_but_not_the_tokenizer(tiny_model_dir, tmp_path):
    padded = make_tiny_model(tmp_path / "padded", model_vocab_size=1000)
    model = AutoModelForImageTextToText.from_pretrained(padded)
    tokenizer = AutoTokenizer.from_pretrained(padded)

    assert model.get_input_embeddings().weight.shape[0] == model.lm_head.weight.shape[0] == 1000
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(tiny_model_dir)) < 1000
    assert tokenizer.decode([len(tokenizer), 999]) == ""  # rows past the tokenizer decode to nothing
    with pytest.raises(ValueError, match="model_vocab_size=10 is below"):
        make_tiny_model(tmp_path / "too_small", model_vocab_size=10)
