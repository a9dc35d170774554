"""Bootstrap confidence intervals over SUBJECTS for pooled voxel, lesion and subject metrics.

A pooled metric ranks the voxels of all scans together, so its uncertainty comes from which subjects happened to
be in the test set, not from voxels: the unit resampled is the subject (all of its scans together). Resampling
millions of voxels 1,000 times would be slow, so each subject's lesion and background scores are first counted in
histograms on ONE set of fine bins shared by all subjects (quantiles of the pooled scores); a resample's pooled
precision-recall curve is then a weighted sum of those histograms. The binned AUPRC of the full data is compared
with the exact value (scikit-learn) and the difference is reported beside the intervals (``auprc_binned_error``).

Intervals: ``scipy.stats.bootstrap``, percentile method, seeded. Counts and sums (true positives, detected
lesions, flagged voxels, ...) are summed over the resampled subjects, so a ratio is recomputed per resample rather
than averaged. Resamples in which a metric is undefined (no lesion voxel drawn, ...) are left out of its
distribution; fewer than 2 subjects, or more than 10 % undefined resamples, give no interval (None).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
BINS_PER_CLASS = 1024  # quantile edges of the pooled positives and of the pooled negatives (their union)
CI_METHOD = "percentile bootstrap over subjects (scipy.stats.bootstrap)"
MAX_UNDEFINED = 0.1  # resamples in which a metric is undefined: at most this share, else no interval


@dataclasses.dataclass(frozen=True)
class BootstrapSettings:
    n_resamples: int = DEFAULT_RESAMPLES
    confidence: float = DEFAULT_CONFIDENCE
    seed: int = 0

    def describe(self) -> dict[str, Any]:
        return {"method": CI_METHOD, "n_resamples": self.n_resamples, "confidence": self.confidence,
                "seed": self.seed, "unit": "subject"}


def shared_edges(positives: Sequence[np.ndarray], negatives: Sequence[np.ndarray],
                 bins_per_class: int | None = None) -> np.ndarray:
    """Bin edges for every subject's histograms: the union of quantiles of the pooled lesion scores and of the
    pooled background scores, so both the top of the ranking (where precision is decided) and the bulk get fine
    bins. Edges are data values; bin i holds scores in [edges[i], edges[i+1]) (the last bin is closed)."""
    quantiles = np.linspace(0.0, 1.0, (bins_per_class or BINS_PER_CLASS) + 1)
    parts = [np.quantile(np.concatenate(list(v)), quantiles, method="inverted_cdf")
             for v in (positives, negatives) if v and sum(a.size for a in v)]
    return np.unique(np.concatenate(parts).astype(np.float64)) if parts else np.zeros(1)


def curve_metrics(pos: np.ndarray, neg: np.ndarray) -> dict[str, np.ndarray]:
    """Pooled AUPRC (average precision, scikit-learn's step rule), AUROC (ties count one half) and the best Dice
    over thresholds, from histograms ``(..., bins)`` with bins in ascending score order; NaN where undefined.

    With thresholds at the bins from the top down: AP = sum_b pos_b / P * TP_b / (TP_b + FP_b); AUROC = sum_b
    neg_b * (TP_b - pos_b / 2) / (P N); best Dice = max_b 2 TP_b / (TP_b + FP_b + P)."""
    pos, neg = np.asarray(pos, np.float64)[..., ::-1], np.asarray(neg, np.float64)[..., ::-1]
    tp, fp = np.cumsum(pos, axis=-1), np.cumsum(neg, axis=-1)
    n_pos, n_neg = tp[..., -1], fp[..., -1]
    flagged = tp + fp
    with np.errstate(invalid="ignore", divide="ignore"):
        auprc = np.sum(pos * np.divide(tp, flagged, out=np.zeros_like(tp), where=flagged > 0), axis=-1) / n_pos
        auroc = np.sum(neg * (tp - 0.5 * pos), axis=-1) / (n_pos * n_neg)
        dice = np.max(2 * tp / (flagged + n_pos[..., None]), axis=-1)
    undefined = (n_pos <= 0) | (n_neg <= 0)
    return {name: np.where(undefined, np.nan, value) for name, value in
            (("auprc_pooled", auprc), ("auroc_pooled", auroc), ("dice_oracle", dice))}


@dataclasses.dataclass
class SubjectTable:
    """Per-subject sums of one group: histograms of lesion / background scores and named counts.

    ``ratios``: metric name -> (numerator key, denominator key) over ``sums``; the metric of a resample is
    sum(numerator) / sum(denominator) over its subjects (Dice = 2TP / (2TP + FP + FN) via keys ``dice_num`` and
    ``dice_den``; a mean over scans via a sum and a count)."""

    pos: np.ndarray | None  # (subjects, bins) or None without voxel curves
    neg: np.ndarray | None
    sums: dict[str, np.ndarray]
    ratios: dict[str, tuple[str, str]]

    @property
    def n_subjects(self) -> int:
        return len(next(iter(self.sums.values()))) if self.sums else (0 if self.pos is None else len(self.pos))

    def __post_init__(self) -> None:
        if self.pos is not None and self.neg is not None:
            self.pos, self.neg = compact_bins(np.asarray(self.pos, np.float64), np.asarray(self.neg, np.float64))

    def statistics(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Every metric for resample weights ``(k, subjects)`` (how often each subject was drawn)."""
        out: dict[str, np.ndarray] = {}
        if self.pos is not None and self.neg is not None:
            out.update(curve_metrics(weights @ self.pos, weights @ self.neg))
        with np.errstate(invalid="ignore", divide="ignore"):
            for name, (num, den) in self.ratios.items():
                denominator = weights @ self.sums[den]
                out[name] = np.where(denominator > 0, (weights @ self.sums[num]) / denominator, np.nan)
        return out


def compact_bins(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same histograms with every run of bins that holds no lesion score in ANY subject merged into one bin,
    and empty bins dropped: exact for AUPRC, AUROC and the best Dice of every resample (a resample's positives
    are a subset of the group's, so inside such a run its true positives cannot change), and much faster."""
    total_pos, total = pos.sum(axis=0), pos.sum(axis=0) + neg.sum(axis=0)
    occupied = total > 0
    pos, neg, total_pos = pos[:, occupied], neg[:, occupied], total_pos[occupied]
    if pos.shape[1] == 0:
        return pos, neg
    has_pos = total_pos > 0
    # a new output bin starts at every positive bin and at the first bin after a positive one
    starts = has_pos | np.concatenate([[True], has_pos[:-1]])
    group = np.cumsum(starts) - 1
    merged = np.zeros((pos.shape[0], int(group[-1]) + 1))
    np.add.at(merged.T, group, neg.T)
    return pos[:, starts], merged


def _weights(index: np.ndarray, n: int) -> np.ndarray:
    """(k, n) draw counts from scipy's resampled index arrays (k, n)."""
    index = np.asarray(index).astype(np.int64).reshape(-1, n)
    rows = np.repeat(np.arange(index.shape[0]), n)
    return np.bincount(rows * n + index.ravel(), minlength=index.shape[0] * n).reshape(-1, n).astype(np.float64)


def _interval(low: float, high: float) -> list[float] | None:
    return [float(low), float(high)] if np.isfinite(low) and np.isfinite(high) else None


def subject_intervals(table: SubjectTable, settings: BootstrapSettings) -> dict[str, list[float] | None]:
    """95 % (``settings.confidence``) intervals of every metric of ``table``, one bootstrap for all of them, so
    every metric sees the same resamples."""
    from scipy.stats import bootstrap

    n = table.n_subjects
    names = list(table.statistics(np.ones((1, n)))) if n else []
    if n < 2:
        return dict.fromkeys(names)

    def statistic(index: np.ndarray, axis: int = -1) -> np.ndarray:
        values = table.statistics(_weights(index, n))
        return np.stack([values[name] for name in names]).reshape(len(names), *np.shape(index)[:-1])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate or NaN resample distributions give no interval below
        result = bootstrap((np.arange(n, dtype=np.float64),), statistic, vectorized=True, batch=200,
                           n_resamples=settings.n_resamples, confidence_level=settings.confidence,
                           method="percentile", rng=np.random.default_rng(settings.seed))
    return _percentile_intervals(np.atleast_2d(result.bootstrap_distribution), names, settings)


def _percentile_intervals(distribution: np.ndarray, names: Sequence[str], settings: BootstrapSettings
                          ) -> dict[str, list[float] | None]:
    """Percentile intervals from scipy's bootstrap distribution. A resample in which a metric is undefined (e.g.
    one that drew only lesion-free scans) is left out of that metric's distribution; with more than
    ``MAX_UNDEFINED`` of them the metric gets no interval."""
    alpha = (1.0 - settings.confidence) / 2.0
    intervals: dict[str, list[float] | None] = {}
    for name, values in zip(names, distribution, strict=True):
        finite = values[np.isfinite(values)]
        if finite.size < (1.0 - MAX_UNDEFINED) * values.size:
            intervals[name] = None
            continue
        low, high = np.percentile(finite, [100 * alpha, 100 * (1 - alpha)])
        intervals[name] = _interval(low, high)
    return intervals


def auroc_interval(positive: Sequence[float], negative: Sequence[float], settings: BootstrapSettings
                   ) -> list[float] | None:
    """Interval of a subject-level AUROC, resampling lesion and healthy subjects separately (stratified)."""
    from scipy.stats import bootstrap

    positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if positive.size < 2 or negative.size < 2:
        return None

    def statistic(pos: np.ndarray, neg: np.ndarray, axis: int = -1) -> np.ndarray:
        diff = pos[..., :, None] - neg[..., None, :]
        return ((diff > 0) + 0.5 * (diff == 0)).mean(axis=(-1, -2))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = bootstrap((positive, negative), statistic, vectorized=True, batch=200,
                           n_resamples=settings.n_resamples, confidence_level=settings.confidence,
                           method="percentile", rng=np.random.default_rng(settings.seed))
    return _percentile_intervals(np.atleast_2d(result.bootstrap_distribution), ["auroc"], settings)["auroc"]


def group_subjects(subjects: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Unique subjects in first-seen order and each entry's subject index."""
    order: dict[str, int] = {}
    index = np.array([order.setdefault(s, len(order)) for s in subjects], dtype=np.int64)
    return list(order), index


def per_subject(values: Mapping[str, Sequence[float]], index: np.ndarray, n_subjects: int
                ) -> dict[str, np.ndarray]:
    """Sum per-scan values into per-subject rows (``index``: each scan's subject)."""
    return {key: np.bincount(index, weights=np.asarray(v, np.float64), minlength=n_subjects)
            for key, v in values.items()}


__all__ = ["BootstrapSettings", "SubjectTable", "auroc_interval", "curve_metrics", "group_subjects",
           "per_subject", "shared_edges", "subject_intervals"]
