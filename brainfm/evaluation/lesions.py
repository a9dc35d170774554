"""Lesion-wise detection and the faithfulness of a pseudo-healthy image, per scan.

Lesion-wise detection (the overlap rule, after the lesion-detection rule of the MSSEG 2016 challenge, Commowick et
al. 2018, simplified): lesions are the 26-connected components of the label inside the brain; one counts as
DETECTED when the binary prediction covers at least ``MIN_LESION_OVERLAP`` (10 %) of its voxels, and at least one
voxel. A predicted 26-connected component is a FALSE-POSITIVE lesion when it touches no lesion voxel (nor an
ignored voxel). On a healthy scan every predicted component is a false-positive lesion.

Chance level: a mask that flags more of the brain hits more small lesions whether or not it sees them (a plaque of
three voxels is "detected" by one flagged voxel). ``n_detected_chance`` is the number of a scan's lesions the same
prediction is expected to detect were each lesion at a uniformly random place instead: every shift that centres it
in the scored brain without touching another lesion, counted by the same overlap rule. Lesion-wise
sensitivity says what a mask sees only by its excess over this, above all when two thresholds flag different
fractions of the brain.

Faithfulness: on tissue that is healthy, a pseudo-healthy image should equal the scan. MAE (MONAI ``MAEMetric``)
and SSIM (MONAI's ``compute_ssim_and_cs``: Gaussian window 7 voxels, sigma 1.5, data range 1) between scan and
pseudo-healthy image over ``region``: the scored brain of a healthy scan, or of a lesion scan minus its lesions
dilated by the SSIM half-window, so no SSIM window that reaches a lesion is counted.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MIN_LESION_OVERLAP = 0.10
SSIM_WINDOW = 7
SSIM_SIGMA = 1.5
OVERLAP_RULE = (f"lesions = 26-connected components of the label; detected when the prediction covers >= "
                f"{MIN_LESION_OVERLAP:.0%} of a lesion's voxels (and >= 1 voxel); a predicted 26-connected "
                "component touching no lesion voxel is a false-positive lesion")


def _components(binary: np.ndarray) -> tuple[np.ndarray, int]:
    structure = ndimage.generate_binary_structure(binary.ndim, binary.ndim)  # 26-connectivity in 3D
    labels, count = ndimage.label(binary, structure=structure)
    return labels, int(count)


def needed_voxels(size: np.ndarray | float, min_overlap: float = MIN_LESION_OVERLAP) -> np.ndarray:
    """The overlap rule as a count: the fewest covered voxels that detect a lesion of ``size`` voxels (at least
    one, and at least ``min_overlap`` of them)."""
    return np.maximum(1.0, np.ceil(min_overlap * np.asarray(size, dtype=np.float64)))


def lesion_detection(pred: np.ndarray, lesion: np.ndarray | None, ignore: np.ndarray | None = None,
                     min_overlap: float = MIN_LESION_OVERLAP) -> dict[str, int]:
    """Counts of lesions, detected lesions, predicted components and false-positive components of one scan
    (boolean arrays of one shape; ``lesion`` None for a healthy scan)."""
    pred = np.asarray(pred, dtype=bool)
    predicted, n_pred = _components(pred)
    touching = np.zeros_like(pred) if ignore is None else np.asarray(ignore, dtype=bool).copy()
    n_lesions = n_detected = 0
    if lesion is not None and np.any(lesion):
        lesion = np.asarray(lesion, dtype=bool)
        truth, n_lesions = _components(lesion)
        index = np.arange(1, n_lesions + 1)
        sizes = ndimage.sum_labels(np.ones(lesion.shape), truth, index)
        covered = ndimage.sum_labels(pred, truth, index)
        n_detected = int(np.sum(covered >= needed_voxels(sizes, min_overlap)))
        touching |= lesion
    n_touching = int(np.count_nonzero(np.unique(predicted[touching])))
    return {"n_lesions": n_lesions, "n_detected": n_detected, "n_pred_components": n_pred,
            "n_fp_components": n_pred - n_touching}


def lesion_detection_scores(scores: np.ndarray, lesion: np.ndarray,
                            min_overlap: float = MIN_LESION_OVERLAP) -> np.ndarray:
    """The overlap rule as a score, per lesion (component of ``lesion``): a lesion needing ``k`` covered voxels
    (:func:`needed_voxels`) is detected by ``scores > t`` exactly when its ``k``-th highest score is above ``t``, so
    that score is returned (in component-label order)."""
    lesion = np.asarray(lesion, dtype=bool)
    truth, count = _components(lesion)
    if count == 0:
        return np.zeros(0, np.float64)
    values = np.asarray(scores, np.float64)[lesion]
    owner = truth[lesion]
    order = np.lexsort((-values, owner))  # by lesion, each lesion's scores from the highest down
    values, owner = values[order], owner[order]
    starts = np.searchsorted(owner, np.arange(1, count + 1))
    sizes = np.bincount(owner, minlength=count + 1)[1:]
    return values[starts + needed_voxels(sizes, min_overlap).astype(np.int64) - 1]

def _overlap_counts(volume: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """For every centre, how many of ``volume``'s voxels a copy of ``shape`` centred there covers."""
    if shape.size <= 125:  # a small box: direct correlation is faster than two FFTs
        return ndimage.correlate(volume, shape, mode="constant")
    from scipy.signal import fftconvolve

    return fftconvolve(volume, shape[(slice(None, None, -1),) * shape.ndim], mode="same")  # flipped: correlates


