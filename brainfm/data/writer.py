"""WebDataset shards from a manifest: a resumable, deterministic, parallel writer and its ``index.json``.

``build_shards``: manifest CSV -> subject-level splits -> ``preprocess_scan`` + ``compute_anatomy`` in worker
processes -> ``{split}-{000000}.tar`` shards + ``index.json``. Which scans go into which shard file is decided
before any preprocessing, as a pure function of the manifest and the config, so an interrupted build keeps
every finished shard (checked against its sha256 sidecar in ``.build/``) and rebuilds only the missing ones.

``index.json`` holds everything later stages need without opening a tar: per shard its keys, sha256 and
per-slice brain voxel counts (the reader's exact epoch plan), and per split the modalities and the sample
counts by modality, dataset and site (the model folder and the model card). ``load_index`` reads it.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import datetime
import functools
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from brainfm.config import DataConfig, PreprocessConfig, to_dict
from brainfm.data.manifest import ManifestRow, Rejection, assign_splits, read_manifest, sanitize_key
from brainfm.io import BrainFMInputError, atomic_path, json_default, write_json, write_text

log = logging.getLogger(__name__)

FORMAT = "brainfm-shards/2"  # /2: the index holds modalities and counts per split
INDEX_NAME = "index.json"
REJECTED_NAME = "rejected.jsonl"
BUILD_DIR = ".build"  # per-shard sidecars: fingerprint, sha256, keys, samples, rejections
DEFAULT_MODALITY = "T1"  # an empty modality cell of an MRI scan in a shard manifest (CT is told by its HU)
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_-]+-\d{6}\.tar$")
_META_ALLOWANCE = 64 * 1024  # bytes reserved per sample for meta.json and tar headers when sizing shards
_NPY_ONLY = {"npy": wds.writer.numpy_dumps}  # webdataset's own .npy encoder; nothing is ever pickled
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_PARENT_POLL_S = 1.0


@dataclasses.dataclass
class ShardGroup:
    """The items planned for one shard file (manifest rows; for a derived set such as latent shards, the keys of
    its source shard); ``fingerprint`` changes whenever any of its inputs does."""

    name: str
    split: str
    rows: list[Any]
    fingerprint: str


@dataclasses.dataclass
class BuildReport:
    out_dir: Path
    n_accepted: int
    n_rejected: int
    counts: dict[str, int]  # accepted samples per split
    shards_built: int
    shards_kept: int
    rejected: list[Rejection]
    seconds: float

    def summary(self) -> str:
        per_split = ", ".join(f"{split} {n}" for split, n in self.counts.items()) or "none"
        reasons = collections.Counter(r.reason for r in self.rejected)
        rejected = ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items()))
        text = (
            f"shards in {self.out_dir}: accepted {self.n_accepted} scan(s) ({per_split}); "
            f"{self.shards_built} shard(s) built, {self.shards_kept} kept from a previous run; "
            f"{self.seconds:.1f} s"
        )
        if self.n_rejected:
            text += f"; rejected {self.n_rejected} ({rejected}), see {self.out_dir / REJECTED_NAME}"
        return text


# ------------------------------------------------------------------------------------------------ planning
def sample_key(row: ManifestRow) -> str:
    """The row's WebDataset key: its subject and CSV line, unique within a manifest."""
    return f"{sanitize_key(row.subject)}_{row.row:05d}"


