"""What detect, calibrate and evaluate read: one scan, a DICOM series folder, a cohort CSV, or a shard folder."""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path
from typing import Any

from brainfm.io import BrainFMInputError

_SUFFIXES = (".nii.gz", ".nii", ".dcm", ".mha", ".nrrd")


@dataclasses.dataclass
class ScanInput:
    path: Path
    modality: str | None = None
    mask: Path | None = None
    label: Path | None = None
    name: str | None = None
    lesion_type: str | None = None
    split: str | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def scan_name(path: str | os.PathLike) -> str:
    """Output stem of a scan: file name without its image suffix (a DICOM folder's own name)."""
    name = Path(path).name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or "scan"
    return name or "scan"


def read_scan_manifest(manifest: str | os.PathLike) -> list[ScanInput]:
    """Rows of a cohort CSV (``path`` required; ``modality``, ``mask``, ``label``, ``subject``, ``lesion_type``,
    ``age``, ``sex``, ``site`` optional); relative paths are relative to the CSV's folder."""
    manifest = Path(manifest)
    try:
        with manifest.open(newline="") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except FileNotFoundError:
        raise BrainFMInputError(manifest, "manifest file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BrainFMInputError(manifest, f"unreadable manifest CSV ({exc})") from exc
    if "path" not in columns:
        raise BrainFMInputError(manifest, f"manifest needs a 'path' column; found {columns}")

    def resolve(value: str) -> Path | None:
        if not value:
            return None
        return Path(value) if Path(value).is_absolute() else manifest.parent / value

    inputs, names = [], set()
    for number, row in enumerate(rows, start=2):
        if not row.get("path"):
            raise BrainFMInputError(manifest, f"row {number}: empty 'path'")
        name = row.get("subject") or scan_name(row["path"])
        if name in names:
            name = f"{name}_row{number}"
        names.add(name)
        inputs.append(ScanInput(
            path=resolve(row["path"]), modality=(row.get("modality") or None), mask=resolve(row.get("mask", "")),
            label=resolve(row.get("label", "")), name=name,
            lesion_type=row.get("lesion_type") or None, split=row.get("split") or None,
            meta={k: row[k] for k in ("age", "sex", "site") if row.get(k)},
        ))
    return inputs


def collect_inputs(source: str | os.PathLike, modality: str | None = None,
                   mask: str | os.PathLike | None = None) -> list[ScanInput]:
    """``source`` is a scan file, a DICOM series folder, or a manifest CSV."""
    source = Path(source)
    if source.suffix.lower() == ".csv":
        if mask is not None:
            raise BrainFMInputError(source, "--mask applies to a single scan; give masks in the manifest's 'mask' column")
        inputs = read_scan_manifest(source)
        for item in inputs:
            item.modality = item.modality or modality
        return inputs
    return [ScanInput(path=source, modality=modality, mask=None if mask is None else Path(mask))]


def check_shard_recipe(pipeline: Any, shard_dir: Path) -> None:
    """Shards hold scans already preprocessed: only usable when built with the model's own recipe."""
    from brainfm.data.shards import load_index
    from brainfm.pipeline import recipe_from_payload

    stored = recipe_from_payload(load_index(shard_dir).get("recipe", {}), shard_dir / "index.json")
    if stored != pipeline.recipe:
        raise BrainFMInputError(shard_dir, "shards were built with a different preprocessing recipe than the model's")


EMPTY_LABEL = "lesion label is empty after preprocessing (lesion outside the model's field of view or smaller " \
              "than a voxel); a labelled scan is never counted as a healthy control"
