"""Chunked completion log-probs (`VideoLLM(logprob_chunk_tokens=...)`) equal the unchunked pass
(`logprob_chunk_tokens=None`, the model's own forward with `logits_to_keep`) in values and gradients, on the
three tiny architectures, and never create the logits of more than one chunk of tokens at a time.

Both sides are the real code path: the same backbone scores the same completions twice, switching only the
knob. Completions are forced (random text tokens) with rows of different lengths, one of them empty, so the
padding the chunked path skips is exercised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import perturb_lora
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_veripo.backbone import VideoLLM
from lightning_veripo.completions import FORBIDDEN_GENERATION_TOKENS
from lightning_veripo.data.videoqa import FrameSampling, VideoQACollator, VideoQADataset
from lightning_veripo.logprobs import chunked_logprobs, selective_log_softmax
from lightning_veripo.lora import LoRAConfig
from lightning_veripo.tiny import ARCHS, make_tiny_model

G = 3  # completions per prompt: 2 prompts -> 6 rows
T = 9  # completion tokens
CHUNK = 4  # divides neither the 6 x 9 positions nor the unmasked count
LENGTHS = [9, 4, 0, 7, 1, 9]  # tokens per row; row 2 is all padding


@pytest.fixture(scope="module", params=ARCHS)
def arch_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if request.param == "qwen2_5_vl":
        return request.getfixturevalue("tiny_model_dir")
    return make_tiny_model(tmp_path_factory.mktemp(f"tiny_{request.param}"), seed=0, arch=request.param)


def _load(model_dir: Path, lora: LoRAConfig | None, shared_prefill: bool = False, **options: Any) -> VideoLLM:
    """The per-row scoring pass by default, so that the two sides differ in the chunking only (the shared
    prompt pass, `tests/test_shared_prefill.py`, is checked against the per-row one there)."""
    backbone = VideoLLM(str(model_dir), lora=lora, shared_prefill=shared_prefill, **options).load()
    perturb_lora(backbone)  # a non-zero adapter, so policy and reference differ
    return backbone


def _batch(backbone: VideoLLM, synthetic_dir: Path) -> dict[str, Any]:
    video = backbone.processor.video_processor
    side = 2 * video.patch_size * video.merge_size
    sampling = FrameSampling(num_frames=4, min_pixels=side * side, max_pixels=side * side)
    dataset = VideoQADataset(synthetic_dir / "train.json", sampling=sampling)
    return VideoQACollator(backbone.processor, sampling)([dataset[0], dataset[1]])


def _completions(backbone: VideoLLM) -> tuple[torch.Tensor, torch.Tensor]:
    """Random text tokens [6, T] (no vision placeholders), right-padded to LENGTHS."""
    forbidden = set(backbone.token_ids(FORBIDDEN_GENERATION_TOKENS))
    allowed = torch.tensor([i for i in range(len(backbone.tokenizer)) if i not in forbidden])
    gen = torch.Generator().manual_seed(1)
    ids = allowed[torch.randint(len(allowed), (len(LENGTHS), T), generator=gen)]
    mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    return ids.masked_fill(mask == 0, backbone.pad_token_id), mask


def _score(
    backbone: VideoLLM, batch: dict, chunk: int | None, reference: bool = False, temperature: float = 1.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Log-probs with `logprob_chunk_tokens=chunk`, and the trainable weights' gradients of a weighted sum."""
    backbone.logprob_chunk_tokens = chunk
    backbone.model.zero_grad(set_to_none=True)
    ids, mask = _completions(backbone)
    logps = backbone.sequence_logprobs(batch, ids, mask, G, reference=reference, temperature=temperature)
    if reference:
        return logps, {}
    weights = torch.linspace(-1.0, 2.0, logps.numel()).view_as(logps)  # every token's gradient differs
    (logps * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in backbone.model.named_parameters() if p.grad is not None}
    return logps.detach(), grads


def _assert_same(chunked: tuple, unchunked: tuple) -> None:
    (values, grads), (expected, expected_grads) = chunked, unchunked
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=0)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_equal_unchunked_values_and_lora_gradients(arch_dir, synthetic_dir, temperature):
    backbone = _load(arch_dir, LoRAConfig(r=4, alpha=8))
    batch = _batch(backbone, synthetic_dir)

    chunked = _score(backbone, batch, CHUNK, temperature=temperature)
    unchunked = _score(backbone, batch, None, temperature=temperature)

    _assert_same(chunked, unchunked)
    assert chunked[1] and all("lora_" in name for name in chunked[1])
    ids, mask = _completions(backbone)
    assert (chunked[0][mask == 0] == 0).all() and (chunked[0][mask == 1] < 0).all()


def test_chunked_logprobs_equal_unchunked_under_full_finetuning_with_head_gradients(arch_dir, synthetic_dir):
    backbone = _load(arch_dir, None, gradient_checkpointing=True)
    batch = _batch(backbone, synthetic_dir)

    chunked = _score(backbone, batch, CHUNK, temperature=0.7)
    unchunked = _score(backbone, batch, None, temperature=0.7)

    _assert_same(chunked, unchunked)
    assert any("lm_head" in name for name in chunked[1]) and any(
        "embed_tokens" in name for name in chunked[1]
    )


