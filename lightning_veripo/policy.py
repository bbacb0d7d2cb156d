"""Which policy a checkpoint's weights belong to, and the check that refuses to load them into another.

A checkpoint holds only the trainable weights (a stage's adapter), so it records the policy they were trained
on: the base model and the adapters merged into it, in order, each with a content hash. Loading it into a
backbone built otherwise raises `PolicyMismatchError` naming the settings that rebuild the right one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

POLICY_KEY = "veripo_policy"  # where a checkpoint keeps VideoLLM.policy_identity()


class PolicyMismatchError(ValueError):
    """A checkpoint's trainable weights were trained on another base model or other merged adapters."""


_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_LORA_SETTINGS = (
    "r",
    "lora_alpha",
    "use_rslora",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
)


def _absolute(location: str) -> str:
    """An existing local path made absolute; anything else (a hub name) as it is."""
    path = Path(location).expanduser()
    return str(path.resolve()) if path.exists() else location


def _base_model_identity(location: str) -> dict[str, Any]:
    config = Path(location).expanduser() / "config.json"
    digest = hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None
    return {"path": location, "resolved": _absolute(location), "config_sha256": digest}


def _adapter_identity(location: str) -> dict[str, Any]:
    folder = Path(location).expanduser()
    digest = hashlib.sha256()
    weights = [folder / name for name in _ADAPTER_WEIGHTS if (folder / name).is_file()]
    for path in weights:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    config = folder / "adapter_config.json"
    if config.is_file():
        settings = json.loads(config.read_text())
        digest.update(json.dumps({k: settings.get(k) for k in _LORA_SETTINGS}, sort_keys=True).encode())
    sha256 = digest.hexdigest() if weights else None
    return {"path": location, "resolved": _absolute(location), "sha256": sha256}


def policy_identity(model_name_or_path: str, merge_adapters: list[str]) -> dict[str, Any]:
    """The policy of a base model with `merge_adapters` folded into it, in order: each entry keeps the
    location as given, its absolute form, and a content hash (of `config.json` for the base model, whose
    weights are too big to hash on every load; of the weights and LoRA settings for an adapter)."""
    return {
        "base_model": _base_model_identity(model_name_or_path),
        "merge_adapters": [_adapter_identity(path) for path in merge_adapters],
    }


def _describe(policy: dict[str, Any]) -> str:
    adapters = [a["resolved"] for a in policy["merge_adapters"]]
    return f"base {policy['base_model']['resolved']} + merged adapters {json.dumps(adapters)}"


def check_policy(saved: dict[str, Any], built: dict[str, Any]) -> None:
    """Raise `PolicyMismatchError` unless a checkpoint's policy (`saved`, from `policy_identity()` when it was
    written) is the one this backbone `built`: the same base model (by config.json, else by name) and the
    same merged adapters (by content) in the same order. The message names the settings that rebuild it."""
    fixes = []
    base_saved, base_built = saved["base_model"], built["base_model"]
    if base_saved.get("config_sha256") and base_built.get("config_sha256"):
        same_base = base_saved["config_sha256"] == base_built["config_sha256"]
    else:
        same_base = base_saved["resolved"] == base_built["resolved"]
    if not same_base:
        fixes.append(f"--model.init_args.backbone.init_args.model_name_or_path={base_saved['resolved']}")
    merged_saved, merged_built = saved["merge_adapters"], built["merge_adapters"]
    if [a["sha256"] for a in merged_saved] != [a["sha256"] for a in merged_built]:
        adapters = json.dumps([a["resolved"] for a in merged_saved])
        fixes.append(f"'--model.init_args.backbone.init_args.merge_adapters={adapters}'")
    if fixes:
        raise PolicyMismatchError(
            "the checkpoint's weights were trained on another policy than the one built here (its metrics "
            f"would describe neither):\n  checkpoint: {_describe(saved)}\n  built here: {_describe(built)}\n"
            "Build the checkpoint's policy with (adapters merge in this order): " + " ".join(fixes)
        )
