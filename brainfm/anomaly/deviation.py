"""Deviation maps of one scan: residual -> z-map -> post-processing -> binary mask and subject score.

A raw residual |scan - pseudo-healthy| is larger wherever the model is unsure (cortex, ventricle edges), so the
same lesion would score differently by location; :mod:`brainfm.anomaly.normative` turns it into a deviation (z) map
with statistics of HEALTHY scans. This module holds the per-scan operations every step shares: the residual, the
post-processing of a z-map, the binary mask at a threshold and the subject score.

Residual kinds: ``abs`` = |image - reconstruction|; ``signed_pos`` = image - reconstruction (hyperintense lesions
score high); ``signed_neg`` = reconstruction - image (hypointense lesions score high). Signed residuals keep both
signs so their healthy z is close to N(0, 1); only the high end is ever thresholded.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

from brainfm.config import DeviationConfig
from brainfm.io import BrainFMInputError

# Post-processing settings every calibration is also thresholded under: name -> (median filter size, minimum
# connected-component size). A 3x3x3 median filter and a 5-voxel minimum erase lesions of 2-8 voxels (MS plaques,
# small-vessel dots at 3 mm), so reports show "unfiltered" beside the default, and the setting used for small
# lesions is chosen among these on labelled validation scans of SMALL_LESION_TYPES only.
UNFILTERED = "unfiltered"
POSTPROCESS_VARIANTS: dict[str, tuple[int, int]] = {
    UNFILTERED: (1, 1), "median1-min2": (1, 2), "median1-min3": (1, 3), "median3-min1": (3, 1),
    "median3-min3": (3, 3), "median3-min5": (3, 5),
}
SMALL_LESION_TYPES = ("ms", "svd", "wmh")  # lesion types of a few voxels at the model's resolution

# ----------------------------------------------------------------------------------------------------------------
# Array checks and the shared mask operations
# ----------------------------------------------------------------------------------------------------------------


def check_volume(array: Any, what: str, source: str | None, shape: tuple[int, ...] | None = None) -> np.ndarray:
    data = np.asarray(array)
    if data.ndim not in (2, 3):
        raise BrainFMInputError(source, f"{what} must be a 2D slice or a 3D volume, got shape {data.shape}")
    if shape is not None and data.shape != tuple(shape):
        raise BrainFMInputError(source, f"{what} has shape {data.shape}, expected {tuple(shape)}")
    if data.dtype.kind not in "biuf":
        raise BrainFMInputError(source, f"{what} has non-numeric dtype {data.dtype}")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise BrainFMInputError(source, f"{what} contains NaN or infinite values")
    return data


def check_mask(mask: Any, shape: tuple[int, ...], source: str | None, what: str = "brain mask") -> np.ndarray:
    data = check_volume(mask, what, source, shape)
    return data > 0.5 if data.dtype.kind == "f" else data.astype(bool)


def eroded_mask(mask: np.ndarray, erosion_vox: int) -> np.ndarray:
    """The brain mask shrunk by ``erosion_vox`` face-connected voxels: skull-stripping edges, where scan and
    pseudo-healthy disagree most in healthy subjects too, are excluded from maps, scores and thresholds."""
    mask = np.asarray(mask, dtype=bool)
    if erosion_vox <= 0:
        return mask
    return ndimage.binary_erosion(mask, iterations=int(erosion_vox), border_value=0)


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    coords = np.nonzero(mask)
    return tuple(
        slice(max(int(c.min()) - margin, 0), min(int(c.max()) + margin + 1, size))
        for c, size in zip(coords, mask.shape, strict=True)
    )


def remove_small_components(binary: np.ndarray, min_size: int) -> np.ndarray:
    """Drop connected components (full 26/8-connectivity) with fewer than ``min_size`` voxels: isolated specks
    are noise at the calibrated false-positive rate, real lesions span several voxels.

    Not MONAI's ``RemoveSmallObjects``: with scikit-image >= 0.26 it passes ``min_size`` positionally to a
    parameter that now means "remove sizes <= value", so components of exactly ``min_size`` voxels would go too,
    and the result would depend on the installed scikit-image version."""
    binary = np.asarray(binary, dtype=bool)
    if min_size <= 1 or not binary.any():
        return binary
    structure = ndimage.generate_binary_structure(binary.ndim, binary.ndim)
    labels, _ = ndimage.label(binary, structure=structure)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


# ----------------------------------------------------------------------------------------------------------------
# Maps
# ----------------------------------------------------------------------------------------------------------------


def channel_residual(image: np.ndarray, reconstruction: np.ndarray, brain_mask: np.ndarray, kind: str = "abs", *,
                     source: str | None = None) -> np.ndarray:
    """:func:`residual_map` of a volume (X, Y, Z) or, for a multi-channel model, the mean over the channels of
    (C, X, Y, Z): one residual per voxel, whatever the number of contrasts the model reads."""
    image = np.asarray(image)
    if image.ndim != 4:
        return residual_map(image, reconstruction, brain_mask, kind, source=source)
    reconstruction = np.asarray(reconstruction)
    if reconstruction.shape != image.shape:
        raise BrainFMInputError(source, f"reconstruction has shape {reconstruction.shape}, expected {image.shape}")
    return np.mean([residual_map(c, r, brain_mask, kind, source=source) for c, r in zip(image, reconstruction,
                                                                                      strict=True)], axis=0)


def residual_map(
    image: np.ndarray,
    reconstruction: np.ndarray,
    brain_mask: np.ndarray,
    kind: str = "abs",
    *,
    erosion_vox: int = 0,
    source: str | None = None,
) -> np.ndarray:
    """Residual between a scan and its pseudo-healthy reconstruction inside the (optionally eroded) brain mask,
    0 outside; float32. ``source`` names the scan in error messages."""
    image = check_volume(image, "image", source)
    reconstruction = check_volume(reconstruction, "reconstruction", source, image.shape)
    mask = eroded_mask(check_mask(brain_mask, image.shape, source), erosion_vox)
    difference = image.astype(np.float32) - reconstruction.astype(np.float32)
    if kind == "abs":
        residual = np.abs(difference)
    elif kind == "signed_pos":
        residual = difference
    elif kind == "signed_neg":
        residual = -difference
    else:
        raise ValueError(f"residual kind must be abs, signed_pos or signed_neg, got {kind!r}")
    return np.where(mask, residual, np.float32(0.0)).astype(np.float32)


def postprocess(
    zmap: np.ndarray, mask: np.ndarray, config: DeviationConfig, *, source: str | None = None
) -> np.ndarray:
    """Median-filter the z-map inside the brain and keep it only inside the eroded mask.

    Before filtering, voxels outside the brain take the in-brain median so the filter does not drag border
    voxels towards an arbitrary background value. After it, every voxel outside the eroded mask takes the
    lowest kept value, so excluded voxels never outrank kept ones in AUROC/AUPRC and never cross a threshold.
    """
    z = check_volume(zmap, "z-map", source).astype(np.float32, copy=True)
    brain = check_mask(mask, z.shape, source)
    kept = eroded_mask(brain, config.mask_erosion_vox)
    if not kept.any():
        raise BrainFMInputError(
            source, f"brain mask is empty after eroding {config.mask_erosion_vox} voxel(s); nothing to score"
        )
    z[~brain] = np.median(z[brain])
    size = int(config.median_filter_size)
    if size > 1:
        box = _bounding_box(brain, size // 2 + 1)
        z[box] = ndimage.median_filter(z[box], size=size, mode="nearest")
    fill = z[kept].min()
    return np.where(kept, z, fill).astype(np.float32)


def binarize(
    zmap: np.ndarray,
    threshold: float,
    mask: np.ndarray,
    config: DeviationConfig,
    *,
    source: str | None = None,
) -> np.ndarray:
    """Binary anomaly mask: post-processed z strictly above ``threshold`` inside the eroded brain mask, minus
    connected components smaller than ``config.min_component_vox``."""
    z = check_volume(zmap, "z-map", source)
    kept = eroded_mask(check_mask(mask, z.shape, source), config.mask_erosion_vox)
    return remove_small_components((z > threshold) & kept, config.min_component_vox)


def subject_score(
    zmap: np.ndarray,
    mask: np.ndarray,
    config: DeviationConfig,
    threshold: float | None = None,
    *,
    source: str | None = None,
) -> float:
    """One number per scan for healthy-vs-lesion ranking, computed from the post-processed z inside the eroded
    mask: ``p99`` = 99th percentile; ``mean_top1pct`` = mean of the highest 1 % (at least one voxel);
    ``lesion_load`` = fraction of kept brain voxels in the binary mask (needs ``threshold``)."""
    z = check_volume(zmap, "z-map", source)
    kept = eroded_mask(check_mask(mask, z.shape, source), config.mask_erosion_vox)
    values = z[kept].astype(np.float64)
    if values.size == 0:
        raise BrainFMInputError(source, "brain mask is empty after erosion; no subject score")
    if config.subject_score == "p99":
        return float(np.percentile(values, 99.0))
    if config.subject_score == "mean_top1pct":
        count = max(1, math.ceil(0.01 * values.size))
        return float(np.partition(values, values.size - count)[values.size - count :].mean())
    if threshold is None:
        raise ValueError("subject_score='lesion_load' needs the calibrated threshold")
    return float(binarize(z, threshold, mask, config, source=source).sum() / kept.sum())
