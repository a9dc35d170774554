"""Pretraining data: this rank's resumable shard reader as an endless batch stream.

``brainfm.data.reader.make_dataloader`` splits shards by rank itself and can save and restore its position, so a
resumed run continues exactly where it stopped instead of replaying data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from brainfm.config import PretrainConfig
from brainfm.io import BrainFMInputError
from brainfm.train.tasks import Batch


class BatchStream:
    """Endless batches over epochs of a resumable shard reader; its state is (epoch, reader position)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.epoch = 0
        self._iterator: Iterator[Batch] | None = None
        self._resumed_state: dict[str, Any] | None = None

    def next(self) -> Batch:
        empty_epochs = 0
        while True:
            if self._iterator is None:
                self.loader.set_epoch(self.epoch)
                if self._resumed_state is not None:
                    self.loader.load_state_dict(self._resumed_state)
                    self._resumed_state = None
                self._iterator = iter(self.loader)
            try:
                return next(self._iterator)
            except StopIteration:
                self.epoch += 1
                self._iterator = None
                empty_epochs += 1
                if empty_epochs > 1:
                    raise BrainFMInputError(None, "the training split yields no batches on this rank") from None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "reader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self._resumed_state = state["reader"]
        self._iterator = None


def make_loader(config: PretrainConfig, split: str, *, rank: int, world_size: int, batch_size: int | None = None,
                augment: bool = True, num_workers: int | None = None) -> Any:
    """The shard reader for this rank; ``augment=False`` forces the stored data (probes, caches, scaling)."""
    from brainfm.data.reader import make_dataloader

    data = config.data
    reader = data.reader_config() if augment else dataclasses.replace(data, augment=False).reader_config()
    return make_dataloader(
        data.shard_dir, split, mode=data.mode, batch_size=batch_size or data.batch_size, seed=config.train.seed,
        num_workers=data.num_workers if num_workers is None else num_workers, rank=rank, world_size=world_size,
        augment=reader, url_template=data.shard_url,
    )


def probe_batch(config: PretrainConfig) -> Batch:
    """One batch read outside the training stream (which it must not advance) to learn channel counts."""
    loader = make_loader(config, config.data.train_split, rank=0, world_size=1, batch_size=1, augment=False,
                         num_workers=0)
    loader.set_epoch(0)
    for batch in loader:
        return batch
    raise BrainFMInputError(Path(config.data.shard_dir), f"split {config.data.train_split!r} yields no samples")


__all__ = ["BatchStream", "make_loader", "probe_batch"]
