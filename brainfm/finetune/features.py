"""The fine-tuning data: each scan with its pseudo-healthy reconstruction and calibrated z-map.

Reconstruction is the expensive part (tens of UNet calls per slice), and every head of a label-efficiency curve or
cross-disease matrix sees the same scans, so the features are computed once with the frozen foundation model and
cached as safetensors (+ JSON for names, subjects, metadata and lesion kinds) in the run folder. The split into
calibration controls, training pool and test scans lives in ``brainfm.finetune.split``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brainfm.config import DeviationConfig, FinetuneDataSection, from_dict, to_dict
from brainfm.io import BrainFMInputError, atomic_dir, write_json

log = logging.getLogger(__name__)

FEATURES_ARRAYS = "features.safetensors"
FEATURES_JSON = "features.json"
HEALTHY = "healthy"


@dataclasses.dataclass
class ScanVolume:
    """One preprocessed scan on the model grid (what the foundation model consumes)."""

    name: str
    image: np.ndarray  # (X, Y, Z) float32 in the model's [0, 1] intensity
    mask: np.ndarray  # (X, Y, Z) bool brain mask
    anatomy: np.ndarray  # (C, X, Y, Z) brain mask + tissue priors
    meta: dict[str, Any]
    label: np.ndarray | None = None  # (X, Y, Z) uint8; None = unknown (not "healthy")
    lesion_type: str = HEALTHY
    voxel_volume_ml: float = 0.008
    subject: str = ""  # the manifest's subject id (default: the scan name); splits and checks go by subject

    def __post_init__(self) -> None:
        self.subject = self.subject or self.name


@dataclasses.dataclass
class ScanRecord(ScanVolume):
    """A scan plus what the frozen foundation model says about it."""

    pseudo_healthy: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))
    zmap: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))  # post-processed z

    @property
    def has_lesion(self) -> bool:
        return self.label is not None and bool(self.label.any())


@dataclasses.dataclass
class FeatureSet:
    """Every scan's record plus the calibration facts the heads are trained and evaluated against."""

    records: list[ScanRecord]
    z_threshold: float  # the healthy-calibrated z threshold of the unsupervised map
    deviation: DeviationConfig  # post-processing of that map (erosion, components): heads are scored the same way
    source: dict[str, Any]  # model folder, manifest, method: the provenance written into every report

    def by_name(self) -> dict[str, ScanRecord]:
        return {r.name: r for r in self.records}

    def save(self, directory: str | os.PathLike) -> Path:
        """Arrays in one safetensors file, the rest in JSON; the folder appears complete or not at all."""
        from safetensors.numpy import save_file

        directory = Path(directory)
        arrays: dict[str, np.ndarray] = {}
        entries = []
        for i, r in enumerate(self.records):
            for key in ("image", "anatomy", "pseudo_healthy", "zmap"):
                arrays[f"{i}.{key}"] = np.ascontiguousarray(getattr(r, key), dtype=np.float32)
            arrays[f"{i}.mask"] = np.ascontiguousarray(r.mask, dtype=np.uint8)
            if r.label is not None:
                arrays[f"{i}.label"] = np.ascontiguousarray(r.label, dtype=np.uint8)
            entries.append({"name": r.name, "subject": r.subject, "meta": r.meta, "lesion_type": r.lesion_type,
                            "labelled": r.label is not None, "voxel_volume_ml": r.voxel_volume_ml})
        with atomic_dir(directory) as tmp:
            save_file(arrays, str(tmp / FEATURES_ARRAYS))
            write_json(tmp / FEATURES_JSON, {"z_threshold": self.z_threshold, "deviation": to_dict(self.deviation),
                                             "source": self.source, "scans": entries})
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> FeatureSet:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        directory = Path(directory)
        try:
            info = json.loads((directory / FEATURES_JSON).read_bytes())
            arrays = load_file(str(directory / FEATURES_ARRAYS))
        except FileNotFoundError as exc:
            raise BrainFMInputError(directory, f"incomplete feature cache ({Path(exc.filename).name} missing)") from exc
        except (OSError, ValueError, SafetensorError) as exc:
            raise BrainFMInputError(directory, f"unreadable feature cache ({exc}); delete it to recompute the "
                                               "features") from exc
        records = []
        if any("subject" not in entry for entry in info["scans"]):
            raise BrainFMInputError(directory, "feature cache without subject ids (older brainfm); delete it to "
                                               "recompute the features")
        for i, entry in enumerate(info["scans"]):
            records.append(ScanRecord(
                name=entry["name"], subject=entry["subject"], image=arrays[f"{i}.image"], mask=arrays[f"{i}.mask"] > 0,
                anatomy=arrays[f"{i}.anatomy"], meta=entry["meta"],
                label=arrays[f"{i}.label"] if entry["labelled"] else None, lesion_type=entry["lesion_type"],
                voxel_volume_ml=float(entry["voxel_volume_ml"]), pseudo_healthy=arrays[f"{i}.pseudo_healthy"],
                zmap=arrays[f"{i}.zmap"],
            ))
        return cls(records=records, z_threshold=float(info["z_threshold"]),
                   deviation=from_dict(DeviationConfig, info["deviation"]), source=info["source"])


