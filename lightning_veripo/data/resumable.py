"""The data modules' loaders: a training DataLoader that resumes mid-epoch (a checkpoint records how far into the
epoch's order it got), and evaluation loaders that keep the user's order under DDP.

Lightning 2.6 restores its loops' batch counters from a checkpoint but asks the loader for a fresh iterator, so
a plain DataLoader replays the epoch from its first batch (a fit preempted at step 5 trains steps 5-7 on the
batches of steps 0-2). Lightning does save and restore the state of a loader that has `state_dict` /
`load_state_dict` (`fit_loop.state_dict()["combined_loader"]`); this loader's state is the epoch's shuffling
seed and the number of batches it has handed out. A resumed iterator rebuilds the same order and starts after
those batches, skipping them by index (no video of a skipped batch is decoded). The count is exact because
Lightning does not prefetch from a loader of known length, and it counts what the loader yields (not what
worker processes prefetched).

Without a checkpoint the order is the one torch gives: a shuffling epoch draws its seed from torch's global
random state exactly as `RandomSampler` does (so seeded runs keep the order they had), and under DDP the
`DistributedSampler` (seed + epoch) order, which Lightning keeps because it is one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from lightning_veripo import random_state


class EpochSampler(Sampler[int]):
    """Sequential or shuffled indices of a data set, each shuffled epoch from a seed drawn from torch's global
    random state as `RandomSampler` draws it; `start_at(seed, skip)` makes the next epoch that seed's order
    from item `skip` on."""

    def __init__(self, data_source: Sized, shuffle: bool) -> None:
        self.data_source = data_source
        self.shuffle = shuffle
        self.epoch_seed: int | None = None
        self._resume: tuple[int | None, int] | None = None

    def start_at(self, seed: int | None, skip: int) -> None:
        self._resume = (seed, skip)

    def __len__(self) -> int:
        return len(self.data_source)

    def __iter__(self) -> Iterator[int]:
        n = len(self.data_source)
        seed, skip = self._resume if self._resume is not None else (None, 0)
        self._resume = None
        if not self.shuffle:
            self.epoch_seed = None
            yield from range(skip, n)
            return
        if seed is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
        self.epoch_seed = seed
        generator = torch.Generator()
        generator.manual_seed(seed)
        yield from torch.randperm(n, generator=generator).tolist()[skip:]


class ResumableDistributedSampler(DistributedSampler):
    """`DistributedSampler` (its order is a function of seed and epoch) whose next epoch can skip items."""

    epoch_seed = None
    _skip = 0

    def start_at(self, seed: int | None, skip: int) -> None:
        self._skip = skip

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return iter(list(super().__iter__())[skip:])


class ResumableDataLoader(DataLoader):
    """A DataLoader whose `state_dict` (the epoch's seed, the batches handed out) Lightning saves in checkpoints,
    and whose next iterator after `load_state_dict` continues that epoch. Its sampler must be an `EpochSampler`
    or a `ResumableDistributedSampler` (see `resumable_order`)."""

    _batches = 0
    _pending: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        pending, self._pending = self._pending, None
        start = 0
        if pending is not None and 0 < int(pending["batches"]) < len(self):
            start = int(pending["batches"])
            self.sampler.start_at(pending.get("seed"), start * int(self.batch_size or 1))
        self._batches = start
        if start:
            # mid-epoch, the uninterrupted run drew nothing here: keep the iterator's worker-seed draw off the
            # global state, which the checkpoint's states then replace
            with torch.random.fork_rng(devices=[]):
                iterator = super().__iter__()
            random_state.restore_pending()
        else:
            # a new epoch draws its order (and worker seed) from the random state the run had at this point
            random_state.restore_pending()
            iterator = super().__iter__()
        for batch in iterator:
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self._batches, "seed": getattr(self.sampler, "epoch_seed", None)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(self.sampler, (EpochSampler, ResumableDistributedSampler)):
            raise TypeError(
                f"ResumableDataLoader: its sampler is a {type(self.sampler).__name__}, which cannot start "
                "part-way through an epoch; build it with resumable_order()"
            )
        self._pending = dict(state)


def resumable_order(dataset: Sized, shuffle: bool, trainer: Any, seed: int) -> dict[str, Any]:
    """The `sampler=` argument of a ResumableDataLoader: one device, or one DDP rank's share."""
    world = getattr(trainer, "world_size", 1) if trainer is not None else 1
    if world <= 1:
        return {"sampler": EpochSampler(dataset, shuffle)}
    sampler = ResumableDistributedSampler(
        dataset,  # type: ignore[arg-type]
        num_replicas=world,
        rank=trainer.global_rank,
        shuffle=shuffle,
        seed=seed,
    )
    return {"sampler": sampler}


def global_seed() -> int:
    """What `seed_everything` set, as Lightning's own DistributedSampler uses."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def order(dataset: Sized, shuffle: bool, trainer: Any) -> dict[str, Any]:
    """DataLoader arguments that keep the user's `shuffle` under DDP/FSDP/DeepSpeed as well.

    Lightning replaces a training loader's sampler by a `DistributedSampler` with shuffling forced on; a
    `DistributedSampler` we build ourselves is kept, so `shuffle: false` means the same order on one device and
    on many (rank r takes items r, r + world, ...: the global batch k is the single-device batch k).
    """
    world = getattr(trainer, "world_size", 1) if trainer is not None else 1
    if world <= 1:
        return {"shuffle": shuffle}
    sampler = DistributedSampler(
        dataset,  # type: ignore[arg-type]
        num_replicas=world,
        rank=trainer.global_rank,
        shuffle=shuffle,
        seed=global_seed(),
    )
    return {"sampler": sampler}


def split_loader(
    dataset: Sized,
    split: str,
    trainer: Any,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    collate_fn: Callable[[list[Any]], Any],
) -> DataLoader:
    """A data module's loader for `split`: the training loader resumes mid-epoch from a checkpoint, the others
    keep the user's order on any number of ranks."""
    loader, sampler = (
        (ResumableDataLoader, resumable_order(dataset, shuffle, trainer, global_seed()))
        if split == "train"
        else (DataLoader, order(dataset, shuffle, trainer))
    )
    return loader(dataset, batch_size=batch_size, **sampler, num_workers=num_workers, collate_fn=collate_fn)  # type: ignore[arg-type]
