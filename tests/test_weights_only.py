"""Checkpoints are loaded weights-only: one that carries a pickle which would run code (an object whose
`__reduce__` writes a file) is refused by `checkpoint_rollouts` / `verify_checkpoint` and by `veripo test
--ckpt_path`, a local file or a URL (for which Lightning would default to a full unpickle), and the code never
runs. The library's own checkpoints keep loading (tests/test_verifier_callback.py, test_cli_grpo.py)."""

from __future__ import annotations

import functools
import http.server
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lightning_veripo.callbacks.verifier import checkpoint_rollouts, verify_checkpoint
from lightning_veripo.cli import main


class WritesAFile:
    """Unpickling this runs `exec`, which writes `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.fixture
def evil_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callbacks": {"VerifierCallback": {"spool": WritesAFile(marker)}},
                "global_step": 0}, path)  # fmt: skip
    return path, marker


def test_the_payload_is_live_when_unpickled_in_full(evil_checkpoint):
    path, marker = evil_checkpoint
    torch.load(path, weights_only=False)  # what the loaders must never do
    assert marker.read_text() == "pwned"


def test_checkpoint_rollouts_and_verify_checkpoint_refuse_a_checkpoint_that_would_run_code(evil_checkpoint):
    path, marker = evil_checkpoint
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        list(checkpoint_rollouts(path))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        verify_checkpoint(path, path.parent / "verifier", progress=False)
    assert not marker.exists() and not (path.parent / "verifier").exists()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """An HTTP server on loopback serving `tmp_path`; yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("where", ["file", "url"])
def test_veripo_test_refuses_a_ckpt_path_that_would_run_code(
    evil_checkpoint, served, where, tiny_model_dir, synthetic_dir, monkeypatch
):
    path, marker = evil_checkpoint
    monkeypatch.setenv("TORCH_HOME", str(path.parent / "torch_home"))  # where a URL checkpoint is downloaded
    monkeypatch.chdir(path.parent)
    ckpt = str(path) if where == "file" else f"{served}/{path.name}"
    repo = Path(__file__).resolve().parents[1]
    args = ["test", "--config", str(repo / "configs/demo_grpo.yaml"),
            f"--model.init_args.backbone.init_args.model_name_or_path={tiny_model_dir}",
            "--data.init_args.synthetic=null", f"--data.init_args.train_path={synthetic_dir}/train.json",
            f"--data.init_args.val_path={synthetic_dir}/val.json",
            f"--data.init_args.test_path={synthetic_dir}/val.json",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--ckpt_path", ckpt]  # fmt: skip
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        main(args)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):  # not even when asked
        main([*args, "--weights_only=false"])
    assert not marker.exists()
