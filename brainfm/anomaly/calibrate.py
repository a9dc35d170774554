"""``brainfm calibrate``: fit the healthy-cohort statistics and threshold that turn residuals into z-maps.

The model's own reconstruction of healthy validation scans gives residual statistics (per voxel, region or
globally) and a threshold at a chosen false-positive rate, under the default post-processing and under each
post-processing variant; the VAE-only baseline is calibrated on the same scans so both methods are compared at the
same healthy false-positive rate. Labelled validation scans of small lesion types (if the split has any) choose
each method's small-lesion post-processing; they never enter the statistics or the thresholds. With
``baselines=True`` the intensity and normative-atlas baselines (and the prior-fit check) are calibrated on the
same healthy scans, the atlas from the healthy scans of ``atlas_split`` (training). The result is attached to the
pipeline (``set_calibration``, ``set_baselines``) and written with the model folder by ``save_pretrained``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainfm.anomaly.baselines import HealthyScan, baseline_score, choose_small_lesion_variant, fit_baselines
from brainfm.anomaly.deviation import SMALL_LESION_TYPES, channel_residual
from brainfm.anomaly.inputs import check_shard_recipe, model_image
from brainfm.anomaly.normative import NormativeCalibration
from brainfm.config import DeviationConfig
from brainfm.data.manifest import read_manifest
from brainfm.io import BrainFMInputError
from brainfm.pipeline import BrainFMPipeline, scan_meta


@dataclasses.dataclass
class CalibrationScan:
    """A validation scan on the model grid; ``label`` None for a healthy control."""

    image: np.ndarray  # (X, Y, Z); a multi-channel model's (C, X, Y, Z)
    mask: np.ndarray
    anatomy: np.ndarray
    meta: dict[str, Any]
    label: np.ndarray | None = None
    lesion_type: str | None = None

    def healthy_scan(self) -> HealthyScan:
        return HealthyScan(self.image, self.mask, self.anatomy, str(self.meta["modality"]).upper())


def calibration_scans(pipeline: BrainFMPipeline, source: Path, split: str,
                      lesion_types: Sequence[str] = ()) -> Iterator[CalibrationScan]:
    """Healthy scans of ``split`` (and its labelled scans of ``lesion_types``), from shards (already preprocessed
    with the same recipe) or from a manifest (preprocessed here with the model's recipe; a row the manifest reader
    rejects fails the whole calibration). A scan with a lesion label is never a healthy control, even when the
    label is empty."""
    if source.is_dir():
        from brainfm.data.reader import make_dataloader

        check_shard_recipe(pipeline, source)
        loader = make_dataloader(source, split, mode="3d", batch_size=1, drop_last=False, min_brain_fraction=0.0,
                                 on_corrupt="raise")
        for batch in loader:
            meta = batch["meta"][0]
            labelled = batch.get("label") is not None and bool(batch["label_present"][0])
            if labelled and meta.get("lesion_type") not in lesion_types:
                continue  # calibration sees healthy scans (and small-lesion validation scans) only
            mask = batch["mask"][0]
            anatomy = torch.cat([mask, batch["anatomy"][0]]).numpy().astype(np.float32)
            label = batch["label"][0, 0].numpy() > 0.5 if labelled else None
            if label is not None and not label.any():
                continue
            yield CalibrationScan(model_image(batch["image"][0]), mask[0].numpy() > 0, anatomy,
                                  scan_meta(meta["modality"], meta, meta.get("scalars") or {}), label,
                                  meta.get("lesion_type") if labelled else None)
        return
    items, rejected = read_manifest(source)
    if rejected:  # calibrating on fewer scans than the manifest lists would go unnoticed: refuse instead
        raise BrainFMInputError(None, rejected[0].message)  # the message names the file
    for item in items:
        if (item.split and item.split != split) or (item.label is not None and item.lesion_type not in lesion_types):
            continue
        prepared = pipeline.prepare(item.path, item.modality, item.mask, item.label, meta=item.meta, t1_path=item.t1)
        label = None if item.label is None else np.asarray(prepared.scan.label) > 0
        if label is not None and not label.any():
            continue
        yield CalibrationScan(prepared.scan.image, prepared.scan.mask > 0, prepared.anatomy, prepared.meta, label,
                              item.lesion_type if label is not None else None)


def healthy_volumes(pipeline: BrainFMPipeline, source: Path, split: str
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, dict]]:
    """(image, mask, anatomy, meta) of the healthy scans of ``split`` (see :func:`calibration_scans`)."""
    for scan in calibration_scans(pipeline, source, split):
        yield scan.image, scan.mask, scan.anatomy, scan.meta


def calibrate(
    pipeline: BrainFMPipeline,
    source: str | Path,
    split: str = "val",
    *,
    config: DeviationConfig | None = None,
    include_vae_baseline: bool = True,
    baselines: bool = False,
    atlas_split: str = "train",
    max_scans: int | None = None,
    progress: bool = True,
) -> NormativeCalibration:
    """Fit the healthy-cohort calibration (z-map statistics and thresholds) and attach it to ``pipeline``.

    ``source``: a shard folder (uses ``split``) or a manifest CSV (rows of ``split`` — or all rows without a
    split column — that have no lesion label; labelled rows of small lesion types choose the small-lesion
    post-processing). ``max_scans`` caps the healthy scans. ``baselines``: also fit the trivial baselines, the
    normative atlas from the healthy scans of ``atlas_split``. Save the calibrated model with
    ``pipeline.save_pretrained``.
    """
    source = Path(source)
    scans = calibration_scans(pipeline, source, split, SMALL_LESION_TYPES)
    if max_scans is not None:
        scans = _first_healthy(scans, max_scans)
    atlas = (s.healthy_scan() for s in calibration_scans(pipeline, source, atlas_split)) if baselines else None
    return calibrate_volumes(pipeline, scans, config=config, include_vae_baseline=include_vae_baseline,
                             progress=progress, atlas=atlas, atlas_split=atlas_split, source=str(source),
                             split=split)


def _first_healthy(scans: Iterable[CalibrationScan], count: int) -> Iterator[CalibrationScan]:
    """Every labelled scan but only the first ``count`` healthy ones, reading no healthy scan beyond them."""
    healthy = 0
    for scan in scans:
        if scan.label is None:
            if healthy >= count:
                continue
            healthy += 1
        yield scan


def calibrate_volumes(
    pipeline: BrainFMPipeline,
    scans: Iterable[CalibrationScan],
    *,
    config: DeviationConfig | None = None,
    include_vae_baseline: bool = True,
    progress: bool = True,
    atlas: Iterable[HealthyScan] | None = None,
    atlas_split: str = "train",
    leave_one_out: bool = False,
    **provenance: Any,
) -> NormativeCalibration:
    """The calibration itself, on scans already on the model grid (what :func:`calibration_scans` yields; site
    adaptation passes the scans it prepared). Labelled scans only choose the small-lesion post-processing.
    ``atlas``: healthy scans for the baselines' normative atlas (None: no baselines). ``provenance`` (source,
    split, ...) is recorded in the model's calibration summary. ``leave_one_out``: thresholds set on each healthy
    scan scored against the others' statistics (:meth:`NormativeCalibration.fit`), for a handful of scans."""
    from tqdm.auto import tqdm

    config = config or DeviationConfig()
    methods = {"ldm": pipeline.reconstructor(vae_only=False)}
    if include_vae_baseline:
        methods["vae"] = pipeline.reconstructor(vae_only=True)
    residuals: dict[str, list[np.ndarray]] = {k: [] for k in methods}
    lesion_residuals: dict[str, list[np.ndarray]] = {k: [] for k in methods}
    masks: list[np.ndarray] = []
    healthy: list[CalibrationScan] = []
    lesions: list[CalibrationScan] = []
    for scan in tqdm(scans, desc="calibrate", unit="scan", disable=not progress or None):
        for key, reconstructor in methods.items():
            stacked = scan.image if scan.image.ndim == 4 else scan.image[None]  # (C, X, Y, Z)
            recon, _ = reconstructor.reconstruct(torch.from_numpy(stacked), torch.from_numpy(scan.anatomy), scan.meta)
            recon = recon.numpy() if scan.image.ndim == 4 else recon[0].numpy()
            residual = channel_residual(scan.image, recon * scan.mask, scan.mask, config.residual)
            (residuals if scan.label is None else lesion_residuals)[key].append(residual)
        if scan.label is not None:
            lesions.append(scan)
            continue
        masks.append(scan.mask)
        if atlas is not None:  # the baselines' statistics need the healthy scans themselves
            if scan.image.ndim == 4:
                raise BrainFMInputError(provenance.get("source"), "the baselines score one contrast per scan; "
                                                                  "calibrate a multi-channel model without them")
            healthy.append(scan)
    if len(masks) < 2:
        where = provenance.get("source")
        split = f" in split {provenance['split']!r}" if provenance.get("split") else ""
        raise BrainFMInputError(where, f"calibration needs at least 2 healthy scans{split}, found {len(masks)}")
    fitted = {key: NormativeCalibration.fit(residuals[key], masks, config, leave_one_out=leave_one_out)
              for key in methods}
    lesion_masks, labels = [s.mask for s in lesions], [s.label for s in lesions]
    kinds = [str(s.lesion_type) for s in lesions]
    for key, calibration in fitted.items():
        choose_small_lesion_variant(calibration, lesion_residuals[key], lesion_masks, labels, kinds)
    pipeline.set_calibration(fitted["ldm"], fitted.get("vae"), **provenance)
    if atlas is not None:
        fitted_baselines = fit_baselines([s.healthy_scan() for s in healthy], atlas, config)
        for method, per_modality in fitted_baselines.entries.items():
            for modality, entry in per_modality.items():
                chosen = [s for s in lesions if str(s.meta["modality"]).upper() == modality]
                scores = [baseline_score(method, entry, s.image, s.mask, s.anatomy)[0] for s in chosen]
                choose_small_lesion_variant(entry.calibration, scores, [s.mask for s in chosen],
                                            [s.label for s in chosen], [str(s.lesion_type) for s in chosen])
        pipeline.set_baselines(fitted_baselines, atlas_split=atlas_split)
    return fitted["ldm"]


__all__ = ["CalibrationScan", "calibrate", "calibrate_volumes", "calibration_scans", "healthy_volumes"]
