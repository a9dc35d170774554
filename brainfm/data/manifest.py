"""The one reader of cohort CSV manifests (shard building, detect, calibrate, evaluate, fine-tuning).

A manifest has a ``path`` column (a NIfTI file or a DICOM series folder) and optional ``subject``,
``dataset``, ``modality``, ``age``, ``sex``, ``site``, ``split``, ``mask``, ``label``, ``lesion_type`` and ``t1``
columns; any other column is kept in ``ManifestRow.extra``. ``t1`` names a T1 of the same subject in the same world
coordinates (co-registered, as a session's series or BraTS-style data are): for a T2/FLAIR/PD/post-contrast scan
without a ``mask``, the brain is extracted on that T1 and carried over (``brainfm.data.extraction``). Relative paths resolve against the CSV's own
folder, so a cohort folder can be moved whole. A row that cannot be used (empty path, a file that does not
exist, an unknown modality, an age that is not a number) becomes a ``Rejection`` instead of stopping the whole
cohort; a manifest that cannot be read at all raises ``BrainFMInputError``.

``assign_splits`` gives every row its subject-level split (the shard writer's train/val/test).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from brainfm.config import MODALITIES
from brainfm.io import BrainFMInputError

KNOWN_COLUMNS = (
    "path",
    "subject",
    "dataset",
    "modality",
    "age",
    "sex",
    "site",
    "split",
    "mask",
    "label",
    "lesion_type",
    "t1",
)
SCAN_SUFFIXES = (".nii.gz", ".nii", ".dcm", ".mha", ".nrrd")


@dataclasses.dataclass(frozen=True)
class ManifestRow:
    """One usable manifest row: absolute paths, upper-case modality, empty cells as ``None``."""

    row: int  # CSV line number (the header is line 1): what a user looks up in the file
    path: Path
    subject: str  # the ``subject`` cell, else the scan's file stem
    name: str  # unique among the manifest's rows: the stem of per-scan output files
    modality: str | None = None
    split: str | None = None
    dataset: str | None = None
    sex: str | None = None
    site: str | None = None
    age: float | None = None
    mask: Path | None = None
    label: Path | None = None
    lesion_type: str | None = None
    t1: Path | None = None  # co-registered T1 of the same subject (brain extraction of other contrasts)
    extra: dict[str, str] = dataclasses.field(default_factory=dict)
    # multi-channel input: (modality, file) of the subject's other contrasts, stacked after this scan's
    # (``brainfm.data.channels``); empty for one scan, one channel
    channels: tuple[tuple[str, Path], ...] = ()

    @classmethod
    def single(
        cls,
        path: str | os.PathLike,
        *,
        modality: str | None = None,
        mask: str | os.PathLike | None = None,
        t1: str | os.PathLike | None = None,
    ) -> ManifestRow:
        """The record of one scan given on the command line instead of in a manifest."""
        path = Path(path)
        return cls(
            row=0,
            path=path,
            subject=scan_stem(path),
            name=scan_stem(path),
            modality=modality.upper() if modality else None,
            mask=None if mask is None else Path(mask),
            t1=None if t1 is None else Path(t1),
        )

    @property
    def meta(self) -> dict[str, Any]:
        """The metadata cells the conditioner reads (age, sex, site), only those given."""
        return {k: v for k, v in (("age", self.age), ("sex", self.sex), ("site", self.site)) if v is not None}


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A scan left out, with a machine-readable ``reason`` and a one-line ``message`` naming the file."""

    row: int
    path: str
    subject: str
    reason: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def scan_stem(path: str | os.PathLike) -> str:
    """A scan's file name without its image suffix (a DICOM folder's own name), else ``"scan"``."""
    name = Path(path).name
    for suffix in SCAN_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or "scan"
    return name or "scan"


