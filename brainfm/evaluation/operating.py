"""Lesion-wise sensitivity at matched healthy false-positive rates: two score maps compared at one operating point.

At its own calibrated threshold each model flags its own fraction of the healthy brain, and a mask that flags more
of it detects more small lesions whether or not it sees them (:func:`brainfm.evaluation.lesions.chance_detections`).
Comparing two models' lesion-wise sensitivity at their own thresholds therefore compares two operating points. Here
both are read at the same one: for each healthy false-positive rate ``f`` of a fixed list, the threshold is the
lowest at which the evaluation's own healthy scans flag at most ``f`` of their scored region (pooled), and a lesion
counts as detected when the score map above that threshold covers it by the overlap rule. No component-size filter
is applied (it would make the curve depend on each threshold's connected components); the score map's own
post-processing (median filter, eroded brain) is kept.

The threshold is read off the test scans' healthy controls, as an ROC curve's points are: it describes a model's
operating curve, it is never a threshold to deploy, and the result says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from brainfm.evaluation.lesions import MIN_LESION_OVERLAP, needed_voxels

MATCHED_FP_RULE = ("threshold where this evaluation's healthy scans flag at most the given fraction of their scored "
                   "region (pooled; read off the test scans, as an ROC curve's points are, never a threshold to "
                   "deploy); lesions detected by the overlap rule on the score map above it, no component-size filter")
# the calibration's usual target and the rate of a model calibrated on other anatomy (about 5 % in the demo)
REPORTED_FP_RATES = (0.01, 0.05)
MAX_HEALTHY_VALUES_PER_SCAN = 200_000  # beyond this a seeded uniform subsample of a scan's region, weighted


def rate_key(rate: float) -> str:
    """The name suffix of a false-positive rate (``0.01`` -> ``"0.01"``)."""
    return f"{rate:g}"


def check_rates(rates: Sequence[float]) -> tuple[float, ...]:
    rates = tuple(float(r) for r in rates)
    if any(not 0.0 < r < 1.0 for r in rates) or len(set(rates)) != len(rates):
        raise ValueError(f"matched false-positive rates must be distinct fractions in (0, 1), got {rates}")
    return rates


def lesion_detection_scores(scores: np.ndarray, lesion: np.ndarray,
                            min_overlap: float = MIN_LESION_OVERLAP) -> np.ndarray:
    """Per lesion (26-connected component of ``lesion``): the score whose exceedance detects it. A lesion needing
    ``k`` covered voxels (:func:`needed_voxels`) is detected at threshold ``t`` exactly when its ``k``-th highest
    score is above ``t``, so that score is returned."""
    lesion = np.asarray(lesion, dtype=bool)
    structure = ndimage.generate_binary_structure(lesion.ndim, lesion.ndim)
    truth, count = ndimage.label(lesion, structure=structure)
    if count == 0:
        return np.zeros(0, np.float64)
    values = np.asarray(scores, np.float64)[lesion]
    owner = truth[lesion]
    order = np.lexsort((-values, owner))  # by lesion, each lesion's scores from the highest down
    values, owner = values[order], owner[order]
    starts = np.searchsorted(owner, np.arange(1, count + 1))
    sizes = np.bincount(owner, minlength=count + 1)[1:]
    return values[starts + needed_voxels(sizes, min_overlap).astype(np.int64) - 1]


class HealthyScores:
    """The scored-region values of healthy scans, kept to find the thresholds of given false-positive rates: all of
    them up to :data:`MAX_HEALTHY_VALUES_PER_SCAN` per scan, beyond that a seeded uniform subsample weighted by the
    inverse sampling rate."""

    def __init__(self, seed: int = 0, max_per_scan: int = MAX_HEALTHY_VALUES_PER_SCAN) -> None:
        self.seed, self.max_per_scan = seed, int(max_per_scan)
        self._values: list[np.ndarray] = []
        self._weights: list[float] = []
        self.n_seen = 0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, np.float32).ravel()  # the z-maps' precision
        self.n_seen += values.size
        if values.size > self.max_per_scan:
            rng = np.random.default_rng([self.seed, len(self._values)])
            kept = values[rng.choice(values.size, self.max_per_scan, replace=False)]
            self._weights.append(values.size / self.max_per_scan)
            values = kept
        else:
            self._weights.append(1.0)
        self._values.append(values)

    @property
    def exact(self) -> bool:
        return all(w == 1.0 for w in self._weights)

    def thresholds(self, rates: Sequence[float]) -> list[tuple[float, float] | None]:
        """Per rate: (threshold, the fraction of healthy values above it); None without healthy values. The
        threshold is the lowest kept value with at most ``rate`` of the (weighted) values strictly above it."""
        if not self._values or self.n_seen == 0:
            return [None] * len(rates)
        values = np.concatenate(self._values)
        weights = np.concatenate([np.full(v.size, w) for v, w in zip(self._values, self._weights, strict=True)])
        distinct, inverse = np.unique(values, return_inverse=True)
        mass = np.bincount(inverse, weights=weights, minlength=distinct.size)
        above = (mass.sum() - np.cumsum(mass)) / mass.sum()  # fraction strictly above each distinct value
        result: list[tuple[float, float] | None] = []
        for rate in rates:
            index = int(np.searchsorted(-above, -rate, side="left"))  # first value with above <= rate
            result.append((float(distinct[index]), float(above[index])))
        return result


__all__ = ["MATCHED_FP_RULE", "REPORTED_FP_RATES", "HealthyScores", "check_rates", "lesion_detection_scores", "rate_key"]
