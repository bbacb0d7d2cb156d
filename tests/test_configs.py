"""Every YAML in configs/ parses through the real command (`--print_config`), alone or layered with a strategy.

The real-model configs point at checkpoints and GPUs this machine does not have, so they are parsed, not run;
`--print_config` still resolves every class path (modules, strategies, FSDP wrap policies, judges) and checks
every argument against the typed signatures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_veripo.cli import main

REPO = Path(__file__).resolve().parents[1]
FIT_CONFIGS = [
    "grpo.yaml",
    "dpo.yaml",
    "grpo_full_fsdp_8gpu.yaml",
    "demo_grpo.yaml",
    "demo_dpo.yaml",
    "demo_sft.yaml",
]
STRATEGIES = sorted(p.name for p in (REPO / "configs/strategies").glob("*.yaml"))
LOOP_CONFIGS = [
    ["veripo.yaml"],
    ["veripo.yaml", "judge_vllm.yaml"],
    ["demo.yaml"],
    ["demo.yaml", "demo_qwen3_5.yaml"],
    ["demo.yaml", "demo_vllm.yaml"],
]


def _printed(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as done:
        main(argv)
    out = capsys.readouterr()
    assert done.value.code in (0, None), out.err[-3000:]
    return yaml.safe_load(out.out)


def test_every_config_is_covered() -> None:
    listed = set(FIT_CONFIGS) | {c for group in LOOP_CONFIGS for c in group}
    assert {p.name for p in (REPO / "configs").glob("*.yaml")} == listed
    assert len(STRATEGIES) >= 5


@pytest.mark.parametrize("name", FIT_CONFIGS)
def test_fit_config_parses(
    name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _printed(["fit", "--config", f"configs/{name}", "--print_config"], capsys, monkeypatch)
    assert config["model"]["class_path"].startswith("lightning_veripo.")
    assert config["model"]["init_args"]["backbone"]["class_path"] == "lightning_veripo.backbone.VideoLLM"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_layers_over_the_grpo_config(
    strategy: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = [
        "fit",
        "--config",
        "configs/grpo.yaml",
        "--config",
        f"configs/strategies/{strategy}",
        "--print_config",
    ]
    config = _printed(argv, capsys, monkeypatch)
    expected = yaml.safe_load((REPO / "configs/strategies" / strategy).read_text())["trainer"]["strategy"]
    assert config["trainer"]["strategy"]["class_path"] == expected["class_path"]
    for key, value in expected["init_args"].items():
        got = config["trainer"]["strategy"]["init_args"][key]
        if isinstance(value, list):  # FSDP's wrap policies are sets of classes: any order
            got, value = sorted(got), sorted(value)
        assert got == value, key
    assert config["model"]["init_args"]["num_generations"] == 8  # the stage config is still there


def test_full_fine_tuning_config_shards_without_lora_or_reference_copy(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _printed(
        ["fit", "--config", "configs/grpo_full_fsdp_8gpu.yaml", "--print_config"], capsys, monkeypatch
    )
    backbone = config["model"]["init_args"]["backbone"]["init_args"]
    assert backbone["lora"] is None and backbone["reference_copy"] is False
    assert config["model"]["init_args"]["beta"] == 0.0
    assert config["trainer"]["devices"] == 8
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning_veripo.sharding.FSDP2Strategy"
    assert strategy["init_args"]["mixed_precision"] == "bf16"


@pytest.mark.parametrize("names", LOOP_CONFIGS, ids="+".join)
def test_loop_config_parses(names: list[str], capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    argv = ["iterate"] + [a for n in names for a in ("--config", f"configs/{n}")] + ["--print_config"]
    config = _printed(argv, capsys, monkeypatch)
    assert config["grpo"]["config"] and config["dpo"]["config"]
    for stage in ("grpo", "dpo", "sft"):
        if config.get(stage):
            assert (REPO / config[stage]["config"]).is_file()
    if "judge_vllm.yaml" in names:
        assert config["judge"]["class_path"] == "lightning_veripo.verifier.llm_judges.OpenAIJudge"
    if "demo_qwen3_5.yaml" in names:  # its own model and work directory, the demo's stages
        assert config["tiny_arch"] == "qwen3_5" and config["base_model"] != "work/demo/small-model"
        assert config["work_dir"] != "work/demo/veripo" and config["sft"]["config"] == "configs/demo_sft.yaml"
    if (
        "demo_vllm.yaml" in names
    ):  # its GRPO stage, as the loop runs it: a fit of the stage config and its args
        stage = _printed(["fit", "--config", config["grpo"]["config"], *config["grpo"]["args"], "--print_config"],
                         capsys, monkeypatch)  # fmt: skip
        init = stage["model"]["init_args"]
        assert init["rollout_engine"] == "vllm" and init["rollout_correction"] == "token"
        assert init["backbone"]["init_args"]["lora"]["target_modules"] == "language_model"
        assert (
            init["backbone"]["init_args"]["tiny_size"] == "small"
        )  # vLLM's CPU attention refuses head_dim 16


def test_a_typo_in_a_config_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "configs/grpo.yaml").read_text().replace("num_generations:", "num_generation:"))
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(bad), "--print_config"])
    assert done.value.code not in (0, None)
    assert "num_generation" in capsys.readouterr().err