def _read_rows(manifest: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [
                (
                    reader.line_num,
                    {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None},
                )
                for row in reader
            ]
    except FileNotFoundError:
        raise BrainFMInputError(manifest, "manifest file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BrainFMInputError(manifest, f"unreadable manifest CSV ({exc})") from exc
    if "path" not in columns:
        raise BrainFMInputError(manifest, f"manifest needs a 'path' column; found {columns}")
    return columns, rows


def read_manifest(
    path: str | os.PathLike, *, default_modality: str | None = None
) -> tuple[list[ManifestRow], list[Rejection]]:
    """Every row of a cohort CSV, as usable rows and rejected rows (each in manifest order).

    ``default_modality`` fills empty ``modality`` cells (the shard writer uses ``"T1"``; detect passes the
    command line's ``--modality`` or ``None`` to let the model decide).
    """
    manifest = Path(path)
    if manifest.is_dir():
        raise BrainFMInputError(manifest, "manifest is a folder; give the cohort CSV file")
    columns, rows = _read_rows(manifest)
    base = manifest.parent
    extra_columns = [c for c in columns if c and c not in KNOWN_COLUMNS]

    def resolve(value: str) -> Path | None:
        if not value:
            return None
        return Path(value) if Path(value).is_absolute() else base / value

    accepted: list[ManifestRow] = []
    rejected: list[Rejection] = []
    names: set[str] = set()
    for line, cells in rows:
        raw_path = cells.get("path", "")
        scan = resolve(raw_path)
        subject = cells.get("subject") or (scan_stem(raw_path) if raw_path else f"row{line}")
        modality = (cells.get("modality") or default_modality or "").upper() or None
        problems: list[tuple[str, str]] = []
        if scan is None:
            problems.append(("missing_path", "empty 'path' cell"))
        for column in ("path", "mask", "label", "t1"):
            target = resolve(cells.get(column, ""))
            if target is not None and not target.exists():
                problems.append(("missing_file", f"{column} file not found: {target}"))
        if modality is not None and modality not in MODALITIES:
            problems.append(
                ("bad_modality", f"unknown modality {modality!r}; expected one of {list(MODALITIES)}")
            )
        age: float | None = None
        if cells.get("age"):
            try:
                age = float(cells["age"])
            except ValueError:
                problems.append(("bad_metadata", f"age {cells['age']!r} is not a number"))
        if problems:
            reason, problem = problems[0]
            where = str(scan) if scan is not None else f"{manifest} row {line}"
            rejected.append(Rejection(line, where, subject, reason, str(BrainFMInputError(where, problem))))
            continue
        name = cells.get("subject") or scan_stem(raw_path)
        if name in names:
            name = f"{name}_row{line}"
        names.add(name)
        accepted.append(
            ManifestRow(
                row=line,
                path=scan,
                subject=subject,
                name=name,
                modality=modality,
                split=cells.get("split") or None,
                dataset=cells.get("dataset") or None,
                sex=cells.get("sex") or None,
                site=cells.get("site") or None,
                age=age,
                mask=resolve(cells.get("mask", "")),
                label=resolve(cells.get("label", "")),
                lesion_type=cells.get("lesion_type") or None,
                t1=resolve(cells.get("t1", "")),
                extra={c: cells.get(c, "") for c in extra_columns},
            )
        )
    return accepted, rejected


def sanitize_key(text: str) -> str:
    """Names that become parts of file names (WebDataset keys, split names) keep only [A-Za-z0-9_-]:
    WebDataset splits a member name at its first dot."""
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


def assign_splits(
    rows: Sequence[ManifestRow], fractions: dict[str, float], seed: int, manifest: str | os.PathLike
) -> list[ManifestRow]:
    """Every row with its split: the subject's explicit ``split`` cell, else a hash of the subject id into
    ``fractions`` (a dict split -> fraction, in order).

    Conflicting explicit splits for one subject are a manifest error: a subject must never leak across splits.
    """
    explicit: dict[str, str] = {}
    for row in rows:
        if row.split is None:
            continue
        if sanitize_key(row.split) != row.split:
            raise BrainFMInputError(
                manifest, f"row {row.row}: split {row.split!r} must use only [A-Za-z0-9_-]"
            )
        if explicit.setdefault(row.subject, row.split) != row.split:
            raise BrainFMInputError(
                manifest,
                f"subject {row.subject!r} is listed in splits {explicit[row.subject]!r} and {row.split!r}",
            )
    return [
        dataclasses.replace(
            row, split=explicit.get(row.subject) or _subject_split(row.subject, fractions, seed)
        )
        for row in rows
    ]