def samples_per_shard(config: DataConfig, with_label: bool) -> int:
    """Exact arrays size on the fixed grid (+ a meta allowance) -> samples that fit ``max_shard_bytes``."""
    voxels = int(np.prod(config.preprocess.shape))
    channels = len(config.preprocess.tissue_priors)
    images = max(1, len(config.preprocess.channels))
    per_sample = voxels * (2 * images + 1 + 2 * channels + (1 if with_label else 0)) + _META_ALLOWANCE
    return max(1, min(config.shards.max_samples_per_shard, config.shards.max_shard_bytes // per_sample))


def _file_stamp(path: Path | None) -> list[Any] | None:
    if path is None:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def plan_shards(rows: Sequence[ManifestRow], config: DataConfig, recipe: dict) -> list[ShardGroup]:
    """Deterministic assignment of rows to shard files: per split (config order, then others sorted),
    manifest order, chunks of ``samples_per_shard``. One shard is open at a time while writing."""
    fraction_order = list(config.shards.split_fractions)
    splits = fraction_order + sorted({r.split for r in rows} - set(fraction_order))
    groups = []
    for split in splits:
        members = [r for r in rows if r.split == split]
        per_shard = samples_per_shard(config, with_label=any(r.label for r in members))
        for number, start in enumerate(range(0, len(members), per_shard)):
            chunk = members[start : start + per_shard]
            payload = {
                "format": FORMAT,
                "recipe": recipe,
                "rows": [
                    [dataclasses.asdict(r), _file_stamp(r.path), _file_stamp(r.mask), _file_stamp(r.label),
                     _file_stamp(r.t1), [_file_stamp(path) for _, path in r.channels]]
                    for r in chunk
                ],
            }
            fingerprint = hashlib.sha256(
                json.dumps(payload, sort_keys=True, default=str).encode()
            ).hexdigest()
            groups.append(ShardGroup(f"{split}-{number:06d}.tar", split, chunk, fingerprint))
    return groups


# ------------------------------------------------------------------------------------------------ encoding
_REASON_PATTERNS = (
    ("missing_file", ("file not found", "no such file")),
    ("too_large", ("over the limit",)),
    ("bad_label", ("lesion label",)),
    ("not_3d", ("4d data", "not 3d", "-component")),
    ("non_finite", ("nan", "inf voxel", "non-finite")),
    ("empty_brain", ("empty brain", "constant volume")),
    ("bad_modality", ("modality",)),
    ("unreadable", ("unreadable", "cannot", "no dicom")),
)


def classify_problem(problem: str) -> str:
    """A short machine-readable reason for ``rejected.jsonl`` from a ``BrainFMInputError`` message."""
    lowered = problem.lower()
    for reason, needles in _REASON_PATTERNS:
        if any(n in lowered for n in needles):
            return reason
    return "invalid_input"


def _reject(row: ManifestRow, reason: str, message: str) -> dict[str, Rejection]:
    return {"rejected": Rejection(row.row, str(row.path), row.subject, reason, message)}


def encode_sample(row: ManifestRow, recipe: PreprocessConfig) -> dict[str, Any]:
    """Preprocess one scan into shard members, or return a rejection; runs in a worker process."""
    from brainfm.data.anatomy import compute_anatomy
    from brainfm.data.channels import channel_images
    from brainfm.data.preprocess import preprocess_scan

    try:
        scan = preprocess_scan(
            row.path, row.modality, recipe, mask_path=row.mask, label_path=row.label, t1_path=row.t1,
            serves=(DEFAULT_MODALITY, "CT"),
        )
        anatomy = compute_anatomy(scan, recipe)
        extra = channel_images(row, scan.affine, recipe) if row.channels else []
    except BrainFMInputError as exc:
        return _reject(row, classify_problem(exc.problem), str(exc))
    except Exception as exc:  # a scan that breaks a library must not end a build over thousands of scans
        return _reject(
            row,
            "preprocess_failed",
            f"{row.path}: preprocessing failed ({type(exc).__name__}: {' '.join(str(exc).split())})",
        )
    image = np.stack([np.asarray(scan.image, dtype=np.float32), *extra])  # (channels, X, Y, Z)
    mask = np.asarray(scan.mask).astype(np.uint8)
    priors = np.asarray(anatomy.priors, dtype=np.float32)
    if image.shape[1:] != tuple(recipe.shape) or priors.shape[1:] != image.shape[1:]:
        return _reject(
            row,
            "preprocess_failed",
            f"{row.path}: preprocessed shape {image.shape}/{priors.shape} does not match {recipe.shape}",
        )
    if not (np.isfinite(image).all() and np.isfinite(priors).all()):
        return _reject(row, "non_finite", f"{row.path}: non-finite values after preprocessing")
    if not mask.any():
        return _reject(row, "empty_brain", f"{row.path}: empty brain mask after preprocessing")
    key = sample_key(row)
    meta: dict[str, Any] = {
        "key": key,
        "subject": row.subject,
        "dataset": row.dataset,
        "modality": scan.modality,
        "age": row.age,
        "sex": row.sex,
        "site": row.site,
        "split": row.split,
        "lesion_type": row.lesion_type,
        "source_path": str(row.path),
        "mask_path": None if row.mask is None else str(row.mask),
        "label_path": None if row.label is None else str(row.label),
        "grid_affine": np.asarray(scan.affine, dtype=np.float64).tolist(),
        "grid_shape": list(image.shape[1:]),
        "channels": list(recipe.channels) or [scan.modality],
        "source_affine": np.asarray(scan.source_affine, dtype=np.float64).tolist(),
        "source_shape": [int(n) for n in scan.source_shape],
        "anatomy_channels": int(priors.shape[0]),
        "scalars": dict(anatomy.scalars),
        "has_label": scan.label is not None,
        # how the front end served this scan (extraction route, N4, alignment); not its timings, so shards stay
        # byte-identical between builds
        "preprocessing": {k: v for k, v in scan.provenance.items() if k != "seconds"},
    }
    for column, value in row.extra.items():
        meta[column if column not in meta else f"manifest_{column}"] = value
    members: dict[str, Any] = {  # C-contiguous numeric arrays: encoded by webdataset's npy handler
        "image.npy": np.ascontiguousarray(np.clip(image, 0.0, 1.0).astype(np.float16)),
        "mask.npy": np.ascontiguousarray(mask[None]),
        "anatomy.npy": np.ascontiguousarray(priors.astype(np.float16)),
        "meta.json": json.dumps(meta, default=json_default, sort_keys=True).encode(),
    }
    if scan.label is not None:
        members["label.npy"] = np.ascontiguousarray(np.asarray(scan.label).astype(np.uint8)[None])
    return {
        "key": key,
        "members": members,
        "slice_brain_voxels": mask.sum(axis=(0, 1)).astype(int).tolist(),
        "anatomy_channels": int(priors.shape[0]),
        "sample": {
            "subject": row.subject,
            "modality": scan.modality,
            "dataset": row.dataset,
            "site": row.site,
        },
    }


# ------------------------------------------------------------------------------------------------ workers
def _watch_parent(parent: int, interval: float = _PARENT_POLL_S) -> None:
    """Exit this process as soon as ``parent`` is no longer its parent (it died and we were re-parented)."""
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(interval)


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive a killed build (``kill -9`` leaves no cleanup to the parent): on Linux the
    kernel sends SIGKILL when the parent dies; elsewhere, or if that fails, a thread polls the parent."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(
            target=_watch_parent, args=(parent,), name="brainfm-parent-watch", daemon=True
        ).start()


def _init_worker(parent: int) -> None:
    import torch

    _die_with_parent(parent)
    torch.set_num_threads(1)  # N workers x N threads would oversubscribe the cores


def _ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """``map`` in input order with at most ``2 * workers`` results in flight: memory does not grow with N."""
    if workers <= 1:
        yield from map(fn, items)
        return
    iterator = iter(items)
    # fork on Linux (Python 3.14 would default to forkserver): each worker's parent is this process, the one
    # _die_with_parent watches; elsewhere spawn, whose workers are children of this process too.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_init_worker, initargs=(os.getpid(),)
    ) as pool:
        pending: collections.deque[Future] = collections.deque(
            pool.submit(fn, item) for item in itertools.islice(iterator, 2 * workers)
        )
        try:
            while pending:
                result = pending.popleft().result()
                for item in itertools.islice(iterator, 1):
                    pending.append(pool.submit(fn, item))
                yield result
        finally:
            for future in pending:
                future.cancel()


