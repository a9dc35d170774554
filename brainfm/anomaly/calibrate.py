"""``brainfm calibrate``: fit the healthy-cohort statistics and threshold that turn residuals into z-maps.

The model's own reconstruction of healthy validation scans gives residual statistics (per voxel, region or
globally) and a threshold at a chosen false-positive rate; the VAE-only baseline is calibrated on the same scans
so both methods are compared at the same healthy false-positive rate. The result is attached to the pipeline
(``set_calibration``) and written with the rest of the model folder by ``save_pretrained``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainfm.anomaly.deviation import residual_map
from brainfm.anomaly.inputs import check_shard_recipe
from brainfm.anomaly.normative import NormativeCalibration
from brainfm.config import DeviationConfig
from brainfm.data.manifest import read_manifest
from brainfm.io import BrainFMInputError
from brainfm.pipeline import BrainFMPipeline, scan_meta


def healthy_volumes(pipeline: BrainFMPipeline, source: Path, split: str
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, dict]]:
    """(image, mask, anatomy, meta) of healthy scans: from shards (already preprocessed with the same recipe) or
    from a manifest (preprocessed here with the model's recipe; a row the manifest reader rejects fails the whole
    calibration). A scan with a lesion label is never used, even when the label is empty: a labelled scan is not
    a healthy control."""
    if source.is_dir():
        from brainfm.data.reader import make_dataloader

        check_shard_recipe(pipeline, source)
        loader = make_dataloader(source, split, mode="3d", batch_size=1, drop_last=False, min_brain_fraction=0.0,
                                 on_corrupt="raise")
        for batch in loader:
            meta = batch["meta"][0]
            if batch.get("label") is not None and bool(batch["label_present"][0]):
                continue  # calibration must see healthy scans only
            mask = batch["mask"][0]
            anatomy = torch.cat([mask, batch["anatomy"][0]]).numpy().astype(np.float32)
            yield (batch["image"][0, 0].numpy().astype(np.float32), mask[0].numpy() > 0, anatomy,
                   scan_meta(meta["modality"], meta, meta.get("scalars") or {}))
        return
    items, rejected = read_manifest(source)
    if rejected:  # calibrating on fewer scans than the manifest lists would go unnoticed: refuse instead
        raise BrainFMInputError(None, rejected[0].message)  # the message names the file
    for item in items:
        if (item.split and item.split != split) or item.label is not None:
            continue
        prepared = pipeline.prepare(item.path, item.modality, item.mask, meta=item.meta)
        yield prepared.scan.image, prepared.scan.mask > 0, prepared.anatomy, prepared.meta


def calibrate(
    pipeline: BrainFMPipeline,
    source: str | Path,
    split: str = "val",
    *,
    config: DeviationConfig | None = None,
    include_vae_baseline: bool = True,
    max_scans: int | None = None,
    progress: bool = True,
) -> NormativeCalibration:
    """Fit the healthy-cohort calibration (z-map statistics and threshold) and attach it to ``pipeline``.

    ``source``: a shard folder (uses ``split``) or a manifest CSV (rows of ``split`` — or all rows without a
    split column — that have no lesion label). Save the calibrated model with ``pipeline.save_pretrained``.
    """
    volumes = healthy_volumes(pipeline, Path(source), split)
    if max_scans is not None:
        volumes = itertools.islice(volumes, max_scans)
    return calibrate_volumes(pipeline, volumes, config=config, include_vae_baseline=include_vae_baseline,
                             progress=progress, source=str(source), split=split)


def calibrate_volumes(
    pipeline: BrainFMPipeline,
    volumes: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, dict]],
    *,
    config: DeviationConfig | None = None,
    include_vae_baseline: bool = True,
    progress: bool = True,
    **provenance: Any,
) -> NormativeCalibration:
    """The calibration itself, on healthy (image, mask, anatomy, meta) volumes already on the model grid (what
    :func:`healthy_volumes` yields; site adaptation passes the scans it prepared); ``provenance`` (source,
    split, ...) is recorded in the model's calibration summary."""
    from tqdm.auto import tqdm

    config = config or DeviationConfig()
    methods = {"ldm": pipeline.reconstructor(vae_only=False)}
    if include_vae_baseline:
        methods["vae"] = pipeline.reconstructor(vae_only=True)
    residuals: dict[str, list[np.ndarray]] = {k: [] for k in methods}
    masks: list[np.ndarray] = []
    for image, mask, anatomy, meta in tqdm(volumes, desc="calibrate", unit="scan", disable=not progress or None):
        masks.append(mask)
        for key, reconstructor in methods.items():
            recon, _ = reconstructor.reconstruct(torch.from_numpy(image)[None], torch.from_numpy(anatomy), meta)
            residuals[key].append(residual_map(image, recon[0].numpy() * mask, mask, config.residual))
    if len(masks) < 2:
        where = provenance.get("source")
        split = f" in split {provenance['split']!r}" if provenance.get("split") else ""
        raise BrainFMInputError(where, f"calibration needs at least 2 healthy scans{split}, found {len(masks)}")
    fitted = {key: NormativeCalibration.fit(residuals[key], masks, config) for key in methods}
    pipeline.set_calibration(fitted["ldm"], fitted.get("vae"), **provenance)
    return fitted["ldm"]


__all__ = ["calibrate", "calibrate_volumes", "healthy_volumes"]
