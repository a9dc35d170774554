"""Anomaly-detection metrics that stream over scans and name exactly what they compute.

Published UAD numbers are hard to compare because "AUPRC" may be pooled over all voxels or averaged per volume and
"Dice" may use a threshold picked on the test labels. Here each is computed and named separately:

- ``auroc_pooled`` / ``auprc_pooled``: one ranking over the brain voxels of all labelled volumes;
  ``auroc_per_volume_mean`` / ``auprc_per_volume_mean``: the mean over volumes that contain lesion and healthy
  voxels (others are excluded and counted);
- ``dice_mean`` / ``dice_pooled``: at the healthy-calibrated threshold (the caller's binary masks);
  ``dice_oracle`` with ``dice_oracle_threshold``: the best pooled Dice over thresholds chosen ON THE TEST LABELS,
  read off the pooled precision-recall curve (Dice = F1), reported for comparison with papers, never as the result;
- ``subject_auroc``: healthy vs lesion scans ranked by subject score, computed only with at least
  ``MIN_SUBJECTS_PER_CLASS`` (10) scans per class (otherwise None, and ``subject_auroc_note`` says why);
- ``fp_rate_pooled``: fraction of healthy-scan voxels flagged at the threshold, over the region the threshold
  was calibrated on (the caller's ``fp_region``, e.g. the eroded brain; the brain mask by default);
- ``lesion_sensitivity`` (detected / all lesions, pooled) and ``fp_lesions_per_scan`` (false-positive
  components per scan) at the threshold, by the overlap rule of :mod:`brainfm.evaluation.lesions`, with
  ``lesion_sensitivity_chance``: what the same masks would detect of lesions placed at random in the brain;
- ``lesion_sensitivity_at_fp_<f>`` (with ``matched_fp_rates``): lesion-wise sensitivity where the evaluation's
  healthy scans flag the fraction ``f`` of their region, so two models compare at one operating point
  (:mod:`brainfm.evaluation.operating`; the thresholds are under ``matched_fp``);
- ``pseudo_healthy_mae`` / ``pseudo_healthy_ssim``: mean over scans of the caller's faithfulness values on
  healthy tissue (lesion scans outside lesions; healthy scans under ``healthy``);
- all voxel metrics again by lesion type and by lesion-size bin (total lesion volume of the scan), and, for scans
  added with a ``modality``, everything (overall, by lesion type, healthy) per modality under ``by_modality``;
- ``ci``: a bootstrap interval over SUBJECTS for every pooled metric and mean (:mod:`brainfm.evaluation.bootstrap`).

Scans: ``label=None`` marks a healthy control scan (used for false positives and subject AUROC only). A scan
with a label map enters the voxel metrics; if the label has no lesion voxel it also counts as healthy for the
false-positive rate and the subject AUROC. Voxels outside the brain mask are ignored everywhere, and so are the
caller's ``ignore`` voxels (e.g. a label value a challenge leaves out of its evaluation): neither lesion nor
background.

Memory: lesion voxels are always kept. Healthy-background voxels are kept too until there are more than
``max_pooled_negatives``; beyond that a seeded uniform subsample of them is kept and weighted by the inverse
sampling rate, and the result says so under ``sampling``. Per-volume metrics are always exact. Scores are held
as float32 (the precision of the z-maps) and every metric ranks those same float32 values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from brainfm.evaluation.bootstrap import (
    BootstrapSettings,
    SubjectTable,
    auroc_interval,
    curve_metrics,
    group_subjects,
    per_subject,
    shared_edges,
    subject_intervals,
)
from brainfm.evaluation.lesions import (
    OVERLAP_RULE,
    chance_detections,
    lesion_detection,
    lesion_detection_scores,
)
from brainfm.evaluation.operating import (
    MATCHED_FP_RULE,
    check_rates,
    detected_key,
    healthy_sample,
    matched_thresholds,
    sensitivity_key,
)
from brainfm.io import BrainFMInputError

DEFAULT_SIZE_BINS_ML = (1.0, 10.0)
HEALTHY_TYPE = "healthy"
MIN_SUBJECTS_PER_CLASS = 10
# metric -> (numerator, denominator) of per-subject sums; a resample's value is sum(num) / sum(den)
_LESION_RATIOS = {
    "dice_pooled": ("dice_num", "dice_den"), "dice_mean": ("dice_sum", "dice_n"),
    "auroc_per_volume_mean": ("auroc_sum", "auroc_n"), "auprc_per_volume_mean": ("auprc_sum", "auprc_n"),
    "lesion_sensitivity": ("n_detected", "n_lesions"), "lesion_sensitivity_chance": ("n_detected_chance", "n_lesions"),
    "fp_lesions_per_scan": ("n_fp_components", "n_scans_pred"),
    "pseudo_healthy_mae": ("mae_sum", "mae_n"), "pseudo_healthy_ssim": ("ssim_sum", "ssim_n"),
}
_HEALTHY_RATIOS = {
    "fp_rate_pooled": ("flagged", "region"), "fp_lesions_per_scan": ("n_fp_components", "n_scans_pred"),
    "pseudo_healthy_mae": ("mae_sum", "mae_n"), "pseudo_healthy_ssim": ("ssim_sum", "ssim_n"),
}


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
    (prediction = score > threshold inside the brain) and recorded in the result. ``bootstrap``: how the
    intervals are computed (None: no intervals). ``chance_level`` False leaves out ``lesion_sensitivity_chance``
    (its cost: a few seconds per hundred lesions). ``matched_fp_rates``: the healthy false-positive rates at which
    ``lesion_sensitivity_at_fp_<rate>`` is read (none by default).
    """

    def __init__(
        self,
        threshold: float | None = None,
        size_bins_ml: Sequence[float] = DEFAULT_SIZE_BINS_ML,
        max_pooled_negatives: int = 20_000_000,
        seed: int = 0,
        pr_curve_points: int = 200,
        bootstrap: BootstrapSettings | None = BootstrapSettings(),
        chance_level: bool = True,
        matched_fp_rates: Sequence[float] = (),
    ) -> None:
        if max_pooled_negatives < 1:
            raise ValueError("max_pooled_negatives must be >= 1")
        self.threshold = threshold
        self.size_bins_ml = tuple(float(e) for e in size_bins_ml)
        size_bin_names(self.size_bins_ml)  # validates the edges
        self.max_pooled_negatives = int(max_pooled_negatives)
        self.seed = seed
        self.pr_curve_points = pr_curve_points
        self.bootstrap = bootstrap  # None: no intervals
        self.chance_level = chance_level  # lesion_sensitivity_chance: a few seconds per hundred lesions
        self._ratios = _LESION_RATIOS if chance_level else {k: v for k, v in _LESION_RATIOS.items()
                                                            if k != "lesion_sensitivity_chance"}
        self.matched_fp_rates = check_rates(matched_fp_rates)
        self._ratios = {**self._ratios, **{sensitivity_key(r): (detected_key(r), "n_lesions")
                                           for r in self.matched_fp_rates}}
        self._healthy_scores = healthy_sample(seed)
        self._lesion_scores: dict[int, np.ndarray] = {}  # per lesion scan: each lesion's detection score
        self._n_bins = 1
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
        *,
        subject: str | None = None,
        ignore: np.ndarray | None = None,
        fp_region: np.ndarray | None = None,
        fidelity: dict[str, float | None] | None = None,
        modality: str | None = None,
    ) -> dict[str, Any]:
        """Add one scan; returns its per-volume record (also kept in :attr:`records`).

        ``subject``: the unit the intervals resample (default: the scan); ``ignore``: voxels left out of every
        voxel and lesion metric; ``fp_region``: the region the healthy false-positive rate is measured over (the
        calibration's region); ``fidelity``: this method's pseudo-healthy MAE/SSIM on the scan's healthy tissue;
        ``modality``: the scan's contrast, for the per-modality metrics (``by_modality``) of a pooled model.
        """
        index = len(self.records)
        where = scan_id or f"scan #{index}"
        scores = np.asarray(score_map)
        if scores.ndim not in (2, 3) or scores.dtype.kind not in "biuf":
            raise BrainFMInputError(where, f"score map must be a numeric 2D/3D array, got {scores.shape}")
        brain = self._binary(brain_mask, scores.shape, "brain mask", where)
        if not brain.any():
            raise BrainFMInputError(where, "brain mask is empty")
        ignored = None if ignore is None else self._binary(ignore, scores.shape, "ignore mask", where) & brain
        if ignored is not None:
            brain = brain & ~ignored
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

        region = brain if fp_region is None else self._binary(fp_region, scores.shape, "fp region", where) & brain
        record: dict[str, Any] = {
            "scan_id": scan_id,
            "subject": subject or scan_id or where,
            "labelled": label is not None,
            "modality": None if modality is None else str(modality).upper(),
            "subject_score": None if subject_score is None else float(subject_score),
            "brain_voxels": int(brain.sum()),
            "pred_voxels": None if pred is None else int(pred.sum()),
            "region_voxels": int(region.sum()),
            "region_pred_voxels": None if pred is None else int((pred & region).sum()),
            "ignored_voxels": 0 if ignored is None else int(ignored.sum()),
            "pseudo_healthy_mae": (fidelity or {}).get("mae"),
            "pseudo_healthy_ssim": (fidelity or {}).get("ssim"),
        }
        if label is None:
            lesion = None
            record.update(lesion_voxels=0, lesion_ml=0.0, lesion_type=HEALTHY_TYPE)
        else:
            lesion = self._binary(label, scores.shape, "label", where)
            if ignored is not None:
                lesion = lesion & ~ignored
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
        record.update({"n_lesions": None, "n_detected": None, "n_detected_chance": None, "n_pred_components": None,
                       "n_fp_components": None})
        if pred is not None:
            record.update(lesion_detection(pred, lesion & brain if has_lesion else None, ignored))
            if has_lesion and self.chance_level:
                record["n_detected_chance"] = chance_detections(pred, lesion & brain, region, ignored)
        if self.matched_fp_rates and has_lesion:
            self._lesion_scores[index] = lesion_detection_scores(scores, lesion & brain)
        elif self.matched_fp_rates:
            self._healthy_scores.add(scores[region])

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
            float(record["region_pred_voxels"] / record["region_voxels"])
            if record["healthy"] and pred is not None and record["region_voxels"]
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

    def compute(self, by_modality: bool = True) -> dict[str, Any]:
        """All metrics as a JSON-ready dict (None where a metric is undefined, never NaN); ``by_modality`` False
        leaves out the per-modality groups (and their bootstrap) when only the pooled ones are wanted."""
        labelled = [i for i, r in enumerate(self.records) if r["labelled"]]
        healthy = [i for i, r in enumerate(self.records) if r["healthy"]]
        self._prepare()
        matched = self._matched_fp()
        overall = self._group(labelled, healthy)
        overall["pr_curve"] = overall.pop("_curve")
        binned_errors = [overall.pop("_binned_error", None)]
        by_type = self._by_type(labelled, healthy, binned_errors)
        per_modality = {}  # the same metrics for each modality's scans alone (a pooled multi-contrast model)
        for modality in sorted({r["modality"] for r in self.records if r["modality"] is not None and by_modality}):
            mod_labelled = [i for i in labelled if self.records[i]["modality"] == modality]
            mod_healthy = [i for i in healthy if self.records[i]["modality"] == modality]
            group = self._group(mod_labelled, mod_healthy)
            group.pop("_curve")
            binned_errors.append(group.pop("_binned_error", None))
            per_modality[modality] = {"overall": group, "healthy": self._healthy(mod_healthy),
                                     "by_lesion_type": self._by_type(mod_labelled, mod_healthy, binned_errors)}
        by_size = {}
        for name in size_bin_names(self.size_bins_ml):
            members = [i for i in labelled if self.records[i]["size_bin"] == name]
            if members:
                by_size[name] = self._group(members, healthy)
                by_size[name].pop("_curve")
                binned_errors.append(by_size[name].pop("_binned_error", None))
        kept, seen = self._kept, sum(self._negatives_seen)
        return {
            "calibrated_threshold": None if self.threshold is None else float(self.threshold),
            "overall": overall,
            "by_lesion_type": by_type,
            "by_size": by_size,
            "by_modality": per_modality,
            "healthy": self._healthy(healthy),
            "lesion_detection_rule": OVERLAP_RULE,
            **({"matched_fp": matched} if matched is not None else {}),
            "intervals": None if self.bootstrap is None else {
                **self.bootstrap.describe(), "histogram_bins": int(self._n_bins),
                # largest |binned - exact| pooled AUPRC over the groups: the approximation inside the intervals
                "auprc_binned_error_max": max((e for e in binned_errors if e is not None), default=None)},
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

    def _matched_fp(self) -> dict[str, Any] | None:
        """The thresholds of the matched false-positive rates, and each lesion scan's detections at them (into its
        record, where the ratio metrics read them)."""
        if not self.matched_fp_rates:
            return None
        found = matched_thresholds(self._healthy_scores, self.matched_fp_rates)
        for index, record in enumerate(self.records):
            scores = self._lesion_scores.get(index)
            for rate, point in zip(self.matched_fp_rates, found, strict=True):
                detected = None if scores is None or point is None else int(np.sum(scores > point[0]))
                record[detected_key(rate)] = detected
        return {"rule": MATCHED_FP_RULE, "rates": list(self.matched_fp_rates),
                "thresholds": [None if p is None else p[0] for p in found],
                "healthy_fp_rate": [None if p is None else p[1] for p in found],
                "healthy_values_seen": self._healthy_scores.n_seen, "exact": self._healthy_scores.exact}

    def _by_type(self, labelled: list[int], healthy: list[int], binned_errors: list[float | None]
                 ) -> dict[str, dict[str, Any]]:
        types = sorted({self.records[i]["lesion_type"] for i in labelled if not self.records[i]["healthy"]})
        by_type = {}
        for lesion_type in types:
            members = [i for i in labelled if self.records[i]["lesion_type"] == lesion_type]
            by_type[lesion_type] = self._group(members, healthy)
            by_type[lesion_type].pop("_curve")
            binned_errors.append(by_type[lesion_type].pop("_binned_error", None))
        return by_type

    def _healthy(self, healthy: list[int]) -> dict[str, Any]:
        records = [self.records[i] for i in healthy]
        predicted = [r for r in records if r["pred_voxels"] is not None]
        fp_rates = [r["fp_rate"] for r in predicted if r["fp_rate"] is not None]
        flagged, region = (sum(r[k] for r in predicted) for k in ("region_pred_voxels", "region_voxels"))
        sums = _scan_sums(records, self.matched_fp_rates)
        result = {
            "n_scans": len(records),
            "n_scans_with_prediction": len(fp_rates),
            "fp_rate_pooled": float(flagged / region) if region else None,
            "fp_rate_per_scan_mean": _mean(fp_rates),
            "fp_rate_per_scan_max": max(fp_rates) if fp_rates else None,
            **{name: _ratio(sums[num], sums[den]) for name, (num, den) in _HEALTHY_RATIOS.items()
               if name != "fp_rate_pooled"},
        }
        if self.bootstrap is not None:
            _, index = group_subjects([r["subject"] for r in records])
            table = SubjectTable(None, None, per_subject(sums, index, int(index.max()) + 1 if len(index) else 0),
                                 _HEALTHY_RATIOS)
            result["ci"] = subject_intervals(table, self.bootstrap)
        return result

    def _group(self, members: list[int], healthy: list[int]) -> dict[str, Any]:
        records = [self.records[i] for i in members]
        lesion_records = [r for r in records if not r["healthy"]]
        sums = _scan_sums(records, self.matched_fp_rates)
        result: dict[str, Any] = {
            "n_volumes": len(records),
            "n_lesion_volumes": len(lesion_records),
            "n_subjects": len({r["subject"] for r in records}),
            "n_volumes_excluded_per_volume": sum(1 for r in records if r["auroc"] is None),
            "lesion_ml_mean": _mean([r["lesion_ml"] for r in lesion_records]),
            "n_lesions": int(sums["n_lesions"].sum()),
            **{name: _ratio(sums[num], sums[den]) for name, (num, den) in self._ratios.items()},
        }
        result.update(self._pooled(members))
        lesion_scores = [r["subject_score"] for r in lesion_records if r["subject_score"] is not None]
        healthy_scores = [self.records[i]["subject_score"] for i in healthy]
        healthy_scores = [s for s in healthy_scores if s is not None]
        result["n_subject_lesion"], result["n_subject_healthy"] = len(lesion_scores), len(healthy_scores)
        enough = min(len(lesion_scores), len(healthy_scores)) >= MIN_SUBJECTS_PER_CLASS
        result["subject_auroc"] = (
            float(roc_auc_score([1] * len(lesion_scores) + [0] * len(healthy_scores), lesion_scores + healthy_scores))
            if enough else None)
        result["subject_auroc_note"] = None if enough else (
            f"not computed: {len(lesion_scores)} lesion and {len(healthy_scores)} healthy scans "
            f"(>= {MIN_SUBJECTS_PER_CLASS} per class needed)")
        if self.bootstrap is not None:
            result["ci"] = self._intervals(members, sums)
            if enough:
                result["ci"]["subject_auroc"] = auroc_interval(lesion_scores, healthy_scores, self.bootstrap)
        return result

    def _prepare(self) -> None:
        """One sort of every kept score (their distinct values), each scan's scores as indices into it, and,
        for the intervals, each scan's histograms on the shared quantile bins."""
        chunks = [a for i in range(len(self.records)) if self._positives[i] is not None
                  for a in (self._positives[i], self._negatives[i])]
        self._index: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}
        self._hists: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._values = np.zeros(0, np.float32)
        self._n_bins = 1
        if not chunks:
            return
        self._values, inverse = np.unique(np.concatenate(chunks), return_inverse=True)
        offset = 0
        for i in range(len(self.records)):
            if self._positives[i] is None:
                continue
            n_pos, n_neg = self._positives[i].size, self._negatives[i].size
            scale = self._negatives_seen[i] / n_neg if n_neg else 0.0  # inverse sampling rate of negatives
            self._index[i] = (inverse[offset:offset + n_pos], inverse[offset + n_pos:offset + n_pos + n_neg], scale)
            offset += n_pos + n_neg
        if self.bootstrap is None:
            return
        edges = shared_edges([p for p in self._positives if p is not None],
                             [n for n in self._negatives if n is not None])
        self._n_bins = max(len(edges) - 1, 1)
        bins = np.clip(np.searchsorted(edges, self._values.astype(np.float64), side="right") - 1, 0, self._n_bins - 1)
        for i, (pos, neg, scale) in self._index.items():
            self._hists[i] = (np.bincount(bins[pos], minlength=self._n_bins).astype(np.float64),
                              np.bincount(bins[neg], minlength=self._n_bins) * scale)

    def _intervals(self, members: list[int], sums: dict[str, np.ndarray]) -> dict[str, list[float] | None]:
        """One bootstrap over the group's subjects for every pooled metric (histograms summed per subject)."""
        names, index = group_subjects([self.records[i]["subject"] for i in members])
        pos, neg = np.zeros((len(names), self._n_bins)), np.zeros((len(names), self._n_bins))
        for row, i in zip(index, members, strict=True):
            if i in self._hists:
                pos[row] += self._hists[i][0]
                neg[row] += self._hists[i][1]
        table = SubjectTable(pos, neg, per_subject(sums, index, len(names)), self._ratios)
        return subject_intervals(table, self.bootstrap)

    def _pooled(self, members: list[int]) -> dict[str, Any]:
        """Pooled AUROC, AUPRC and oracle Dice from ONE ranking of the group's voxels: counts per distinct score
        (exact; ties as scikit-learn treats them), negatives weighted by their inverse sampling rate."""
        inside = [i for i in members if i in self._index]
        n_pos = sum(self._index[i][0].size for i in inside)
        n_neg_seen = sum(self._negatives_seen[i] for i in members)
        n_neg_kept = sum(self._index[i][1].size for i in inside)
        result: dict[str, Any] = {
            "n_voxels": n_pos + n_neg_seen,
            "lesion_fraction": n_pos / (n_pos + n_neg_seen) if n_pos + n_neg_seen else None,
            "auroc_pooled": None, "auprc_pooled": None, "dice_oracle": None, "dice_oracle_threshold": None,
            "_curve": None,
        }
        if n_pos == 0 or n_neg_kept == 0:
            return result
        size = self._values.size
        pos = np.bincount(np.concatenate([self._index[i][0] for i in inside]), minlength=size).astype(np.float64)
        neg = np.bincount(np.concatenate([self._index[i][1] for i in inside]), minlength=size,
                          weights=np.concatenate([np.full(self._index[i][1].size, self._index[i][2])
                                                  for i in inside]))
        occupied = (pos + neg) > 0
        pos, neg, values = pos[occupied], neg[occupied], self._values[occupied]
        exact = curve_metrics(pos, neg)
        tp, fp = np.cumsum(pos[::-1]), np.cumsum(neg[::-1])  # thresholds from the highest score down
        precision, recall = tp / (tp + fp), tp / tp[-1]
        best = int(np.argmax(2 * tp / (tp + fp + tp[-1])))
        last = int(np.searchsorted(tp, tp[-1]))  # as scikit-learn: the curve stops where recall reaches 1
        precision = np.concatenate([precision[last::-1], [1.0]])
        recall = np.concatenate([recall[last::-1], [0.0]])
        result.update({
            "auroc_pooled": float(exact["auroc_pooled"]),
            "auprc_pooled": float(exact["auprc_pooled"]),
            "dice_oracle": float(exact["dice_oracle"]),
            "dice_oracle_threshold": float(values[::-1][best]),  # predict score >= this
            "_curve": _curve_points(precision, recall, self.pr_curve_points),
        })
        if self._hists:  # the histogram approximation the intervals use, against the exact value
            binned = curve_metrics(sum(self._hists[i][0] for i in inside), sum(self._hists[i][1] for i in inside))
            result["_binned_error"] = float(abs(binned["auprc_pooled"] - result["auprc_pooled"]))
        return result


