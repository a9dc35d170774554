"""Exactly-resumable streaming of WebDataset shards written by ``brainfm.data.writer``.

The order of an epoch is computed from ``index.json`` alone as a pure function of (seed, epoch, position):
shards are permuted, then volumes within a shard, then (2D) axial slices within windows of a few volumes.
Every rank gets an equal contiguous range of that sequence, so DDP ranks always run the same number of
batches, and batch ``b`` is produced by DataLoader worker ``b mod num_workers``, which makes the batch
sequence independent
of the worker count and lets ``load_state_dict`` resume at an exact batch.

Samples are decoded by webdataset's own ``.npy`` and ``.json`` handlers and nothing else: numpy's reader
refuses object arrays (``allow_pickle=False``), and pickle/torch members are never decoded, so a shard cannot
run code.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import shlex
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds

from brainfm.config import ReaderConfig
from brainfm.data.writer import INDEX_NAME, load_index
from brainfm.io import BrainFMInputError

log = logging.getLogger(__name__)

REQUIRED_MEMBERS = ("image.npy", "mask.npy", "anatomy.npy", "meta.json")
LATENT_MEMBERS = ("latent_mean.npy", "latent_std.npy", "mask.npy", "anatomy.npy", "meta.json")  # brainfm.data.latents
ARRAY_MEMBERS = ("image.npy", "latent_mean.npy", "latent_std.npy", "mask.npy", "anatomy.npy", "label.npy")
VOLUME_NAMES = ("image", "latent_mean", "latent_std", "mask", "anatomy")  # batched as tensors
_DECODER = wds.autodecode.Decoder(  # npy and json only: no pre/post handlers (gzip, pickle, torch, images)
    [
        wds.autodecode.handle_extension("npy", wds.autodecode.npy_loads),
        wds.autodecode.handle_extension("json", json.loads),
    ],
    pre=[],
    post=[],
    only=[*ARRAY_MEMBERS, "meta.json"],
)


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    url: str
    name: str
    keys: tuple[str, ...]
    slice_brain_voxels: tuple[tuple[int, ...], ...]

    @property
    def n_samples(self) -> int:
        return len(self.keys)


def _threshold_voxels(min_brain_fraction: float, grid_shape: Sequence[int]) -> int:
    """Integer brain-voxel threshold per axial slice: index counts and decoded masks use the same test."""
    return max(0, math.ceil(min_brain_fraction * grid_shape[0] * grid_shape[1] - 1e-9))


def _local_tar(url: str) -> Path | None:
    if url.startswith("pipe:"):
        for token in reversed(shlex.split(url[5:])):
            if token.endswith(".tar") and Path(token).is_file():
                return Path(token)
        return None
    if url.startswith("file:"):
        url = url[5:]
    return Path(url) if "://" not in url else None


def shard_urls(template: str, names: Sequence[str]) -> list[str]:
    """``template`` with ``{name}`` replaced by each shard's file name, e.g.
    ``pipe:curl -fsS --connect-timeout 10 --speed-time 60 --speed-limit 1024 http://host:8000/shards/{name}``."""
    if "{name}" not in template:
        raise BrainFMInputError(None, f"shard URL template {template!r} has no {{name}} placeholder")
    return [template.replace("{name}", name) for name in names]


def resolve_shards(
    source: str | os.PathLike | Sequence[str],
    split: str,
    index: str | os.PathLike | None = None,
    url_template: str | None = None,
) -> tuple[list[ShardInfo], dict]:
    """Shard URLs + their index entries from a shard directory, a brace pattern, a list, or ``pipe:`` URLs.

    The index (counts, keys, per-slice brain voxels) is what makes the epoch plan exact; for URLs it is the
    ``index.json`` beside the first local tar unless ``index`` is given. With ``url_template`` (see
    :func:`shard_urls`) the shard directory only needs its ``index.json``: the shards are read from the URLs,
    e.g. streamed over HTTP from a server every node can reach.
    """
    if isinstance(source, str | os.PathLike) and Path(source).is_dir():
        folder = Path(source)
        idx = load_index(index or folder)
        if split not in idx["splits"]:
            raise BrainFMInputError(folder / INDEX_NAME, f"no split {split!r}; have {sorted(idx['splits'])}")
        entries = idx["splits"][split]
        names = [e["name"] for e in entries]
        urls = shard_urls(url_template, names) if url_template else [str(folder / n) for n in names]
    else:
        import braceexpand

        patterns = [str(source)] if isinstance(source, str | os.PathLike) else [str(s) for s in source]
        urls = [u for pattern in patterns for u in braceexpand.braceexpand(pattern)]
        if not urls:
            raise BrainFMInputError(None, "no shard URLs given")
        if index is None:
            local = next((p for p in map(_local_tar, urls) if p is not None), None)
            if local is None:
                raise BrainFMInputError(urls[0], "cannot locate index.json for these URLs; pass index=")
            index = local.parent
        idx = load_index(index)
        by_name = {e["name"]: e for shards in idx["splits"].values() for e in shards}
        entries = []
        for url in urls:
            local = _local_tar(url)
            name = local.name if local is not None else url.rstrip("/").rsplit("/", 1)[-1].split()[-1]
            if name not in by_name:
                raise BrainFMInputError(url, f"shard {name!r} is not listed in the index")
            entries.append(by_name[name])
    infos = [
        ShardInfo(url, e["name"], tuple(e["keys"]), tuple(tuple(v) for v in e["slice_brain_voxels"]))
        for url, e in zip(urls, entries, strict=True)
    ]
    return infos, idx


