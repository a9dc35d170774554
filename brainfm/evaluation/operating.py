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

from brainfm.anomaly.normative import UniformSample, upper_threshold

MATCHED_FP_RULE = ("threshold where this evaluation's healthy scans flag at most the given fraction of their scored "
                   "region (pooled; read off the test scans, as an ROC curve's points are, never a threshold to "
                   "deploy); lesions detected by the overlap rule on the score map above it, no component-size filter")
# the calibration's usual target and the rate of a model calibrated on other anatomy (about 5 % in the demo)
REPORTED_FP_RATES = (0.01, 0.05)
MAX_HEALTHY_VALUES = 5_000_000  # every healthy value up to this many, a seeded uniform sample of them beyond


def sensitivity_key(rate: float) -> str:
    """The metric's name at a false-positive rate (``0.01`` -> ``lesion_sensitivity_at_fp_0.01``)."""
    return f"lesion_sensitivity_at_fp_{rate:g}"


def detected_key(rate: float) -> str:
    """The per-scan count of lesions detected at a false-positive rate (the metric's numerator)."""
    return f"n_detected_at_fp_{rate:g}"


def check_rates(rates: Sequence[float]) -> tuple[float, ...]:
    rates = tuple(float(r) for r in rates)
    if any(not 0.0 < r < 1.0 for r in rates) or len(set(rates)) != len(rates):
        raise ValueError(f"matched false-positive rates must be distinct fractions in (0, 1), got {rates}")
    return rates


def healthy_sample(seed: int = 0, capacity: int = MAX_HEALTHY_VALUES) -> UniformSample:
    """Where the scored-region values of healthy scans are kept (the calibration's own bounded sample)."""
    return UniformSample(capacity, seed=seed)


def matched_thresholds(healthy: UniformSample, rates: Sequence[float]) -> list[tuple[float, float] | None]:
    """Per rate: (threshold, the fraction of the healthy values above it); None without healthy values. The
    threshold follows the calibration's rule (:func:`brainfm.anomaly.normative.upper_threshold`): the lowest value
    with at most ``rate`` of the values strictly above it."""
    values = healthy.values()
    if values.size == 0:
        return [None] * len(rates)
    points: list[tuple[float, float] | None] = []
    for rate in rates:
        threshold = upper_threshold(values, rate)
        points.append((threshold, float(np.mean(values > threshold))))
    return points


__all__ = ["MATCHED_FP_RULE", "MAX_HEALTHY_VALUES", "REPORTED_FP_RATES", "check_rates", "detected_key",
           "healthy_sample", "matched_thresholds", "sensitivity_key"]
