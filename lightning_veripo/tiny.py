"""Build a tiny, random-weight Video-LLM of a real Qwen-VL architecture, offline, into a directory.

Tests and the embedded demo cannot download checkpoints, so they use this: the real model class
(`Qwen2_5_VLForConditionalGeneration` by default; `Qwen2VLForConditionalGeneration` or
`Qwen3VLForConditionalGeneration`, `Qwen3_5ForConditionalGeneration` or
`Qwen3_5MoeForConditionalGeneration` with `arch`), the real processor classes, and a byte-level BPE tokenizer
trained in-process that carries the Qwen special tokens plus `<think>`/`</think>`/`<answer>`/`</answer>`. The
result is saved with `save_pretrained` and loads back through the same Auto classes as a real checkpoint.
A second builder makes a tiny random causal LM (Qwen2 architecture) with the same tokenizer, used as an
offline stand-in for the verifier's small judge LLM.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args

import torch

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
REASONING_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

# The Qwen2.5-VL chat template, reduced to what a video-QA conversation uses (system, user turns with
# text / image / video parts, assistant turns). Vision parts expand to the processor's placeholders.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "<think>The square is red.</think><answer>A</answer>",
    "<think>The square moves to the left, so the answer is B.</think><answer>B</answer>",
    "<think>I count 3 objects. Wait, there are 2 objects.</think><answer>2</answer>",
    "What colour is the moving square? Options: A. red B. green C. blue D. yellow",
    "Which direction does the square move? left right up down",
    "How many objects are in the video? Output the thinking process in <think> </think> and the final "
    "answer in <answer> </answer> tags.",
    "Please think about this question as if you were a human pondering deeply. Let me think, hmm, wait, "
    "so the answer is the option that matches what I saw in the frames.",
    "0 1 2 3 4 5 6 7 8 9 10 A B C D E F . , ? ! : ( )",
]


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained here on a few sentences, with the Qwen special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = QWEN_SPECIAL_TOKENS + REASONING_TOKENS
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=special[1:],
        model_max_length=8192,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Draw the random weights from `seed`, leaving the caller's torch random state as it was: a model built
    inside a seeded run (`make_tiny_if_missing` under `seed_everything`) must not reset that run's seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# Named decoder sizes. "tiny" (~210k parameters) is what the unit tests use; "small" (~0.5M) is the smallest that
# learns to read the synthetic videos within a few hundred supervised steps on 2 CPU cores (the effectiveness
# lab and the demo; see benchmarks/RESULTS.md, loop_vs_grpo): the tiny one stays blind for 1200+ steps.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "num_layers": 2},
    "small": {"hidden_size": 128, "num_layers": 2},
}
Arch = Literal["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5", "qwen3_5_moe"]
ARCHS: tuple[str, ...] = get_args(Arch)


def _decoder_dims(vocab_size: int, hidden_size: int, num_layers: int) -> dict[str, int]:
    """The sizes of a tiny Qwen decoder: 4 attention heads sharing 2 key/value heads, MLP twice as wide."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