@dataclasses.dataclass
class EpochPlan:
    """The items of one rank for one epoch: shard index, sample index in that shard, eligible-slice rank
    (-1 in 3D), and the item's position in the global epoch sequence (seeds its augmentation)."""

    shard: np.ndarray
    sample: np.ndarray
    slice_rank: np.ndarray
    position: np.ndarray
    batch_size: int
    drop_last: bool

    @property
    def n_batches(self) -> int:
        n = len(self.shard)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batch(self, b: int) -> slice:
        return slice(b * self.batch_size, (b + 1) * self.batch_size)


def epoch_plan(
    shards: Sequence[ShardInfo],
    *,
    seed: int,
    epoch: int,
    mode: Literal["2d", "3d"],
    threshold_voxels: int,
    window: int,
    rank: int,
    world_size: int,
    batch_size: int,
    drop_last: bool,
) -> EpochPlan:
    """The pure function (seed, epoch) -> item order, then this rank's equal-length contiguous share."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    parts_shard, parts_sample, parts_rank = [], [], []
    for s in order:
        info = shards[s]
        rng = np.random.default_rng([seed, epoch, int(s)])
        volumes = rng.permutation(info.n_samples)
        if mode == "3d":
            parts_shard.append(np.full(len(volumes), s))
            parts_sample.append(volumes)
            parts_rank.append(np.full(len(volumes), -1))
            continue
        eligible = np.array(
            [int((np.asarray(v) >= threshold_voxels).sum()) for v in info.slice_brain_voxels], dtype=np.int64
        )
        for start in range(0, len(volumes), window):
            vols = volumes[start : start + window]
            counts = eligible[vols]
            total = int(counts.sum())
            sample = np.repeat(vols, counts)
            offsets = np.repeat(np.cumsum(counts) - counts, counts)
            slice_rank = np.arange(total) - offsets
            perm = rng.permutation(total)
            parts_shard.append(np.full(total, s))
            parts_sample.append(sample[perm])
            parts_rank.append(slice_rank[perm])
    shard_col = np.concatenate(parts_shard) if parts_shard else np.zeros(0, dtype=np.int64)
    sample_col = np.concatenate(parts_sample) if parts_sample else np.zeros(0, dtype=np.int64)
    rank_col = np.concatenate(parts_rank) if parts_rank else np.zeros(0, dtype=np.int64)
    total = len(shard_col)
    per_rank = total // world_size if drop_last else math.ceil(total / world_size)
    if per_rank == 0:
        raise BrainFMInputError(None, f"{total} item(s) cannot be shared by {world_size} rank(s)")
    positions = np.arange(rank * per_rank, (rank + 1) * per_rank) % total  # padding wraps around
    return EpochPlan(
        shard=shard_col[positions],
        sample=sample_col[positions],
        slice_rank=rank_col[positions],
        position=positions,
        batch_size=batch_size,
        drop_last=drop_last,
    )


class _CorruptShard(Exception):
    def __init__(self, url: str, problem: str) -> None:
        super().__init__(f"{url}: {problem}")
        self.url, self.problem = url, problem


def _decode_sample(raw: dict[str, Any], url: str) -> dict[str, Any]:
    missing = [m for m in (LATENT_MEMBERS if "latent_mean.npy" in raw else REQUIRED_MEMBERS) if m not in raw]
    if missing:
        raise _CorruptShard(url, f"sample {raw.get('__key__')!r} lacks {missing}")
    try:
        sample = _DECODER(raw)
    except wds.autodecode.DecodingError as exc:
        cause = exc.__cause__ or exc
        raise _CorruptShard(url, f"sample {raw.get('__key__')!r} does not decode ({cause})") from exc
    decoded: dict[str, Any] = {name.split(".")[0]: sample[name] for name in ARRAY_MEMBERS if name in sample}
    decoded["meta"] = sample["meta.json"]
    shape = decoded["mask"].shape  # (1, X, Y, Z); image (channels, X, Y, Z): a multi-channel sample's contrasts
    if (len(shape) != 4 or decoded.get("image", decoded["mask"]).shape[1:] != shape[1:]
            or decoded["anatomy"].shape[1:] != shape[1:]
            or decoded.get("latent_std", np.empty(0)).shape != decoded.get("latent_mean", np.empty(0)).shape):
        raise _CorruptShard(url, f"sample {raw.get('__key__')!r} has inconsistent array shapes")
    return decoded


class ShardDataset(torch.utils.data.IterableDataset):
    """Yields ready batches (dicts of tensors) of one rank's share of an epoch; see the module docstring.

    Inside DataLoader workers, worker ``w`` of ``W`` produces batches ``start + w, start + w + W, ...`` so the
    DataLoader's round-robin output is the plan's batch order whatever ``W`` is.
    """

    def __init__(
        self,
        source: str | os.PathLike | Sequence[str],
        split: str,
        *,
        mode: Literal["2d", "3d"],
        batch_size: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        augment: ReaderConfig | None = None,
        drop_last: bool = True,
        min_brain_fraction: float | None = None,
        on_corrupt: Literal["skip", "raise"] | None = None,
        index: str | os.PathLike | None = None,
        url_template: str | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("2d", "3d"):
            raise ValueError(f"mode must be '2d' or '3d', got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        reader = augment or ReaderConfig()
        self.shards, index_data = resolve_shards(source, split, index, url_template)
        self.grid_shape = tuple(index_data["grid_shape"])
        self.mode, self.batch_size, self.seed, self.drop_last = mode, batch_size, seed, drop_last
        self.augment = augment
        self.min_brain_fraction = (
            reader.min_brain_fraction if min_brain_fraction is None else min_brain_fraction
        )
        self.on_corrupt = reader.on_corrupt if on_corrupt is None else on_corrupt
        if self.on_corrupt not in ("skip", "raise"):
            raise ValueError(f"on_corrupt must be 'skip' or 'raise', got {self.on_corrupt!r}")
        self.window = reader.slice_shuffle_volumes
        self.threshold = _threshold_voxels(self.min_brain_fraction, self.grid_shape)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if dist else 0)
        self.world_size = (
            world_size if world_size is not None else (torch.distributed.get_world_size() if dist else 1)
        )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        self.epoch = 0
        self.start_batch = 0
        self.corrupt_count = 0

    def plan(self, epoch: int | None = None) -> EpochPlan:
        return epoch_plan(
            self.shards,
            seed=self.seed,
            epoch=self.epoch if epoch is None else epoch,
            mode=self.mode,
            threshold_voxels=self.threshold,
            window=self.window,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
        )

    def batches_per_epoch(self) -> int:
        return self.plan(0).n_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        in_worker = info is not None
        worker, n_workers = (info.id, info.num_workers) if in_worker else (0, 1)
        corrupt = 0
        try:
            for batch, lost in self._batches(worker, n_workers):
                corrupt += lost
                if not in_worker:
                    self.corrupt_count += lost
                if batch is None:
                    continue
                if in_worker:
                    batch["_corrupt"] = (worker, corrupt)
                yield batch
        except _CorruptShard as exc:
            if not in_worker:
                raise BrainFMInputError(exc.url, exc.problem) from None
            yield {"_error": (exc.url, exc.problem)}

    def _batches(self, worker: int, n_workers: int) -> Iterator[tuple[dict | None, int]]:
        """(batch, corrupt samples met) for this worker's batches; a batch that lost items to corruption is
        padded by repeating its survivors so every rank still runs the same number of same-size batches."""
        plan = self.plan()
        mine = list(range(self.start_batch + worker, plan.n_batches, n_workers))
        needed: dict[int, set[int]] = collections.defaultdict(set)
        for b in mine:
            sl = plan.batch(b)
            for s, v in zip(plan.shard[sl].tolist(), plan.sample[sl].tolist(), strict=True):
                needed[s].add(v)
        augmenter = None
        if self.augment is not None:
            from brainfm.data.augment import build_augmenter

            augmenter = build_augmenter(self.augment, spatial_dims=2 if self.mode == "2d" else 3)
        loaded_shard, raw_samples = -1, {}
        decoded: collections.OrderedDict[tuple[int, int], dict | None] = collections.OrderedDict()
        last_good: dict | None = None
        for b in mine:
            sl = plan.batch(b)
            items: list[dict] = []
            corrupt = 0
            columns = (plan.shard[sl], plan.sample[sl], plan.slice_rank[sl], plan.position[sl])
            for s, v, k, p in zip(*(c.tolist() for c in columns), strict=True):
                if s != loaded_shard:
                    raw_samples, missing = self._load_shard(s, needed[s])
                    corrupt += missing
                    loaded_shard = s
                    decoded.clear()
                fresh = (s, v) not in decoded
                volume = self._volume(s, v, raw_samples, decoded)
                if volume is None:
                    corrupt += int(fresh and v in raw_samples)  # decode failure, counted once per sample
                    continue
                item = self._item(volume, k, s)
                if item is None:
                    corrupt += 1
                    continue
                if augmenter is not None:
                    item = augmenter(item, _item_seed(self.seed, self.epoch, p))
                items.append(item)
            if not items:
                yield last_good, corrupt  # nothing readable: repeat the previous batch (or skip if none)
                continue
            target, survivors = len(columns[0]), len(items)
            items.extend(items[i % survivors] for i in range(target - survivors))
            last_good = _collate(items, self.mode)
            yield last_good, corrupt

    def _load_shard(self, s: int, wanted: set[int]) -> tuple[dict[int, dict], int]:
        """Stream one shard and keep the raw bytes of the samples this worker needs (no decoding)."""
        info = self.shards[s]
        position = {key: i for i, key in enumerate(info.keys)}
        errors: list[Exception] = []

        def handler(exc: Exception) -> bool:
            errors.append(exc)
            return False  # stop reading this shard: after a bad header nothing later can be trusted

        raw: dict[int, dict] = {}
        pipeline = wds.DataPipeline(wds.SimpleShardList([info.url]), wds.tarfile_to_samples(handler=handler))
        for sample in pipeline:
            i = position.get(sample["__key__"])
            if i in wanted:
                raw[i] = sample
        missing = sorted(wanted - set(raw))
        if errors or missing:
            first_error = "; ".join(str(e.args[0]) for e in errors[:1]) or "ended early"
            problem = f"corrupt or truncated shard ({first_error})"
            if missing:
                problem += f"; {len(missing)} sample(s) of this reader unreadable"
            if self.on_corrupt == "raise":
                raise _CorruptShard(info.url, problem)
            log.warning("%s: %s; skipping them", info.url, problem)
        return raw, len(missing)

    def _volume(self, s: int, v: int, raw: dict[int, dict], cache: collections.OrderedDict) -> dict | None:
        if (s, v) in cache:
            cache.move_to_end((s, v))
            return cache[(s, v)]
        if v not in raw:
            return None
        try:
            volume = _decode_sample(raw[v], self.shards[s].url)
        except _CorruptShard as exc:
            if self.on_corrupt == "raise":
                raise
            log.warning("%s: skipping", exc)
            volume = None
        cache[(s, v)] = volume
        while len(cache) > (self.window + 1 if self.mode == "2d" else 1):
            cache.popitem(last=False)
        return volume

    def _item(self, volume: dict, k: int, s: int) -> dict | None:
        meta = dict(volume["meta"], shard=self.shards[s].name)
        arrays = {name: volume[name] for name in (*VOLUME_NAMES, "label") if name in volume}
        if self.mode == "3d":
            item = {name: torch.from_numpy(a.astype(np.float32)) for name, a in arrays.items()}
            item["meta"] = meta
            return item
        eligible = np.flatnonzero(volume["mask"][0].sum(axis=(0, 1), dtype=np.int64) >= self.threshold)
        if k >= len(eligible):
            message = f"sample {meta.get('key')!r} has fewer brain slices than its index entry"
            if self.on_corrupt == "raise":
                raise _CorruptShard(self.shards[s].url, message)
            log.warning("%s: %s; skipping", self.shards[s].url, message)
            return None
        z = int(eligible[k])
        item = {
            name: torch.from_numpy(np.ascontiguousarray(a[..., z]).astype(np.float32))
            for name, a in arrays.items()
        }
        item["meta"] = meta
        item["slice_index"] = z
        item["slice_position"] = z / max(1, volume["mask"].shape[-1] - 1)
        return item


def _item_seed(seed: int, epoch: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


def _collate(items: list[dict], mode: str) -> dict[str, Any]:
    batch: dict[str, Any] = {name: torch.stack([it[name] for it in items]) for name in VOLUME_NAMES if name in items[0]}
    if any("label" in it for it in items):
        zeros = torch.zeros_like(items[0]["mask"])
        batch["label"] = torch.stack([it.get("label", zeros) for it in items])
        batch["label_present"] = torch.tensor([("label" in it) for it in items])
    batch["meta"] = [it["meta"] for it in items]
    if mode == "2d":
        batch["slice_index"] = torch.tensor([it["slice_index"] for it in items], dtype=torch.long)
        batch["slice_position"] = torch.tensor([it["slice_position"] for it in items], dtype=torch.float32)
    return batch


class ShardLoader:
    """Iterable over batches with ``state_dict``/``load_state_dict``/``set_epoch``; wraps a DataLoader.

    A completed pass advances ``epoch``; ``batches_yielded`` counts batches handed to the caller (not the
    ones prefetched), so a checkpointed state resumes exactly at the next unseen batch.
    """

    def __init__(self, dataset: ShardDataset, num_workers: int = 0) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.epoch = 0
        self.batches_yielded = 0
        self._corrupt_before = 0
        self._corrupt_workers: dict[int, int] = {}

    @property
    def seed(self) -> int:
        return self.dataset.seed

    @property
    def corrupt_count(self) -> int:
        return self._corrupt_before + self.dataset.corrupt_count + sum(self._corrupt_workers.values())

    def batches_per_epoch(self) -> int:
        """Batches each rank runs per epoch (equal on all ranks)."""
        return self.dataset.batches_per_epoch()

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_yielded = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "batches_yielded": self.batches_yielded,
            "seed": self.seed,
            "corrupt_count": self.corrupt_count,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.batches_yielded = int(state["batches_yielded"])
        if "seed" in state and int(state["seed"]) != self.dataset.seed:
            log.warning(
                "resuming with the checkpoint's seed %s instead of %s", state["seed"], self.dataset.seed
            )
            self.dataset.seed = int(state["seed"])
        self._corrupt_before = int(state.get("corrupt_count", 0))
        self.dataset.corrupt_count = 0
        self._corrupt_workers = {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.epoch = self.epoch
        self.dataset.start_batch = self.batches_yielded
        self._corrupt_before += sum(self._corrupt_workers.values())
        self._corrupt_workers = {}
        if self.num_workers > 0:
            source: Iterable[dict] = torch.utils.data.DataLoader(
                self.dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=False
            )
        else:
            source = self.dataset
        for batch in source:
            if "_error" in batch:
                url, problem = batch["_error"]
                raise BrainFMInputError(url, problem)
            if "_corrupt" in batch:
                worker, count = batch.pop("_corrupt")
                self._corrupt_workers[int(worker)] = int(count)
            self.batches_yielded += 1
            yield batch
        self.epoch += 1
        self.batches_yielded = 0


def make_dataloader(
    shard_dir_or_urls: str | os.PathLike | Sequence[str],
    split: str,
    *,
    mode: Literal["2d", "3d"],
    batch_size: int,
    seed: int = 0,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    augment: ReaderConfig | None = None,
    drop_last: bool = True,
    min_brain_fraction: float | None = None,
    on_corrupt: Literal["skip", "raise"] | None = None,
    index: str | os.PathLike | None = None,
    url_template: str | None = None,
) -> ShardLoader:
    """Streaming, exactly-resumable loader over a split; ``min_brain_fraction``/``on_corrupt`` default to
    ``augment``'s values, or 0.05/"skip" without a ReaderConfig; ``url_template`` reads the shards of a
    directory's index from URLs (:func:`shard_urls`)."""
    dataset = ShardDataset(
        shard_dir_or_urls,
        split,
        mode=mode,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        augment=augment,
        drop_last=drop_last,
        min_brain_fraction=min_brain_fraction,
        on_corrupt=on_corrupt,
        index=index,
        url_template=url_template,
    )
    return ShardLoader(dataset, num_workers=num_workers)