# ------------------------------------------------------------------------------------------------ writing
def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _sidecar_path(out_dir: Path, shard_name: str) -> Path:
    return out_dir / BUILD_DIR / f"{shard_name}.json"


def load_sidecar(out_dir: Path, group: ShardGroup) -> dict | None:
    """A finished shard from an earlier run, if its inputs are unchanged and its bytes verify."""
    sidecar = _sidecar_path(out_dir, group.name)
    try:
        record = json.loads(sidecar.read_bytes())
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != group.fingerprint or "samples" not in record:
        return None
    record["rejected"] = [Rejection(**r) for r in record["rejected"]]
    if record["n_samples"] == 0:
        return record
    shard = out_dir / group.name
    if not shard.is_file() or sha256_file(shard) != record.get("sha256"):
        log.info("rebuilding %s: its bytes do not match the recorded sha256", shard)
        return None
    return record


def prepare_out_dir(out_dir: Path, planned: set[str]) -> None:
    """Refuse a foreign non-empty folder; in our own (it has ``.build``) remove what a killed run left: its
    temp files, and shards it wrote that are no longer planned (only those with our sidecar)."""
    if out_dir.is_file():
        raise BrainFMInputError(out_dir, "output folder is a file")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / BUILD_DIR).is_dir():
        raise BrainFMInputError(
            out_dir, "output folder is not empty and holds no shard build; give a new folder"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / BUILD_DIR).mkdir(exist_ok=True)
    for folder in (out_dir, out_dir / BUILD_DIR):
        for path in folder.iterdir():
            if path.name.startswith(".") and ".tmp" in path.name and path.is_file():
                log.info("removing partial file %s from an interrupted build", path)
                path.unlink()
    for path in out_dir.glob("*.tar"):
        sidecar = _sidecar_path(out_dir, path.name)
        if _SHARD_NAME.match(path.name) and path.name not in planned and sidecar.is_file():
            log.info("removing %s: no longer part of this manifest/config", path)
            path.unlink()
            sidecar.unlink()


