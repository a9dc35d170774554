"""Anomaly-detection metrics that stream over scans and name exactly what they compute.

Published UAD numbers are hard to compare because "AUPRC" may be pooled over all voxels or averaged per volume and
"Dice" may use a threshold picked on the test labels. Here each is computed and named separately:

- ``auroc_pooled`` / ``auprc_pooled``: one ranking over the brain voxels of all labelled volumes;
  ``auroc_per_volume_mean`` / ``auprc_per_volume_mean``: the mean over volumes that contain lesion and healthy
  voxels (others are excluded and counted);
- ``dice_mean`` / ``dice_pooled``: at the healthy-calibrated threshold (the caller's binary masks);
  ``dice_oracle`` with ``dice_oracle_threshold``: the best pooled Dice over thresholds chosen ON THE TEST LABELS,
  read off the pooled precision-recall curve (Dice = F1), reported for comparison with papers, never as the result;
- ``subject_auroc``: healthy vs lesion scans ranked by subject score;
- ``fp_rate_pooled``: fraction of healthy-scan brain voxels flagged at the threshold;
- all voxel metrics again by lesion type and by lesion-size bin (total lesion volume of the scan).

Scans: ``label=None`` marks a healthy control scan (used for false positives and subject AUROC only). A scan
with a label map enters the voxel metrics; if the label has no lesion voxel it also counts as healthy for the
false-positive rate and the subject AUROC. Voxels outside the brain mask are ignored everywhere.

Memory: lesion voxels are always kept. Healthy-background voxels are kept too until there are more than
``max_pooled_negatives``; beyond that a seeded uniform subsample of them is kept and weighted by the inverse
sampling rate, and the result says so under ``sampling``. Per-volume metrics are always exact. Scores are held
as float32 (the precision of the z-maps) and every metric ranks those same float32 values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from brainfm.io import BrainFMInputError

DEFAULT_SIZE_BINS_ML = (1.0, 10.0)
HEALTHY_TYPE = "healthy"


def size_bin_names(edges_ml: Sequence[float]) -> list[str]:
    """Human-readable names of the lesion-size bins, e.g. small (<1 ml), medium (1-10 ml), large (>10 ml)."""
    edges = [float(e) for e in edges_ml]
    if edges != sorted(edges) or any(e <= 0 for e in edges):
        raise ValueError(f"size bin edges must be positive and increasing, got {edges_ml}")
    words = {1: ["small", "large"], 2: ["small", "medium", "large"]}.get(len(edges))
    words = words or [f"bin{i}" for i in range(len(edges) + 1)]
    names = [f"{words[0]} (<{edges[0]:g} ml)"]
    names += [f"{words[i]} ({edges[i - 1]:g}-{edges[i]:g} ml)" for i in range(1, len(edges))]
    names.append(f"{words[-1]} (>{edges[-1]:g} ml)")
    return names


def size_bin(lesion_ml: float, edges_ml: Sequence[float]) -> str:
    """Bin of a total lesion volume: below the first edge, between edges (inclusive), above the last."""
    names = size_bin_names(edges_ml)
    for index, edge in enumerate(edges_ml):
        if lesion_ml < edge or (index > 0 and lesion_ml <= edge):
            return names[index]
    return names[-1]


def dice(pred: np.ndarray, label: np.ndarray) -> float | None:
    """2|P∩L| / (|P| + |L|); None when both are empty (undefined, not perfect)."""
    pred, label = np.asarray(pred, dtype=bool), np.asarray(label, dtype=bool)
    total = int(pred.sum() + label.sum())
    return None if total == 0 else 2.0 * int((pred & label).sum()) / total


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _curve_points(precision: np.ndarray, recall: np.ndarray, points: int) -> dict[str, list[float]]:
    """A PR curve thinned to at most ``points`` points (both ends kept), small enough for metrics.json."""
    if precision.size > points:
        index = np.unique(np.linspace(0, precision.size - 1, points).round().astype(int))
        precision, recall = precision[index], recall[index]
    return {"precision": [float(p) for p in precision], "recall": [float(r) for r in recall]}


class MetricAccumulator:
    """Collects one scan at a time (:meth:`add`) and computes every metric at the end (:meth:`compute`).

    ``threshold``: the healthy-calibrated threshold, used when a scan comes without a binary prediction
    (prediction = score > threshold inside the brain) and recorded in the result.
    """

    def __init__(
        self,
        threshold: float | None = None,
        size_bins_ml: Sequence[float] = DEFAULT_SIZE_BINS_ML,
        max_pooled_negatives: int = 20_000_000,
        seed: int = 0,
        pr_curve_points: int = 200,
    ) -> None:
        if max_pooled_negatives < 1:
            raise ValueError("max_pooled_negatives must be >= 1")
        self.threshold = threshold
        self.size_bins_ml = tuple(float(e) for e in size_bins_ml)
        size_bin_names(self.size_bins_ml)  # validates the edges
        self.max_pooled_negatives = int(max_pooled_negatives)
        self.seed = seed
        self.pr_curve_points = pr_curve_points
        self.records: list[dict[str, Any]] = []
        self._positives: list[np.ndarray | None] = []  # lesion-voxel scores per scan (all kept)
        self._negatives: list[np.ndarray | None] = []  # background-voxel scores per scan (maybe subsampled)
        self._keys: list[np.ndarray | None] = []  # the random keys that decide which negatives stay
        self._negatives_seen: list[int] = []
        self._key_cutoff = 1.0  # a negative is kept iff its key < cutoff; 1.0 keeps all of them
        self._kept = 0

    # -- input -----------------------------------------------------------------------------------------------

    def add(
        self,
        score_map: np.ndarray,
        label: np.ndarray | None,
        brain_mask: np.ndarray,
        pred_mask: np.ndarray | None = None,
        subject_score: float | None = None,
        lesion_type: str | None = None,
        voxel_volume_ml: float | None = None,
        scan_id: str | None = None,
    ) -> dict[str, Any]:
        """Add one scan; returns its per-volume record (also kept in :attr:`records`)."""
        index = len(self.records)
        where = scan_id or f"scan #{index}"
        scores = np.asarray(score_map)
        if scores.ndim not in (2, 3) or scores.dtype.kind not in "biuf":
            raise BrainFMInputError(where, f"score map must be a numeric 2D/3D array, got {scores.shape}")
        brain = self._binary(brain_mask, scores.shape, "brain mask", where)
        if not brain.any():
            raise BrainFMInputError(where, "brain mask is empty")
        scores = scores.astype(
            np.float32
        )  # the z-maps' precision; every metric below ranks these same values
        brain_scores = scores[brain]
        if not np.isfinite(brain_scores).all():
            raise BrainFMInputError(where, "score map has NaN or infinite values inside the brain")
        if pred_mask is not None:
            pred = self._binary(pred_mask, scores.shape, "predicted mask", where) & brain
        elif self.threshold is not None:
            pred = (scores > self.threshold) & brain
        else:
            pred = None

        record: dict[str, Any] = {
            "scan_id": scan_id,
            "labelled": label is not None,
            "subject_score": None if subject_score is None else float(subject_score),
            "brain_voxels": int(brain.sum()),
            "pred_voxels": None if pred is None else int(pred.sum()),
        }
        if label is None:
            lesion = None
            record.update(lesion_voxels=0, lesion_ml=0.0, lesion_type=HEALTHY_TYPE)
        else:
            lesion = self._binary(label, scores.shape, "label", where)
            lesion_voxels = int(lesion.sum())
            if lesion_voxels and voxel_volume_ml is None:
                raise ValueError(f"{where}: voxel_volume_ml is needed to bin lesions by size")
            lesion_ml = lesion_voxels * float(voxel_volume_ml or 0.0)
            record.update(
                lesion_voxels=lesion_voxels,
                lesion_ml=lesion_ml,
                lesion_type=(lesion_type or "lesion") if lesion_voxels else (lesion_type or HEALTHY_TYPE),
            )
        has_lesion = record["lesion_voxels"] > 0
        record["size_bin"] = size_bin(record["lesion_ml"], self.size_bins_ml) if has_lesion else None
        record["healthy"] = not has_lesion

        if lesion is None:
            record.update(auroc=None, auprc=None, dice=None, tp=None, fp=None, fn=None)
            self._positives.append(None)
            self._negatives.append(None)
            self._keys.append(None)
            self._negatives_seen.append(0)
        else:
            truth = lesion[brain]
            both = bool(truth.any() and not truth.all())
            record["auroc"] = float(roc_auc_score(truth, brain_scores)) if both else None
            record["auprc"] = float(average_precision_score(truth, brain_scores)) if both else None
            if pred is not None:
                inside = lesion & brain
                record.update(
                    tp=int((pred & inside).sum()),
                    fp=int((pred & ~inside).sum()),
                    fn=int((~pred & inside).sum()),
                )
                record["dice"] = dice(pred, inside) if has_lesion else None
            else:
                record.update(dice=None, tp=None, fp=None, fn=None)
            self._add_voxels(index, brain_scores[truth], brain_scores[~truth])
        record["fp_rate"] = (
            float(record["pred_voxels"] / record["brain_voxels"])
            if record["healthy"] and pred is not None
            else None
        )
        self.records.append(record)
        return record

    @staticmethod
    def _binary(array: np.ndarray, shape: tuple[int, ...], what: str, where: str) -> np.ndarray:
        data = np.asarray(array)
        if data.shape != shape:
            raise BrainFMInputError(where, f"{what} has shape {data.shape}, score map has {shape}")
        return data > 0.5 if data.dtype.kind == "f" else data.astype(bool)

    def _add_voxels(self, index: int, positives: np.ndarray, negatives: np.ndarray) -> None:
        keys = np.random.default_rng([self.seed, index]).random(negatives.size)
        keep = keys < self._key_cutoff
        self._positives.append(positives)
        self._negatives.append(negatives[keep])
        self._keys.append(keys[keep])
        self._negatives_seen.append(int(negatives.size))
        self._kept += int(keep.sum())
        if self._kept > self.max_pooled_negatives:  # keep the globally smallest keys: a uniform subsample
            held = [k for k in self._keys if k is not None]
            self._key_cutoff = float(
                np.partition(np.concatenate(held), self.max_pooled_negatives)[self.max_pooled_negatives]
            )
            for i, chunk_keys in enumerate(self._keys):
                if chunk_keys is not None:
                    stay = chunk_keys < self._key_cutoff
                    self._keys[i], self._negatives[i] = chunk_keys[stay], self._negatives[i][stay]
            self._kept = sum(k.size for k in self._keys if k is not None)

    # -- output ----------------------------------------------------------------------------------------------

    def compute(self) -> dict[str, Any]:
        """All metrics as a JSON-ready dict (None where a metric is undefined, never NaN)."""
        labelled = [i for i, r in enumerate(self.records) if r["labelled"]]
        healthy = [i for i, r in enumerate(self.records) if r["healthy"]]
        overall = self._group(labelled, healthy)
        overall["pr_curve"] = overall.pop("_curve")
        types = sorted({self.records[i]["lesion_type"] for i in labelled if not self.records[i]["healthy"]})
        by_type = {}
        for lesion_type in types:
            members = [i for i in labelled if self.records[i]["lesion_type"] == lesion_type]
            by_type[lesion_type] = self._group(members, healthy)
            by_type[lesion_type].pop("_curve")
        by_size = {}
        for name in size_bin_names(self.size_bins_ml):
            members = [i for i in labelled if self.records[i]["size_bin"] == name]
            if members:
                by_size[name] = self._group(members, healthy)
                by_size[name].pop("_curve")
        fp_rates = [self.records[i]["fp_rate"] for i in healthy if self.records[i]["fp_rate"] is not None]
        flagged = sum(
            self.records[i]["pred_voxels"] for i in healthy if self.records[i]["pred_voxels"] is not None
        )
        brain = sum(
            self.records[i]["brain_voxels"] for i in healthy if self.records[i]["pred_voxels"] is not None
        )
        kept, seen = self._kept, sum(self._negatives_seen)
        return {
            "calibrated_threshold": None if self.threshold is None else float(self.threshold),
            "overall": overall,
            "by_lesion_type": by_type,
            "by_size": by_size,
            "healthy": {
                "n_scans": len(healthy),
                "n_scans_with_prediction": len(fp_rates),
                "fp_rate_pooled": float(flagged / brain) if brain else None,
                "fp_rate_per_scan_mean": _mean(fp_rates),
                "fp_rate_per_scan_max": max(fp_rates) if fp_rates else None,
            },
            "sampling": {
                "pooled_negatives_subsampled": kept < seen,
                "negatives_seen": seen,
                "negatives_kept": kept,
                "max_pooled_negatives": self.max_pooled_negatives,
                "note": (
                    "pooled metrics use every brain voxel"
                    if kept == seen
                    else f"pooled metrics use all lesion voxels and a seeded uniform {kept / seen:.4%} subsample of "
                    "healthy-background voxels, weighted by the inverse sampling rate"
                ),
            },
            "size_bins_ml": list(self.size_bins_ml),
            "per_volume": [dict(r) for r in self.records],
        }

    def _group(self, members: list[int], healthy: list[int]) -> dict[str, Any]:
        records = [self.records[i] for i in members]
        lesion_records = [r for r in records if not r["healthy"]]
        result: dict[str, Any] = {
            "n_volumes": len(records),
            "n_lesion_volumes": len(lesion_records),
            "n_volumes_excluded_per_volume": sum(1 for r in records if r["auroc"] is None),
            "lesion_ml_mean": _mean([r["lesion_ml"] for r in lesion_records]),
            "auroc_per_volume_mean": _mean([r["auroc"] for r in records]),
            "auprc_per_volume_mean": _mean([r["auprc"] for r in records]),
            "dice_mean": _mean([r["dice"] for r in lesion_records]),
        }
        counted = [r for r in records if r["tp"] is not None]
        tp, fp, fn = (sum(r[k] for r in counted) for k in ("tp", "fp", "fn"))
        result["dice_pooled"] = 2.0 * tp / (2 * tp + fp + fn) if counted and (2 * tp + fp + fn) else None
        result.update(self._pooled(members))
        lesion_scores = [r["subject_score"] for r in lesion_records if r["subject_score"] is not None]
        healthy_scores = [self.records[i]["subject_score"] for i in healthy]
        healthy_scores = [s for s in healthy_scores if s is not None]
        result["n_subject_lesion"], result["n_subject_healthy"] = len(lesion_scores), len(healthy_scores)
        result["subject_auroc"] = (
            float(
                roc_auc_score(
                    [1] * len(lesion_scores) + [0] * len(healthy_scores), lesion_scores + healthy_scores
                )
            )
            if lesion_scores and healthy_scores
            else None
        )
        return result

    def _pooled(self, members: list[int]) -> dict[str, Any]:
        """Pooled AUROC, AUPRC and oracle Dice from ONE precision-recall curve of the group's voxels."""
        empty = {
            "n_voxels": 0,
            "lesion_fraction": None,
            "auroc_pooled": None,
            "auprc_pooled": None,
            "dice_oracle": None,
            "dice_oracle_threshold": None,
            "_curve": None,
        }
        positives = [self._positives[i] for i in members if self._positives[i] is not None]
        negatives = [self._negatives[i] for i in members if self._negatives[i] is not None]
        n_pos = sum(p.size for p in positives)
        n_neg_seen = sum(self._negatives_seen[i] for i in members)
        n_neg_kept = sum(n.size for n in negatives)
        empty["n_voxels"] = n_pos + n_neg_seen
        if n_pos == 0 or n_neg_kept == 0:
            empty["lesion_fraction"] = n_pos / (n_pos + n_neg_seen) if n_pos + n_neg_seen else None
            return empty
        scores = np.concatenate(positives + negatives)
        truth = np.zeros(scores.size, dtype=np.int8)
        truth[:n_pos] = 1
        weights = None
        if n_neg_kept < n_neg_seen:
            weights = np.ones(scores.size)
            weights[n_pos:] = n_neg_seen / n_neg_kept
        auroc = float(roc_auc_score(truth, scores, sample_weight=weights))
        precision, recall, thresholds = precision_recall_curve(truth, scores, sample_weight=weights)
        del scores, truth, weights
        auprc = float(-np.sum(np.diff(recall) * precision[:-1]))  # = sklearn's average_precision_score
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        best = int(np.argmax(f1[:-1]))  # the last point (recall 0) has no threshold
        return {
            "n_voxels": n_pos + n_neg_seen,
            "lesion_fraction": n_pos / (n_pos + n_neg_seen),
            "auroc_pooled": auroc,
            "auprc_pooled": auprc,
            "dice_oracle": float(f1[best]),
            "dice_oracle_threshold": float(thresholds[best]),  # predict score >= this
            "_curve": _curve_points(precision, recall, self.pr_curve_points),
        }
