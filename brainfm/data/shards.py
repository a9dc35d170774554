"""WebDataset shards: a resumable parallel writer and an exactly-resumable streaming reader.

Writer (``build_shards``): manifest CSV -> ``preprocess_scan`` + ``compute_anatomy`` in worker processes ->
``{split}-{000000}.tar`` shards + ``index.json``. Which scans go into which shard file is decided before any
preprocessing, as a pure function of the manifest and the config, so an interrupted build can keep every
finished shard (checked against its sha256 sidecar) and rebuild only the missing ones.

Reader (``make_dataloader``): the order of an epoch is computed from ``index.json`` alone as a pure function of
(seed, epoch, position): shards are permuted, then volumes within a shard, then (2D) axial slices within windows
of a few volumes. Every rank gets an equal contiguous range of that sequence, so DDP ranks always run the same
number of batches, and batch ``b`` is produced by DataLoader worker ``b mod num_workers``, which makes the batch
sequence independent of the worker count and lets ``load_state_dict`` resume at an exact batch.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import datetime
import functools
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import shlex
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds

from brainfm.config import MODALITIES, DataConfig, PreprocessConfig, ReaderConfig, to_dict
from brainfm.io import BrainFMInputError, atomic_path, json_default, write_json, write_text

log = logging.getLogger(__name__)

FORMAT = "brainfm-shards/1"
INDEX_NAME = "index.json"
REJECTED_NAME = "rejected.jsonl"
BUILD_DIR = ".build"  # per-shard sidecars: fingerprint, sha256, keys, rejections
REQUIRED_MEMBERS = ("image.npy", "mask.npy", "anatomy.npy", "meta.json")
_KNOWN_COLUMNS = ("path", "subject", "dataset", "modality", "age", "sex", "site", "split", "mask", "label")
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_-]+-\d{6}\.tar$")
_META_ALLOWANCE = 64 * 1024  # bytes reserved per sample for meta.json and tar headers when sizing shards


# ============================================================================================================
# Writer
# ============================================================================================================


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    """One manifest row after validation; ``key`` is its WebDataset key (unique, no dots)."""

    row: int
    path: str
    subject: str
    modality: str
    split: str
    key: str
    dataset: str | None = None
    age: float | None = None
    sex: str | None = None
    site: str | None = None
    mask: str | None = None
    label: str | None = None
    extra: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass
class ShardGroup:
    """The scans planned for one shard file; ``fingerprint`` changes whenever any of its inputs does."""

    name: str
    split: str
    entries: list[ManifestEntry]
    fingerprint: str


@dataclasses.dataclass
class BuildReport:
    out_dir: Path
    n_accepted: int
    n_rejected: int
    counts: dict[str, int]  # accepted samples per split
    shards_built: int
    shards_kept: int
    rejected: list[dict[str, Any]]
    seconds: float

    def summary(self) -> str:
        per_split = ", ".join(f"{split} {n}" for split, n in self.counts.items()) or "none"
        reasons = collections.Counter(r["reason"] for r in self.rejected)
        rejected = ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items()))
        text = (
            f"shards in {self.out_dir}: accepted {self.n_accepted} scan(s) ({per_split}); "
            f"{self.shards_built} shard(s) built, {self.shards_kept} kept from a previous run; {self.seconds:.1f} s"
        )
        if self.n_rejected:
            text += f"; rejected {self.n_rejected} ({rejected}), see {self.out_dir / REJECTED_NAME}"
        return text


def sanitize_key(text: str) -> str:
    """WebDataset splits file names at the first dot, so keys keep only [A-Za-z0-9_-]."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    return cleaned or "scan"