# ------------------------------------------------------------------------------------------------------ sources
def scans_from_manifest(model: Any, manifest: str | os.PathLike, max_scans: int | None = None) -> Iterator[ScanVolume]:
    """Preprocess a cohort CSV with the model's stored recipe; unusable rows are logged and skipped."""
    from brainfm.data.manifest import read_manifest

    count = 0
    items, rejected = read_manifest(manifest)
    for rejection in rejected:
        log.warning("skipping %s", rejection.message)
    for item in items:
        if max_scans is not None and count >= max_scans:
            break
        try:
            prepared = model.prepare(item.path, item.modality, item.mask, item.label, meta=item.meta,
                                     t1_path=item.t1)
        except BrainFMInputError as exc:
            log.warning("skipping %s", exc)
            continue
        scan = prepared.scan
        label = None if item.label is None else (np.asarray(scan.label) > 0).astype(np.uint8)
        kind = (item.lesion_type or "lesion") if label is not None and label.any() else HEALTHY
        count += 1
        yield ScanVolume(name=item.name, image=np.asarray(scan.image, np.float32),
                         mask=np.asarray(scan.mask) > 0, anatomy=prepared.anatomy, meta=prepared.meta, label=label,
                         lesion_type=kind, voxel_volume_ml=prepared.voxel_volume_ml, subject=item.subject)


def build_features(model: Any, scans: Iterable[ScanVolume], *, vae_only: bool = False,
                   source: dict[str, Any] | None = None, progress: bool = False) -> FeatureSet:
    """Pseudo-healthy reconstruction and calibrated z-map of every scan, with the frozen model."""
    from tqdm.auto import tqdm

    calibration = model.calibration_for(vae_only)
    reconstructor = model.reconstructor(vae_only=vae_only)
    records = []
    for scan in tqdm(scans, desc="features", unit="scan", disable=not progress or None):
        analysis = model.analyse(scan.image, scan.mask, scan.anatomy, scan.meta, reconstructor=reconstructor,
                                 calibration=calibration, source=scan.name)
        fields = {f.name: getattr(scan, f.name) for f in dataclasses.fields(ScanVolume)}
        records.append(ScanRecord(**fields, pseudo_healthy=analysis.reconstruction,
                                  zmap=(analysis.zmap * scan.mask).astype(np.float32)))
    if not records:
        raise BrainFMInputError(None, "no scan to compute fine-tuning features from")
    provenance = {"model": str(model.model_dir or ""), "spatial_dims": int(model.spatial_dims),
                  "method": "vae" if vae_only else "ldm",
                  "reconstruction": reconstructor.settings(), **(source or {})}
    return FeatureSet(records=records, z_threshold=float(calibration.threshold), deviation=calibration.config,
                      source=provenance)


def load_or_build_features(config: FinetuneDataSection, cache_dir: Path, progress: bool = True) -> FeatureSet:
    """The run's feature cache, computed on first use (and reused by ``--resume`` and every later head)."""
    if (cache_dir / FEATURES_JSON).is_file():
        return FeatureSet.load(cache_dir)
    from brainfm.pipeline import BrainFMPipeline, default_device

    model = BrainFMPipeline.from_pretrained(config.model).to(default_device())
    scans = scans_from_manifest(model, config.manifest, config.max_scans)
    features = build_features(model, scans, vae_only=config.vae_only, progress=progress,
                              source={"manifest": str(config.manifest)})
    features.save(cache_dir)
    return features


# ------------------------------------------------------------------------------------------------------ records
def select(features: FeatureSet, names: Sequence[str]) -> list[ScanRecord]:
    lookup = features.by_name()
    return [lookup[n] for n in names]


def hide_label(record: ScanRecord) -> ScanRecord:
    """The same scan as unlabelled data: its label must not reach the training loss."""
    return dataclasses.replace(record, label=None)


__all__ = [
    "FeatureSet",
    "ScanRecord",
    "ScanVolume",
    "build_features",
    "hide_label",
    "load_or_build_features",
    "scans_from_manifest",
    "select",
]