def chance_detections(pred: np.ndarray, lesion: np.ndarray, region: np.ndarray,
                      ignore: np.ndarray | None = None, min_overlap: float = MIN_LESION_OVERLAP) -> float:
    """Expected number of ``lesion``'s components that ``pred`` would detect (the overlap rule) were each one moved
    to a uniformly random position: centred in ``region`` and touching no lesion (or ignored) voxel. A lesion with
    no such position counts as its own detection (it cannot be moved)."""
    pred = np.asarray(pred, dtype=bool)
    lesion = np.asarray(lesion, dtype=bool)
    truth, n_lesions = _components(lesion)
    if n_lesions == 0:
        return 0.0
    taken = lesion if ignore is None else lesion | np.asarray(ignore, dtype=bool)  # no moved lesion may touch
    centres = np.asarray(region, dtype=bool) & ~taken
    occupied = taken.astype(np.float32)
    flagged = pred.astype(np.float32)
    expected = 0.0
    for index, box in enumerate(ndimage.find_objects(truth), start=1):
        shape = (truth[box] == index).astype(np.float32)
        needed = float(needed_voxels(shape.sum(), min_overlap))
        fits = centres & (_overlap_counts(occupied, shape) < 0.5)
        if fits.any():  # counts are whole numbers up to FFT rounding
            expected += float((_overlap_counts(flagged, shape)[fits] > needed - 0.5).mean())
        else:
            expected += float(pred[truth == index].sum() >= needed)
    return expected


def fidelity_region(brain: np.ndarray, lesion: np.ndarray | None, ignore: np.ndarray | None = None) -> np.ndarray:
    """Where a pseudo-healthy image is judged: ``brain`` minus lesions (and ignored voxels) dilated by the SSIM
    half-window."""
    region = np.asarray(brain, dtype=bool).copy()
    unhealthy = np.zeros_like(region)
    for extra in (lesion, ignore):
        if extra is not None:
            unhealthy |= np.asarray(extra, dtype=bool)
    if unhealthy.any():
        region &= ~ndimage.binary_dilation(unhealthy, iterations=SSIM_WINDOW // 2)
    return region


def fidelity(image: np.ndarray, pseudo_healthy: np.ndarray, region: np.ndarray) -> dict[str, float | None]:
    """MAE and mean SSIM between ``image`` and ``pseudo_healthy`` (both in [0, 1] model intensity) over
    ``region``; None where the region is empty (or, for SSIM, thinner than a window)."""
    import torch
    from monai.metrics import MAEMetric
    from monai.metrics.regression import compute_ssim_and_cs

    region = np.asarray(region, dtype=bool)
    if not region.any():
        return {"mae": None, "ssim": None}
    x = torch.from_numpy(np.asarray(image, np.float32))
    y = torch.from_numpy(np.asarray(pseudo_healthy, np.float32))
    inside = torch.from_numpy(region)
    mae = float(MAEMetric()(y[inside][None, None], x[inside][None, None]).item())
    ndim = x.ndim
    if any(s < SSIM_WINDOW for s in x.shape):
        return {"mae": mae, "ssim": None}
    ssim_map, _ = compute_ssim_and_cs(y[None, None], x[None, None], spatial_dims=ndim,
                                      kernel_size=[SSIM_WINDOW] * ndim, kernel_sigma=[SSIM_SIGMA] * ndim,
                                      data_range=1.0)
    half = SSIM_WINDOW // 2
    centres = region[tuple(slice(half, s - half) for s in region.shape)]  # the map holds valid windows only
    ssim = float(ssim_map[0, 0].numpy()[centres].mean()) if centres.any() else None
    return {"mae": mae, "ssim": ssim}


__all__ = ["MIN_LESION_OVERLAP", "OVERLAP_RULE", "chance_detections", "fidelity", "fidelity_region", "lesion_detection",
           "lesion_detection_scores", "needed_voxels"]