def _vl_config(
    arch: str, tok: Any, hidden_size: int, num_layers: int, vision_depth: int, vocab_rows: int
) -> Any:
    """The model config of one tiny Qwen-VL architecture, wired to the tokenizer's special tokens."""
    import transformers

    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    special_ids = {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    head_dim = hidden_size // 4
    text = dict(
        **_decoder_dims(vocab_rows, hidden_size, num_layers),
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        **special_ids,
    )
    # the multimodal rotary embedding splits head_dim / 2 frequencies into (time, height, width) sections
    mrope = {"type": "mrope", "mrope_section": [head_dim // 8, head_dim // 8, head_dim // 4]}
    if arch == "qwen2_5_vl":
        config_class = transformers.Qwen2_5_VLConfig
        text.update(rope_scaling=mrope)
        vision = dict(
            depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2,
            out_hidden_size=hidden_size,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
            fullatt_block_indexes=[vision_depth - 1],
        )  # fmt: skip
    elif arch == "qwen2_vl":
        config_class = transformers.Qwen2VLConfig
        text.update(rope_scaling=mrope)
        vision = dict(
            depth=vision_depth, embed_dim=32, mlp_ratio=2, num_heads=2, hidden_size=hidden_size,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        )  # fmt: skip
    elif arch in ("qwen3_5", "qwen3_5_moe"):
        config_class = transformers.Qwen3_5Config if arch == "qwen3_5" else transformers.Qwen3_5MoeConfig
        text.update(_qwen3_5_text(arch, hidden_size, num_layers))
        if arch == "qwen3_5_moe":
            text.pop("intermediate_size")  # its MLPs are the experts
        vision = dict(
            depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2,
            out_hidden_size=hidden_size,
            patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
        )  # fmt: skip
    elif arch == "qwen3_vl":
        config_class = transformers.Qwen3VLConfig
        half = head_dim // 2
        text.update(
            head_dim=head_dim,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_interleaved": True,
                             "mrope_section": [half - 2 * (half // 4), half // 4, half // 4]},
        )  # fmt: skip
        vision = dict(
            depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2,
            out_hidden_size=hidden_size,
            patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
            deepstack_visual_indexes=[vision_depth - 1],
        )  # fmt: skip
    else:
        raise ValueError(f"make_tiny_model: unknown arch={arch!r}; expected one of {ARCHS}")
    return config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        **({} if arch.startswith("qwen3") else special_ids),  # Qwen3-VL and 3.5 keep them in text_config only
    )


def _qwen3_5_text(arch: str, hidden_size: int, num_layers: int) -> dict[str, Any]:
    """Qwen3.5's decoder settings: Gated-DeltaNet linear-attention layers with one full-attention layer in
    every `full_attention_interval` (the last of each group, as in the real checkpoints, so a 2-layer decoder
    has one of each), rotary positions on a quarter of each head (`partial_rotary_factor` 0.25) split into
    interleaved (time, height, width) sections. Its rope_theta is 10,000, not the checkpoints' 10,000,000: on a
    4-frequency quarter that base leaves one frequency turning within a short prompt, and a tiny model that cannot
    tell positions apart loops ("so the answer is red, so the answer is red, ...") after a warm start that teaches
    the others the format. The MoE variant replaces each MLP by 4 experts, 2 per token,
    and a shared expert."""
    head_dim = 32  # the rotary quarter then has 4 frequencies for the 3 M-RoPE sections
    settings: dict[str, Any] = dict(
        head_dim=head_dim,
        layer_types=[
            "full_attention" if (i + 1) % min(4, num_layers) == 0 else "linear_attention" for i in range(num_layers)
        ],
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                         "mrope_interleaved": True, "mrope_section": [2, 1, 1]},
    )  # fmt: skip
    if arch == "qwen3_5_moe":
        settings.update(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=hidden_size,
            shared_expert_intermediate_size=hidden_size,
        )
    return settings


def _vl_processor(arch: str, tok: Any) -> Any:
    """The real processor classes of `arch`, sized for small frames: 4..16 merged-patch cells per frame."""
    import transformers

    qwen3 = arch.startswith("qwen3")  # Qwen3-VL and Qwen3.5 share Qwen3-VL's processor
    patch = 16 if qwen3 else 14
    cell = 2 * patch  # one LLM token covers 2x2 patches
    pixels = {"shortest_edge": (2 * cell) ** 2, "longest_edge": (4 * cell) ** 2}
    # Qwen3-VL normalises with mean = std = 0.5 where Qwen2(.5)-VL use the CLIP statistics
    norm = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if qwen3 else {}
    image_processor = transformers.Qwen2VLImageProcessor(size=pixels, patch_size=patch, **norm)
    video_class = transformers.Qwen2VLVideoProcessor
    if qwen3:
        video_class = transformers.Qwen3VLVideoProcessor
    video_processor = video_class(size=pixels, patch_size=patch, cap_pixels_per_frame=True)
    processor_class = {
        "qwen2_5_vl": transformers.Qwen2_5_VLProcessor,
        "qwen2_vl": transformers.Qwen2VLProcessor,
        "qwen3_vl": transformers.Qwen3VLProcessor,
        "qwen3_5": transformers.Qwen3VLProcessor,
        "qwen3_5_moe": transformers.Qwen3VLProcessor,
    }[arch]
    return processor_class(
        image_processor=image_processor,
        video_processor=video_processor,
        tokenizer=tok,
        chat_template=CHAT_TEMPLATE,
    )


def make_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_depth: int = 1,
    vocab_size: int = 512,
    arch: Arch = "qwen2_5_vl",
    size: str | None = None,
    model_vocab_size: int | None = None,
) -> Path:
    """Write a tiny random Qwen-VL (model, tokenizer, processor) to `out_dir`; deterministic per seed.

    `size` names a preset of SIZES ("tiny", "small") that sets `hidden_size` and `num_layers`.
    `vocab_size` is what the tokenizer is trained to (the few sentences it learns from stop it near 490);
    `model_vocab_size` pads the embedding and LM head to that many rows, as real checkpoints pad theirs
    (Qwen2.5-VL: 151,936 rows for 151,665 tokens), to measure the cost of a real vocabulary. Rows past the
    tokenizer's decode to nothing.

    `arch` picks the architecture: "qwen2_5_vl" (Qwen2.5-VL, the default), "qwen2_vl" (Qwen2-VL) or
    "qwen3_vl" (Qwen3-VL, dense), "qwen3_5" (Qwen3.5: Gated-DeltaNet linear attention mixed with full
    attention) or "qwen3_5_moe" (Qwen3.5's mixture-of-experts variant). Loadable with `AutoModelForImageTextToText.from_pretrained(out_dir)` and
    `AutoProcessor.from_pretrained(out_dir)`.
    """
    from transformers import AutoModelForImageTextToText

    if size is not None:
        if size not in SIZES:
            raise ValueError(f"make_tiny_model: unknown size={size!r}; expected one of {sorted(SIZES)}")
        hidden_size, num_layers = SIZES[size]["hidden_size"], SIZES[size]["num_layers"]
    tok = build_tokenizer(vocab_size)
    if model_vocab_size is not None and model_vocab_size < len(tok):
        raise ValueError(
            f"make_tiny_model: model_vocab_size={model_vocab_size} is below the tokenizer's {len(tok)} tokens"
        )
    rows = model_vocab_size or len(tok)
    config = _vl_config(arch, tok, hidden_size, num_layers, vision_depth, rows)  # an unknown arch raises here
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _seeded(seed):
        model = AutoModelForImageTextToText.from_config(config).eval()
    text_config = config.get_text_config()
    model.generation_config.eos_token_id = text_config.eos_token_id
    model.generation_config.pad_token_id = text_config.pad_token_id
    model.generation_config.bos_token_id = text_config.bos_token_id
    model.save_pretrained(out)
    _vl_processor(arch, tok).save_pretrained(out)
    return out


def make_tiny_causal_lm(
    out_dir: str | Path, seed: int = 0, hidden_size: int = 64, num_layers: int = 2
) -> Path:
    """Write a tiny random text-only causal LM (Qwen2 architecture) + tokenizer, e.g. as an offline judge."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        **_decoder_dims(len(tok), hidden_size, num_layers),
        max_position_embeddings=4096,
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    with _seeded(seed):
        model = Qwen2ForCausalLM(config).eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