@pytest.mark.parametrize("lora", [True, False], ids=["adapter-disabled", "frozen-copy"])
def test_chunked_reference_logprobs_equal_unchunked(arch_dir, synthetic_dir, lora):
    backbone = _load(arch_dir, LoRAConfig(r=4, alpha=8) if lora else None)
    batch = _batch(backbone, synthetic_dir)

    chunked, _ = _score(backbone, batch, CHUNK, reference=True, temperature=0.7)
    unchunked, _ = _score(backbone, batch, None, reference=True, temperature=0.7)
    policy, _ = _score(backbone, batch, CHUNK, temperature=0.7)

    assert not chunked.requires_grad
    torch.testing.assert_close(chunked, unchunked, atol=1e-5, rtol=0)
    if lora:
        assert (policy - chunked).abs().max() > 1e-3


def test_lora_on_the_lm_head_gets_the_unchunked_gradients(tiny_model_dir, synthetic_dir):
    targets = r".*language_model.*\.(q_proj|v_proj)|.*lm_head"
    backbone = _load(tiny_model_dir, LoRAConfig(r=4, alpha=8, target_modules=targets))
    batch = _batch(backbone, synthetic_dir)

    chunked = _score(backbone, batch, CHUNK)
    unchunked = _score(backbone, batch, None)

    _assert_same(chunked, unchunked)
    assert any("lm_head.lora_A" in name for name in chunked[1])


class LargestVocabularyTensor(TorchDispatchMode):
    """Records the most rows of any tensor an op creates whose last dimension is the vocabulary (views of
    existing tensors, such as the LM head's transposed weight, are not allocations and are skipped)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.rows = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab:
                    self.rows = max(self.rows, t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("head", ["linear", "lora"])
def test_no_pass_creates_logits_of_more_than_one_chunk_forward_or_backward(
    tiny_model_dir, synthetic_dir, head
):
    targets = r".*language_model.*\.(q_proj|v_proj)" + (r"|.*lm_head" if head == "lora" else "")
    backbone = _load(tiny_model_dir, LoRAConfig(r=4, alpha=8, target_modules=targets), shared_prefill=True)
    batch = _batch(backbone, synthetic_dir)
    vocab = backbone.hf_model.get_output_embeddings().weight.shape[0]
    seen = {}
    for chunk in (CHUNK, None):
        with LargestVocabularyTensor(vocab) as mode:
            _score(backbone, batch, chunk, temperature=0.7)
        seen[chunk] = mode.rows

    assert seen[CHUNK] == CHUNK
    assert seen[None] >= len(LENGTHS) * T  # the unchunked pass: every row's every position at once


@pytest.mark.parametrize("setting", ["float32+bias", "bfloat16", "autocast-bfloat16"])
def test_chunked_logprobs_of_a_linear_head_equal_autograd_through_the_whole_logits(setting):
    """The hand-written backward against autograd through `selective_log_softmax` of the whole logits, in
    the dtypes a real run uses: bf16 weights, and float32 weights under bf16 autocast (bf16-mixed). In bf16
    the head's weight gradient is rounded to bf16 once per chunk before the chunks are summed, once in all
    for the whole logits: the two differ by up to one bf16 step (0.016 on gradients of ~5 here)."""
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if setting == "bfloat16" else torch.float32
    head = torch.nn.Linear(16, 50, bias=setting == "float32+bias").to(dtype)
    hidden0 = torch.randn(3, 5, 16, generator=gen).to(dtype)
    targets = torch.randint(50, (3, 5), generator=gen)
    mask = (torch.arange(5)[None, :] < torch.tensor([5, 2, 4])[:, None]).long()
    weights = torch.randn(3, 5, generator=gen)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting == "autocast-bfloat16")
    results = []
    for chunked in (True, False):
        head.zero_grad(set_to_none=True)
        hidden = hidden0.clone().requires_grad_(True)
        with autocast:
            if chunked:
                logps = chunked_logprobs(hidden, head, targets, mask, temperature=0.7, chunk_tokens=3)
            else:
                logps = selective_log_softmax(head(hidden).float() / 0.7, targets) * mask
        (logps * weights).sum().backward()
        grads = [hidden.grad] + [p.grad for p in head.parameters()]
        results.append((logps.detach(), grads))

    (values, grads), (expected, expected_grads) = results
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if setting == "float32+bias" else {"atol": 2e-2, "rtol": 1e-2}
    torch.testing.assert_close(values, expected, **tolerance)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert grad.dtype == expected_grad.dtype
        torch.testing.assert_close(grad, expected_grad, **tolerance)


def test_all_padding_scores_zero_and_still_backpropagates(tiny_model_dir, synthetic_dir):
    backbone = _load(tiny_model_dir, LoRAConfig(r=4, alpha=8))
    batch = _batch(backbone, synthetic_dir)
    ids, mask = _completions(backbone)

    logps = backbone.sequence_logprobs(batch, ids, torch.zeros_like(mask), G)
    logps.sum().backward()

    assert logps.shape == ids.shape and (logps == 0).all()


def test_a_chunk_size_below_one_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="logprob_chunk_tokens=0"):
        VideoLLM(str(tiny_model_dir), logprob_chunk_tokens=0)
