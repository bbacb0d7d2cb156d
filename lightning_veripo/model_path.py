"""Where a model is: a local directory or a hub name, and a clear error for a path that is neither."""

from __future__ import annotations

import os
from pathlib import Path

_TRUE = {"1", "on", "yes", "true"}
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _hub_offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in _OFFLINE_VARIABLES)


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the hub cache holds this repo's config.json (what an offline load needs first)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # not a valid repo id, or no hub client: nothing cached under that name
        return False


def resolve_model_path(name_or_path: str) -> str:
    """A model location for `from_pretrained`: an existing local directory (`~` expanded) or a hub name.

    A missing local path raises FileNotFoundError at once instead of being sent to the hub as a repo id
    (where it fails only after network retries): when it is absolute, starts with `.` or `~`, has no `/` or
    more than one, or its first component is a local directory; and any missing location while the hub is
    offline (`HF_HUB_OFFLINE=1` / `TRANSFORMERS_OFFLINE=1`) unless the hub cache holds it. An `owner/name`
    that is not a local path goes to transformers, which resolves it on the hub.
    """
    text = str(name_or_path)
    local = Path(text).expanduser()
    if local.exists():
        return str(local)
    parts = text.split("/")
    looks_local = (
        local.is_absolute() or text.startswith((".", "~")) or len(parts) != 2 or Path(parts[0]).is_dir()
    )
    if looks_local or (_hub_offline() and not _in_hub_cache(text)):
        why = (
            "it does not exist"
            if looks_local
            else "it does not exist locally, and the hub is offline (HF_HUB_OFFLINE) with no cached copy"
        )
        raise FileNotFoundError(
            f"VideoLLM: model_name_or_path={text!r} is not a model directory: {why}. Build the offline tiny "
            "model there with `veripo make-tiny-model DIR`, or pass `make_tiny_if_missing=True` to build it "
            "on first load (demo only); a hub model is named `owner/name`."
        )
    return text