def write_group(
    out_dir: Path, group: ShardGroup, results: Iterator[dict], on_reject: Callable[[Rejection], None]
) -> dict:
    """Write ``group``'s shard (temp name + rename) from one result per item (``encode_sample``'s format: key,
    members, slice brain voxels, sample counts; or a rejection) and its sidecar; returns the sidecar record."""
    shard_path = out_dir / group.name
    keys: list[str] = []
    voxels: list[list[int]] = []
    samples: list[dict] = []
    rejected: list[Rejection] = []
    channels: int | None = None
    with atomic_path(shard_path) as tmp:
        with (
            open(tmp, "wb") as fh,
            wds.TarWriter(
                fh, encoder=_NPY_ONLY, mtime=0.0, user="brainfm", group="brainfm", mode=0o644
            ) as writer,
        ):
            for _ in group.rows:
                result = next(results)
                if "rejected" in result:
                    rejected.append(result["rejected"])
                    on_reject(result["rejected"])
                    continue
                writer.write({"__key__": result["key"], **result["members"]})
                keys.append(result["key"])
                voxels.append(result["slice_brain_voxels"])
                samples.append(result["sample"])
                channels = result["anatomy_channels"]
        digest = sha256_file(tmp) if keys else None
        size = tmp.stat().st_size
    if not keys:
        shard_path.unlink()  # every scan of this group was rejected: no shard file, the sidecar remembers why
    record = {
        "name": group.name,
        "split": group.split,
        "fingerprint": group.fingerprint,
        "n_samples": len(keys),
        "sha256": digest,
        "bytes": size if keys else 0,
        "keys": keys,
        "slice_brain_voxels": voxels,
        "samples": samples,
        "anatomy_channels": channels,
        "rejected": rejected,
    }
    write_json(_sidecar_path(out_dir, group.name), {**record, "rejected": [r.as_dict() for r in rejected]})
    return record


def _jsonl(rejections: Iterable[Rejection]) -> str:
    return "".join(json.dumps(r.as_dict()) + "\n" for r in rejections)


def build_shards(
    manifest: str | os.PathLike, out_dir: str | os.PathLike, config: DataConfig, workers: int | None = None
) -> BuildReport:
    """Preprocess every manifest row into WebDataset shards + ``index.json``; resumable and deterministic.

    Bad scans are appended to ``rejected.jsonl`` and logged as one line; the build goes on without them.
    The result does not depend on ``workers`` (results are consumed in manifest order).
    """
    from tqdm.auto import tqdm

    from brainfm.data.preprocess import recipe_dict
    from brainfm.version import __version__

    started = time.perf_counter()
    out = Path(out_dir)
    workers = config.shards.workers if workers is None else workers
    rows, early_rejects = read_manifest(manifest)
    rows = assign_splits(rows, config.shards.split_fractions, config.shards.seed, manifest)
    if config.preprocess.channels:  # one sample per subject, its contrasts as channels (refused when one lacks)
        from brainfm.data.channels import stack_channels

        rows = stack_channels(rows, config.preprocess.channels, manifest)
    recipe = recipe_dict(config.preprocess)
    groups = plan_shards(rows, config, recipe)
    prepare_out_dir(out, {g.name for g in groups})

    records: dict[str, dict] = {}
    for group in groups:
        record = load_sidecar(out, group)
        if record is not None:
            records[group.name] = record
    todo = [g for g in groups if g.name not in records]
    for rejection in early_rejects:
        log.warning("rejected %s (%s): %s", rejection.path, rejection.reason, rejection.message)

    kept_rejects = [r for g in groups if g.name in records for r in records[g.name]["rejected"]]
    write_text(out / REJECTED_NAME, _jsonl(early_rejects + kept_rejects))
    todo_rows = [r for g in todo for r in g.rows]
    progress = tqdm(total=len(todo_rows), desc="shards", unit="scan", disable=None)

    with open(out / REJECTED_NAME, "a", encoding="utf-8") as rejected_log:

        def on_reject(rejection: Rejection) -> None:
            log.warning("rejected %s (%s): %s", rejection.path, rejection.reason, rejection.message)
            rejected_log.write(_jsonl([rejection]))
            rejected_log.flush()

        results = _ordered_map(functools.partial(encode_sample, recipe=config.preprocess), todo_rows, workers)
        counted = _counting(results, progress)
        try:
            for group in todo:
                records[group.name] = write_group(out, group, counted, on_reject)
        finally:
            counted.close()
            progress.close()

    ordered = [records[g.name] for g in groups]
    all_rejected = sorted(
        early_rejects + [r for rec in ordered for r in rec["rejected"]], key=lambda r: r.row
    )
    write_text(out / REJECTED_NAME, _jsonl(all_rejected))
    index = _make_index(ordered, recipe, config, __version__, len(all_rejected))
    write_json(out / INDEX_NAME, index)
    counts = {split: info["n_samples"] for split, info in index["counts"].items()}
    return BuildReport(
        out_dir=out,
        n_accepted=sum(counts.values()),
        n_rejected=len(all_rejected),
        counts=counts,
        shards_built=sum(1 for g in todo if records[g.name]["n_samples"]),
        shards_kept=sum(1 for g in groups if g not in todo and records[g.name]["n_samples"]),
        rejected=all_rejected,
        seconds=time.perf_counter() - started,
    )


