"""Every random state of a fit (python, numpy, torch, CUDA) in its checkpoints, restored where the run stopped.

Lightning checkpoints hold no random state, so a resumed GRPO fit samples other rollouts than the uninterrupted
one would have, and a shuffling loader draws another epoch order. `RandomStateCallback` (every VideoLLMModule
adds it through `configure_callbacks`) saves each rank's states with every checkpoint and puts them back just
before the resumed run draws its first random number where the uninterrupted one would have: when the training
loader starts its iterator (`lightning_veripo.data.resumable`), or else at the first training batch or
validation run. What happens in between (loading weights, LoRA's random init, the loader's worker seed) draws
from whatever state the process had and cannot shift the run. States are plain ints, lists and tensors, so the
checkpoint stays loadable with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

# The state a checkpoint restored, waiting for the first draw of the resumed run (one fit at a time per process).
_pending: list[dict[str, Any]] = []


def collect() -> dict[str, Any]:
    """This process's random states: python's `random`, numpy's global generator, torch's CPU and CUDA ones."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },  # fmt: skip
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore(state: dict[str, Any]) -> None:
    """Set the states `collect` returned (CUDA's only when this process has the same number of devices)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def restore_pending() -> None:
    """Restore the state a checkpoint brought, if it has not been restored yet (called at the first draw)."""
    if _pending:
        restore(_pending.pop())


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RandomStateCallback(pl.Callback):
    """Saves every rank's random states in each checkpoint; a resumed fit restores them (see the module)."""

    def state_dict(self) -> dict[str, Any]:
        # Lightning keeps rank zero's callback state only, and checkpoint saving runs on every rank: gather the
        # (few KB of) states of all ranks, so each rank resumes its own stream.
        local = collect()
        rank, world = _rank_world()
        if world == 1:
            return {"ranks": [local]}
        states: list[Any] = [None] * world
        dist.all_gather_object(states, local)
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks") or []
        rank, world = _rank_world()
        _pending.clear()
        if len(ranks) != world:
            rank_zero_warn(
                f"the checkpoint holds the random states of {len(ranks)} processes and this run has {world}: "
                "the resumed fit draws other random numbers than an uninterrupted one would"
            )
            return
        _pending.append(ranks[rank])

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is None:
            _pending.clear()  # a state left from another fit of this process is not this fit's

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:  # fmt: skip
        restore_pending()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            restore_pending()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _pending.clear()
