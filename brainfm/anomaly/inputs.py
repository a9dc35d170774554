"""What detect, calibrate and evaluate read: one scan, a DICOM series folder, a cohort CSV, or a shard folder.

A cohort CSV is read by the one manifest reader (:func:`brainfm.data.manifest.read_manifest`); its rows that
cannot be used come back as rejections, which each command reports in its own way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from brainfm.data.manifest import ManifestRow, Rejection, read_manifest
from brainfm.data.preprocess import recipe_from_dict
from brainfm.io import BrainFMInputError


def collect_inputs(source: str | os.PathLike, modality: str | None = None, mask: str | os.PathLike | None = None,
                   t1: str | os.PathLike | None = None) -> tuple[list[ManifestRow], list[Rejection]]:
    """``source`` is a scan file, a DICOM series folder, or a manifest CSV; returns usable and rejected rows."""
    source = Path(source)
    if source.suffix.lower() == ".csv":
        for option, value, column in (("--mask", mask, "mask"), ("--t1", t1, "t1")):
            if value is not None:
                raise BrainFMInputError(source, f"{option} applies to a single scan; give it in the manifest's "
                                                f"'{column}' column")
        return read_manifest(source, default_modality=modality)
    return [ManifestRow.single(source, modality=modality, mask=mask, t1=t1)], []


def check_shard_recipe(pipeline: Any, shard_dir: Path) -> None:
    """Shards hold scans already preprocessed: only usable when built with the model's own recipe."""
    from brainfm.data.writer import load_index

    stored = recipe_from_dict(load_index(shard_dir).get("recipe", {}), shard_dir / "index.json")
    if stored != pipeline.recipe:
        raise BrainFMInputError(shard_dir, "shards were built with a different preprocessing recipe than the model's")


def model_image(image: Any) -> np.ndarray:
    """A shard sample's image (C, X, Y, Z) as the anomaly code takes it: the volume (X, Y, Z) of a one-channel
    model, the (C, X, Y, Z) stack of a multi-channel one; float32."""
    array = np.asarray(image, dtype=np.float32)
    return array[0] if array.shape[0] == 1 else array


EMPTY_LABEL = "lesion label holds no lesion voxel on the model grid; a labelled scan is never counted as a " \
              "healthy control (leave the label empty for a healthy control)"