def _scan_sums(records: list[dict[str, Any]], matched_fp_rates: Sequence[float] = ()) -> dict[str, np.ndarray]:
    """Per-scan numerators and denominators of the ratio metrics (0 where a scan has no value)."""

    def values(key: str, default: float = 0.0) -> list[float]:
        return [default if r.get(key) is None else float(r[key]) for r in records]

    def present(key: str) -> list[float]:
        return [0.0 if r.get(key) is None else 1.0 for r in records]

    tp, fp, fn = values("tp"), values("fp"), values("fn")
    lesion = [0.0 if r["healthy"] else 1.0 for r in records]
    dice_n = [p * les for p, les in zip(present("dice"), lesion, strict=True)]
    return {key: np.asarray(v, np.float64) for key, v in {
        "dice_num": [2 * t for t in tp], "dice_den": [2 * t + f + n for t, f, n in zip(tp, fp, fn, strict=True)],
        "dice_sum": values("dice"), "dice_n": dice_n,
        "auroc_sum": values("auroc"), "auroc_n": present("auroc"),
        "auprc_sum": values("auprc"), "auprc_n": present("auprc"),
        "n_lesions": values("n_lesions"), "n_detected": values("n_detected"),
        "n_detected_chance": values("n_detected_chance"),
        **{detected_key(r): values(detected_key(r)) for r in matched_fp_rates},
        "n_fp_components": values("n_fp_components"), "n_scans_pred": present("n_fp_components"),
        "mae_sum": values("pseudo_healthy_mae"), "mae_n": present("pseudo_healthy_mae"),
        "ssim_sum": values("pseudo_healthy_ssim"), "ssim_n": present("pseudo_healthy_ssim"),
        "flagged": values("region_pred_voxels"), "region": [r["region_voxels"] * p for r, p in
                                                           zip(records, present("region_pred_voxels"), strict=True)],
    }.items()}


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> float | None:
    total = float(denominator.sum())
    return float(numerator.sum()) / total if total > 0 else None
