"""`benchmarks/gpu_check.py`, the GPU check, runs end to end on the CPU with `--tiny` and reports every number
it promises; its 3B config builds a model of Qwen2.5-VL-3B's parameter count (on the meta device: no memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
STAGE_FIELDS = ("step_median_s", "lm_tokens_per_s", "model_tflops_per_step", "mfu", "peak_memory_mib")


def test_tiny_gpu_check_writes_positive_step_time_throughput_memory_and_mfu(tmp_path):
    out = tmp_path / "tmp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out), "--workdir", str(tmp_path / "work")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip

    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    report = json.loads(out.read_text())
    assert report["lm_parameters"] > 0 and report["parameters"] > report["lm_parameters"]
    assert set(report["stages"]) == {"grpo", "dpo"}
    for name, stage in report["stages"].items():
        for field in STAGE_FIELDS:
            assert stage[field] > 0, (name, field)
        assert stage["steps_timed"] >= 1 and stage["lm_tokens_with_grad_per_step"] > 0, name
    assert report["stages"]["grpo"]["generated_tokens_per_s"] > 0
    assert "MFU" in run.stdout and "grpo: step" in run.stdout and "dpo : step" in run.stdout


def test_the_3b_config_has_qwen25_vl_3b_parameter_count(tiny_model_dir):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    from transformers import AutoModelForImageTextToText

    config = gpu_check.qwen25_vl_3b_config(tiny_model_dir)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)

    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied, as the 3B's are
    total = sum(p.numel() for p in model.parameters())
    assert 3.70e9 < total < 3.80e9  # Qwen2.5-VL-3B-Instruct: 3.75B
    assert model.config.text_config.vocab_size == 151936
    assert (model.config.text_config.num_hidden_layers, model.config.vision_config.depth) == (36, 32)


def test_build_model_writes_a_tied_bf16_model_of_the_given_sizes_that_videollm_loads(tmp_path, monkeypatch):
    """The non-tiny path of build_model on the CPU, with the 3B's sizes shrunk (its structure kept: tied
    embeddings, the 151,936-row vocabulary, bf16), loaded back through VideoLLM and scored with gradient."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    from lightning_veripo.backbone import LoRAConfig, VideoLLM

    small = {
        "tie_word_embeddings": True,
        "text_config": {**gpu_check.QWEN25_VL_3B["text_config"], "hidden_size": 64, "intermediate_size": 128,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "rope_parameters": {"rope_type": "default", "type": "mrope", "rope_theta": 1e6,
                                            "mrope_section": [2, 3, 3]}},
        "vision_config": {**gpu_check.QWEN25_VL_3B["vision_config"], "depth": 2, "hidden_size": 32,
                          "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                          "fullatt_block_indexes": [1]},
    }  # fmt: skip
    monkeypatch.setattr(gpu_check, "QWEN25_VL_3B", small)
    model_dir = gpu_check.build_model(tmp_path / "model", tiny=False, device="cpu", seed=0)
    backbone = VideoLLM(str(model_dir), dtype="bfloat16", lora=LoRAConfig(r=4, alpha=8)).load()

    hf = backbone.hf_model
    assert hf.lm_head.weight is hf.get_input_embeddings().weight
    assert hf.lm_head.weight.shape == (151936, 64) and hf.lm_head.weight.dtype == torch.bfloat16
    batch = backbone.processor(
        text=["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt"
    )
    ids = torch.tensor([[5, 6, 7, 151000]])  # a padded row of the vocabulary too
    logps = backbone.sequence_logprobs(dict(batch), ids, torch.ones_like(ids))
    logps.sum().backward()
    assert logps.dtype == torch.float32 and torch.isfinite(logps).all() and (logps < 0).all()
    assert any(p.grad is not None for n, p in backbone.model.named_parameters() if "lora_" in n)