def _subject_split(subject: str, fractions: dict[str, float], seed: int) -> str:
    """Hash the subject id (not its row) so adding subjects never moves existing ones to another split."""
    digest = hashlib.sha256(f"{seed}:{subject}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    cumulative = 0.0
    for split, fraction in fractions.items():
        cumulative += fraction
        if u < cumulative:
            return split
    return list(fractions)[-1]


def _reject(entry_path: str, subject: str, reason: str, message: str, row: int) -> dict[str, Any]:
    return {"row": row, "path": entry_path, "subject": subject, "reason": reason, "message": message}


def read_manifest(manifest: str | os.PathLike, config: DataConfig) -> tuple[list[ManifestEntry], list[dict]]:
    """Validate rows and assign subject-level splits. Returns (entries, rejected rows).

    Rows whose files are missing or whose modality is unknown are rejected here, before shards are planned;
    conflicting explicit splits for one subject are a manifest error (a subject must never leak across splits).
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        raise BrainFMInputError(manifest, "manifest file not found")
    try:
        with manifest.open(newline="") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BrainFMInputError(manifest, f"unreadable manifest CSV ({exc})") from exc
    if "path" not in columns:
        raise BrainFMInputError(manifest, f"manifest needs a 'path' column; found {columns}")
    base = manifest.parent
    extra_columns = [c for c in columns if c and c not in _KNOWN_COLUMNS]

    def resolve(value: str) -> str:
        return str(Path(value) if Path(value).is_absolute() else base / value)

    explicit: dict[str, str] = {}
    for i, row in enumerate(rows):
        subject = row.get("subject") or _stem(row.get("path", "")) or f"row{i}"
        split = row.get("split", "")
        if split:
            if sanitize_key(split) != split:
                raise BrainFMInputError(manifest, f"row {i + 2}: split {split!r} must use only [A-Za-z0-9_-]")
            if explicit.setdefault(subject, split) != split:
                raise BrainFMInputError(
                    manifest, f"subject {subject!r} is listed in splits {explicit[subject]!r} and {split!r}"
                )

    entries: list[ManifestEntry] = []
    rejected: list[dict] = []
    fractions = config.shards.split_fractions
    for i, row in enumerate(rows):
        raw_path = row.get("path", "")
        subject = row.get("subject") or _stem(raw_path) or f"row{i}"
        path = resolve(raw_path) if raw_path else ""
        modality = (row.get("modality") or "T1").upper()
        problems = []
        if not raw_path:
            problems.append(("missing_path", "empty 'path' cell"))
        for column in ("path", "mask", "label"):
            if row.get(column) and not Path(resolve(row[column])).exists():
                problems.append(("missing_file", f"{column} file not found: {resolve(row[column])}"))
        if modality not in MODALITIES:
            problems.append(("bad_modality", f"unknown modality {modality!r}; expected one of {list(MODALITIES)}"))
        age: float | None = None
        if row.get("age"):
            try:
                age = float(row["age"])
            except ValueError:
                problems.append(("bad_metadata", f"age {row['age']!r} is not a number"))
        if problems:
            reason, message = problems[0]
            rejected.append(_reject(path or f"<row {i + 2}>", subject, reason, f"{path}: {message}", i))
            continue
        entries.append(
            ManifestEntry(
                row=i,
                path=path,
                subject=subject,
                modality=modality,
                split=explicit.get(subject) or _subject_split(subject, fractions, config.shards.seed),
                key=f"{sanitize_key(subject)}_{i:05d}",
                dataset=row.get("dataset") or None,
                age=age,
                sex=row.get("sex") or None,
                site=row.get("site") or None,
                mask=resolve(row["mask"]) if row.get("mask") else None,
                label=resolve(row["label"]) if row.get("label") else None,
                extra=tuple((c, row.get(c, "")) for c in extra_columns),
            )
        )
    return entries, rejected


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".dcm"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def samples_per_shard(config: DataConfig, with_label: bool) -> int:
    """Exact arrays size on the fixed grid (+ a meta allowance) -> how many samples fit ``max_shard_bytes``."""
    voxels = int(np.prod(config.preprocess.shape))
    channels = len(config.preprocess.tissue_priors)
    per_sample = voxels * (2 + 1 + 2 * channels + (1 if with_label else 0)) + _META_ALLOWANCE
    return max(1, min(config.shards.max_samples_per_shard, config.shards.max_shard_bytes // per_sample))


def _file_stamp(path: str | None) -> list[Any] | None:
    if path is None:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def plan_shards(entries: Sequence[ManifestEntry], config: DataConfig, recipe: dict) -> list[ShardGroup]:
    """Deterministic assignment of entries to shard files: per split (config order, then others sorted),
    manifest order, chunks of ``samples_per_shard``. One shard is open at a time while writing."""
    fraction_order = list(config.shards.split_fractions)
    splits = fraction_order + sorted({e.split for e in entries} - set(fraction_order))
    groups = []
    for split in splits:
        members = [e for e in entries if e.split == split]
        per_shard = samples_per_shard(config, with_label=any(e.label for e in members))
        for number, start in enumerate(range(0, len(members), per_shard)):
            chunk = members[start : start + per_shard]
            payload = {
                "format": FORMAT,
                "recipe": recipe,
                "entries": [
                    [dataclasses.asdict(e), _file_stamp(e.path), _file_stamp(e.mask), _file_stamp(e.label)]
                    for e in chunk
                ],
            }
            fingerprint = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
            groups.append(ShardGroup(f"{split}-{number:06d}.tar", split, chunk, fingerprint))
    return groups


_REASON_PATTERNS = (
    ("missing_file", ("file not found", "no such file")),
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


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_sample(entry: ManifestEntry, recipe: PreprocessConfig) -> dict[str, Any]:
    """Preprocess one scan into shard members, or return a rejection; runs in a worker process."""
    from brainfm.data.anatomy import compute_anatomy
    from brainfm.data.preprocess import preprocess_scan

    try:
        scan = preprocess_scan(entry.path, entry.modality, recipe, mask_path=entry.mask, label_path=entry.label)
        anatomy = compute_anatomy(scan, recipe)
    except BrainFMInputError as exc:
        return {"rejected": _reject(entry.path, entry.subject, classify_problem(exc.problem), str(exc), entry.row)}
    except Exception as exc:  # a scan that breaks a library must not end a build over thousands of scans
        message = f"{entry.path}: preprocessing failed ({type(exc).__name__}: {' '.join(str(exc).split())})"
        return {"rejected": _reject(entry.path, entry.subject, "preprocess_failed", message, entry.row)}
    image = np.asarray(scan.image, dtype=np.float32)
    mask = np.asarray(scan.mask).astype(np.uint8)
    priors = np.asarray(anatomy.priors, dtype=np.float32)
    if image.shape != tuple(recipe.shape) or priors.shape[1:] != image.shape:
        message = f"{entry.path}: preprocessed shape {image.shape}/{priors.shape} does not match {recipe.shape}"
        return {"rejected": _reject(entry.path, entry.subject, "preprocess_failed", message, entry.row)}
    if not (np.isfinite(image).all() and np.isfinite(priors).all()):
        message = f"{entry.path}: non-finite values after preprocessing"
        return {"rejected": _reject(entry.path, entry.subject, "non_finite", message, entry.row)}
    if not mask.any():
        message = f"{entry.path}: empty brain mask after preprocessing"
        return {"rejected": _reject(entry.path, entry.subject, "empty_brain", message, entry.row)}
    meta: dict[str, Any] = {
        "key": entry.key,
        "subject": entry.subject,
        "dataset": entry.dataset,
        "modality": entry.modality,
        "age": entry.age,
        "sex": entry.sex,
        "site": entry.site,
        "split": entry.split,
        "source_path": entry.path,
        "mask_path": entry.mask,
        "label_path": entry.label,
        "grid_affine": np.asarray(scan.affine, dtype=np.float64).tolist(),
        "grid_shape": list(image.shape),
        "source_affine": np.asarray(scan.source_affine, dtype=np.float64).tolist(),
        "source_shape": [int(n) for n in scan.source_shape],
        "anatomy_channels": int(priors.shape[0]),
        "scalars": dict(anatomy.scalars),
        "has_label": scan.label is not None,
    }
    for column, value in entry.extra:
        meta[column if column not in meta else f"manifest_{column}"] = value
    members = {
        "image.npy": _npy_bytes(np.clip(image, 0.0, 1.0).astype(np.float16)[None]),
        "mask.npy": _npy_bytes(mask[None]),
        "anatomy.npy": _npy_bytes(priors.astype(np.float16)),
        "meta.json": json.dumps(meta, default=json_default, sort_keys=True).encode(),
    }
    if scan.label is not None:
        members["label.npy"] = _npy_bytes(np.asarray(scan.label).astype(np.uint8)[None])
    return {
        "key": entry.key,
        "members": members,
        "slice_brain_voxels": mask.sum(axis=(0, 1)).astype(int).tolist(),
        "anatomy_channels": int(priors.shape[0]),
    }


def _init_worker() -> None:
    torch.set_num_threads(1)  # N workers x N threads would oversubscribe the cores


def _ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """``map`` in input order with at most ``2 * workers`` results in flight, so memory does not grow with N."""
    if workers <= 1:
        yield from map(fn, items)
        return
    iterator = iter(items)
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
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


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(functools.partial(fh.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sidecar_path(out_dir: Path, shard_name: str) -> Path:
    return out_dir / BUILD_DIR / f"{shard_name}.json"


def _load_sidecar(out_dir: Path, group: ShardGroup) -> dict | None:
    """A finished shard from an earlier run, if its inputs are unchanged and its bytes verify."""
    sidecar = _sidecar_path(out_dir, group.name)
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != group.fingerprint:
        return None
    if record["n_samples"] == 0:
        return record
    shard = out_dir / group.name
    if not shard.is_file() or sha256_file(shard) != record.get("sha256"):
        log.info("rebuilding %s: its bytes do not match the recorded sha256", shard)
        return None
    return record


def _remove_leftovers(out_dir: Path, planned: set[str]) -> None:
    """Temp files of a killed run, and shards no longer in the plan (their stale sidecars too)."""
    for folder in (out_dir, out_dir / BUILD_DIR):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.startswith(".") and ".tmp" in path.name and path.is_file():
                log.info("removing partial file %s from an interrupted build", path)
                path.unlink()
    for path in out_dir.glob("*.tar"):
        if _SHARD_NAME.match(path.name) and path.name not in planned:
            log.info("removing %s: no longer part of this manifest/config", path)
            path.unlink()
            _sidecar_path(out_dir, path.name).unlink(missing_ok=True)


def _commit_shard(out_dir: Path, group: ShardGroup, record: dict) -> None:
    """Record a finished shard; the sidecar is written only after the tar is in place."""
    write_json(_sidecar_path(out_dir, group.name), record)


def _write_group(
    out_dir: Path, group: ShardGroup, results: Iterator[dict], on_reject: Callable[[dict], None]
) -> dict:
    shard_path = out_dir / group.name
    keys: list[str] = []
    voxels: list[list[int]] = []
    rejected: list[dict] = []
    channels: int | None = None
    with atomic_path(shard_path) as tmp:
        with open(tmp, "wb") as fh, wds.TarWriter(fh, encoder=False, mtime=0.0, user="brainfm", group="brainfm",
                                                  mode=0o644) as writer:
            for _ in group.entries:
                result = next(results)
                if "rejected" in result:
                    rejected.append(result["rejected"])
                    on_reject(result["rejected"])
                    continue
                writer.write({"__key__": result["key"], **result["members"]})
                keys.append(result["key"])
                voxels.append(result["slice_brain_voxels"])
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
        "anatomy_channels": channels,
        "rejected": rejected,
    }
    _commit_shard(out_dir, group, record)
    return record


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
    entries, early_rejects = read_manifest(manifest, config)
    recipe = recipe_dict(config.preprocess)
    groups = plan_shards(entries, config, recipe)
    out.mkdir(parents=True, exist_ok=True)
    (out / BUILD_DIR).mkdir(exist_ok=True)
    _remove_leftovers(out, {g.name for g in groups})

    records: dict[str, dict] = {}
    for group in groups:
        record = _load_sidecar(out, group)
        if record is not None:
            records[group.name] = record
    todo = [g for g in groups if g.name not in records]
    for record in early_rejects:
        log.warning("rejected %s (%s): %s", record["path"], record["reason"], record["message"])

    kept_rejects = [r for g in groups if g.name in records for r in records[g.name]["rejected"]]
    write_text(out / REJECTED_NAME, "".join(json.dumps(r) + "\n" for r in early_rejects + kept_rejects))
    todo_entries = [e for g in todo for e in g.entries]
    progress = tqdm(total=len(todo_entries), desc="shards", unit="scan", disable=None)

    with open(out / REJECTED_NAME, "a") as rejected_log:

        def on_reject(record: dict) -> None:
            log.warning("rejected %s (%s): %s", record["path"], record["reason"], record["message"])
            rejected_log.write(json.dumps(record) + "\n")
            rejected_log.flush()

        results = _ordered_map(functools.partial(encode_sample, recipe=config.preprocess), todo_entries, workers)
        counted = _counting(results, progress)
        try:
            for group in todo:
                records[group.name] = _write_group(out, group, counted, on_reject)
        finally:
            counted.close()
            progress.close()

    ordered = [records[g.name] for g in groups]
    all_rejected = sorted(early_rejects + [r for rec in ordered for r in rec["rejected"]], key=lambda r: r["row"])
    write_text(out / REJECTED_NAME, "".join(json.dumps(r) + "\n" for r in all_rejected))
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


def _make_index(records: list[dict], recipe: dict, config: DataConfig, version: str, n_rejected: int) -> dict:
    splits: dict[str, list[dict]] = {}
    subjects: dict[str, set[str]] = collections.defaultdict(set)
    for record in records:
        splits.setdefault(record["split"], [])
        if record["n_samples"] == 0:
            continue
        splits[record["split"]].append(
            {k: record[k] for k in ("name", "n_samples", "sha256", "bytes", "keys", "slice_brain_voxels")}
        )
        subjects[record["split"]].update(k.rsplit("_", 1)[0] for k in record["keys"])
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
        "counts": {
            split: {"n_samples": sum(s["n_samples"] for s in shards), "n_shards": len(shards),
                    "n_subjects": len(subjects[split])}
            for split, shards in splits.items()
        },
        "splits": splits,
    }


def load_index(shard_dir: str | os.PathLike) -> dict:
    path = Path(shard_dir)
    path = path / INDEX_NAME if path.is_dir() else path
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise BrainFMInputError(path, "no index.json: build the shards with `brainfm data shards`") from None
    except (OSError, ValueError) as exc:
        raise BrainFMInputError(path, f"unreadable index ({exc})") from exc
    if index.get("format") != FORMAT:
        raise BrainFMInputError(path, f"not a {FORMAT} index (format {index.get('format')!r})")
    return index


def verify_shards(out_dir: str | os.PathLike) -> list[str]:
    """Check every shard listed in ``index.json`` against its sha256; returns one line per problem."""
    out = Path(out_dir)
    problems = []
    for shards in load_index(out)["splits"].values():
        for shard in shards:
            path = out / shard["name"]
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif sha256_file(path) != shard["sha256"]:
                problems.append(f"{path}: sha256 mismatch (corrupt or modified)")
    return problems


# ============================================================================================================
# Reader
# ============================================================================================================


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


def count_samples(
    shard_dir: str | os.PathLike, split: str, mode: Literal["2d", "3d"] = "3d", min_brain_fraction: float = 0.05
) -> int:
    """Volumes (3D) or axial slices with enough brain (2D) in a split, from ``index.json`` alone."""
    index = load_index(shard_dir)
    shards = index["splits"].get(split, [])
    if mode == "3d":
        return sum(s["n_samples"] for s in shards)
    threshold = _threshold_voxels(min_brain_fraction, index["grid_shape"])
    return sum(int((np.asarray(v) >= threshold).sum()) for s in shards for v in s["slice_brain_voxels"])


def _local_tar(url: str) -> Path | None:
    if url.startswith("pipe:"):
        for token in reversed(shlex.split(url[5:])):
            if token.endswith(".tar") and Path(token).is_file():
                return Path(token)
        return None
    if url.startswith("file:"):
        url = url[5:]
    return Path(url) if "://" not in url else None


def resolve_shards(
    source: str | os.PathLike | Sequence[str], split: str, index: str | os.PathLike | None = None
) -> tuple[list[ShardInfo], dict]:
    """Shard URLs + their index entries from a shard directory, a brace pattern, a list, or ``pipe:`` URLs.

    The index (counts, keys, per-slice brain voxels) is what makes the epoch plan exact; for URLs it is the
    ``index.json`` beside the first local tar unless ``index`` is given.
    """
    if isinstance(source, str | os.PathLike) and Path(source).is_dir():
        folder = Path(source)
        idx = load_index(index or folder)
        if split not in idx["splits"]:
            raise BrainFMInputError(folder / INDEX_NAME, f"no split {split!r}; have {sorted(idx['splits'])}")
        entries = idx["splits"][split]
        urls = [str(folder / e["name"]) for e in entries]
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
        eligible = np.array([int((np.asarray(v) >= threshold_voxels).sum()) for v in info.slice_brain_voxels],
                            dtype=np.int64)
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
    missing = [m for m in REQUIRED_MEMBERS if m not in raw]
    if missing:
        raise _CorruptShard(url, f"sample {raw.get('__key__')!r} lacks {missing}")
    try:
        decoded = {
            name.split(".")[0]: np.lib.format.read_array(io.BytesIO(raw[name]), allow_pickle=False)
            for name in ("image.npy", "mask.npy", "anatomy.npy", "label.npy")
            if name in raw
        }
        decoded["meta"] = json.loads(raw["meta.json"])
    except (ValueError, OSError, EOFError, UnicodeDecodeError) as exc:
        raise _CorruptShard(url, f"sample {raw.get('__key__')!r} does not decode ({exc})") from exc
    shape = decoded["image"].shape
    if len(shape) != 4 or decoded["mask"].shape != shape or decoded["anatomy"].shape[1:] != shape[1:]:
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
    ) -> None:
        super().__init__()
        if mode not in ("2d", "3d"):
            raise ValueError(f"mode must be '2d' or '3d', got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        reader = augment or ReaderConfig()
        self.shards, index_data = resolve_shards(source, split, index)
        self.grid_shape = tuple(index_data["grid_shape"])
        self.mode, self.batch_size, self.seed, self.drop_last = mode, batch_size, seed, drop_last
        self.augment = augment
        self.min_brain_fraction = reader.min_brain_fraction if min_brain_fraction is None else min_brain_fraction
        self.on_corrupt = reader.on_corrupt if on_corrupt is None else on_corrupt
        if self.on_corrupt not in ("skip", "raise"):
            raise ValueError(f"on_corrupt must be 'skip' or 'raise', got {self.on_corrupt!r}")
        self.window = reader.slice_shuffle_volumes
        self.threshold = _threshold_voxels(self.min_brain_fraction, self.grid_shape)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if dist else 0)
        self.world_size = world_size if world_size is not None else (torch.distributed.get_world_size() if dist else 1)
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
            problem = f"corrupt or truncated shard ({'; '.join(str(e.args[0]) for e in errors[:1]) or 'ended early'})"
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
        arrays = {name: volume[name] for name in ("image", "mask", "anatomy", "label") if name in volume}
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
        item = {name: torch.from_numpy(np.ascontiguousarray(a[..., z]).astype(np.float32)) for name, a in arrays.items()}
        item["meta"] = meta
        item["slice_index"] = z
        item["slice_position"] = z / max(1, volume["image"].shape[-1] - 1)
        return item


def _item_seed(seed: int, epoch: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


def _collate(items: list[dict], mode: str) -> dict[str, Any]:
    batch: dict[str, Any] = {name: torch.stack([it[name] for it in items]) for name in ("image", "mask", "anatomy")}
    if any("label" in it for it in items):
        zeros = torch.zeros_like(items[0]["image"])
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
        return {"epoch": self.epoch, "batches_yielded": self.batches_yielded, "seed": self.seed,
                "corrupt_count": self.corrupt_count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.batches_yielded = int(state["batches_yielded"])
        if "seed" in state and int(state["seed"]) != self.dataset.seed:
            log.warning("resuming with the checkpoint's seed %s instead of %s", state["seed"], self.dataset.seed)
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
) -> ShardLoader:
    """Streaming, exactly-resumable loader over a split; ``min_brain_fraction``/``on_corrupt`` default to
    ``augment``'s values, or 0.05/"skip" without a ReaderConfig."""
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
    )
    return ShardLoader(dataset, num_workers=num_workers)