def _counting(results: Iterator[dict], progress: Any) -> Iterator[dict]:
    for result in results:
        progress.update(1)
        yield result


# ------------------------------------------------------------------------------------------------ index
def _make_index(records: list[dict], recipe: dict, config: DataConfig, version: str, n_rejected: int) -> dict:
    """Counts per split by modality, dataset and site (a missing value as ``"unknown"``), first seen first."""
    splits: dict[str, list[dict]] = {}
    counts: dict[str, dict[str, Any]] = {}
    subjects: dict[str, set[str]] = collections.defaultdict(set)
    for record in records:
        shards = splits.setdefault(record["split"], [])
        tally = counts.setdefault(
            record["split"],
            {"n_samples": 0, "n_shards": 0, "n_subjects": 0, "modalities": {}, "datasets": {}, "sites": {}},
        )
        if record["n_samples"] == 0:
            continue
        shards.append(
            {k: record[k] for k in ("name", "n_samples", "sha256", "bytes", "keys", "slice_brain_voxels")}
        )
        tally["n_samples"] += record["n_samples"]
        tally["n_shards"] += 1
        for sample in record["samples"]:
            subjects[record["split"]].add(sample["subject"])
            for field, column in (("modalities", "modality"), ("datasets", "dataset"), ("sites", "site")):
                value = str(sample[column] or "unknown")
                tally[field][value] = tally[field].get(value, 0) + 1
    for split, tally in counts.items():
        tally["n_subjects"] = len(subjects[split])
    channels = next((r["anatomy_channels"] for r in records if r["anatomy_channels"] is not None), None)
    return {
        "format": FORMAT,
        "brainfm_version": version,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "recipe": recipe,
        "shards_config": to_dict(config.shards),
        "grid_shape": list(config.preprocess.shape),
        "anatomy_channels": channels,
        "n_rejected": n_rejected,
        "modalities": {split: sorted(tally["modalities"]) for split, tally in counts.items()},
        "counts": counts,
        "splits": splits,
    }


def load_index(shard_dir: str | os.PathLike) -> dict:
    """``index.json`` of a shard folder (or the file itself), checked to be of this format.

    Besides the shards, it gives ``modalities[split]`` (sorted list) and ``counts[split]`` with ``n_samples``,
    ``n_shards``, ``n_subjects`` and per-value counts under ``modalities``, ``datasets`` and ``sites``.
    """
    path = Path(shard_dir)
    path = path / INDEX_NAME if path.is_dir() else path
    try:
        index = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise BrainFMInputError(path, "no index.json: build the shards with `brainfm data shards`") from None
    except (OSError, ValueError) as exc:
        raise BrainFMInputError(path, f"unreadable index ({exc})") from exc
    found = index.get("format") if isinstance(index, dict) else None
    if found != FORMAT:
        hint = (
            "; rebuild the shards with `brainfm data shards`"
            if str(found).startswith("brainfm-shards/")
            else ""
        )
        raise BrainFMInputError(path, f"not a {FORMAT} index (format {found!r}){hint}")
    return index
