"""Heads at inference: probability maps, the healthy-calibrated threshold, and scores comparable with the map.

A head's probability threshold is set exactly like the unsupervised z threshold: the (1 - target_fpr) quantile of
its values over the eroded brain of HEALTHY calibration scans. Both maps are then binarised with the same
post-processing (erosion, small-component removal) and scored by the same ``MetricAccumulator``, so "Dice at the
healthy-calibrated threshold" means the same thing for the head, the scratch baseline and the unsupervised map,
and so does the healthy false-positive rate each reaches at its threshold on the unseen healthy test scans.

A head is scored only on subjects it never saw: ``head_config.json`` records its training and calibration
subjects, and scoring refuses any overlap.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brainfm.anomaly.deviation import binarize, eroded_mask
from brainfm.anomaly.head import HEAD_CONFIG, HEAD_SUBDIR, HeadPredictor
from brainfm.anomaly.normative import upper_threshold
from brainfm.config import DeviationConfig, to_dict
from brainfm.finetune.features import ScanRecord
from brainfm.finetune.split import check_disjoint, subjects_of
from brainfm.finetune.task import write_head_info
from brainfm.io import BrainFMInputError


def load_head_predictor(head_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None) -> HeadPredictor:
    """A head training run (or its ``head/`` folder) on the foundation model it reads features from
    (``model_dir``, default: the one recorded in its ``head_config.json``), loaded through the pipeline."""
    from brainfm.pipeline import BrainFMPipeline

    head_dir = Path(head_dir)
    if model_dir is None:
        settings = next((p for p in (head_dir / HEAD_CONFIG, head_dir / HEAD_SUBDIR / HEAD_CONFIG) if p.is_file()),
                        None)
        model_dir = json.loads(settings.read_bytes()).get("model") if settings is not None else None
        if not model_dir:
            raise BrainFMInputError(head_dir, "give the foundation model folder (head_config.json names none)")
    return BrainFMPipeline.from_pretrained(model_dir).load_head(head_dir).head_predictor()


def record_probability(predictor: HeadPredictor, record: ScanRecord, disease: str | None = None) -> np.ndarray:
    """The head's probability map of one fine-tuning record (its cached scan, pseudo-healthy and z-map)."""
    return predictor.probability(record.image, record.pseudo_healthy, record.zmap, record.mask, record.anatomy,
                                 record.meta, disease)


# ------------------------------------------------------------------------------------------------ calibration
def calibrate_threshold(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], deviation: DeviationConfig) -> float:
    """(1 - target_fpr) quantile of the maps over the eroded brain of healthy scans."""
    values = [np.asarray(m)[eroded_mask(np.asarray(b) > 0, deviation.mask_erosion_vox)] for m, b in zip(maps, masks,
                                                                                                       strict=True)]
    if not values or sum(v.size for v in values) == 0:
        raise BrainFMInputError(None, "no healthy brain voxels to calibrate the head threshold on")
    return float(upper_threshold(np.concatenate(values), deviation.target_fpr))


def calibrate_head(predictor: HeadPredictor, healthy: Sequence[ScanRecord], deviation: DeviationConfig) -> float:
    """Set and store (in ``head_config.json``) the head's threshold at the map's healthy false-positive rate."""
    check_disjoint({"the head's training scans": head_subjects(predictor, ("labelled", "unlabelled")),
                    "its calibration scans": subjects_of(healthy)}, predictor.path)
    maps = [record_probability(predictor, r) for r in healthy]
    threshold = calibrate_threshold(maps, [r.mask for r in healthy], deviation)
    predictor.threshold, predictor.deviation = threshold, deviation
    if predictor.path is not None:
        info = {**predictor.info, "threshold": threshold, "target_fpr": deviation.target_fpr,
                "deviation": to_dict(deviation), "calibration_scans": [r.name for r in healthy],
                "calibration_subjects": subjects_of(healthy)}
        write_head_info(predictor.path, info)
        predictor.info = info
    return threshold


def head_subjects(predictor: HeadPredictor, roles: Sequence[str] = ("labelled", "unlabelled", "calibration")
                  ) -> list[str]:
    """The subjects a head has seen in ``roles``, as its ``head_config.json`` records them (refused when it
    records none: such a head cannot be shown to be scored on unseen scans)."""
    keys = [f"{role}_subjects" for role in roles]
    missing = [k for k in keys if k not in predictor.info]
    if missing:
        raise BrainFMInputError(predictor.path, f"head_config.json records no {', '.join(missing)}: retrain the "
                                                "head with this brainfm to score it")
    return sorted({s for k in keys for s in predictor.info[k]})


# ------------------------------------------------------------------------------------------------ scoring
# reported name -> (group of ``MetricAccumulator.compute()``, its metric): lesion metrics over the lesion scans,
# false positives over the healthy ones, each with its bootstrap interval over subjects (``<name>_ci``)
REPORTED = {
    "dice": ("overall", "dice_mean"),
    "auprc": ("overall", "auprc_pooled"),
    "auprc_per_volume_mean": ("overall", "auprc_per_volume_mean"),
    "dice_oracle": ("overall", "dice_oracle"),
    "lesion_sensitivity": ("overall", "lesion_sensitivity"),
    "fp_lesions_per_scan": ("overall", "fp_lesions_per_scan"),
    "fp_rate": ("healthy", "fp_rate_pooled"),
    "healthy_fp_lesions_per_scan": ("healthy", "fp_lesions_per_scan"),
}


def score_maps(records: Sequence[ScanRecord], maps: Sequence[np.ndarray], threshold: float,
               deviation: DeviationConfig) -> dict[str, Any]:
    """Dice at ``threshold`` (healthy-calibrated), pooled AUPRC and lesion-wise detection over the lesion scans
    of ``records``; the healthy false-positive rate at the same threshold over its healthy scans, counted over
    the eroded brain the threshold was calibrated on; 95 % bootstrap intervals over subjects for each
    (``brainfm.evaluation``'s ``MetricAccumulator``, the statistics of ``brainfm evaluate``)."""
    from brainfm.evaluation import MetricAccumulator

    accumulator = MetricAccumulator(threshold=threshold)
    for record, score in zip(records, maps, strict=True):
        prediction = binarize(score, threshold, record.mask, deviation)
        accumulator.add(score, record.label, record.mask, prediction, lesion_type=record.lesion_type,
                        voxel_volume_ml=record.voxel_volume_ml, scan_id=record.name, subject=record.subject,
                        fp_region=eroded_mask(np.asarray(record.mask) > 0, deviation.mask_erosion_vox))
    metrics = accumulator.compute()
    lesion = [r for r in records if r.has_lesion]
    healthy = [r for r in records if r.label is None or not r.has_lesion]
    scores: dict[str, Any] = {}
    for name, (group, key) in REPORTED.items():
        scores[name] = metrics[group].get(key)
        scores[f"{name}_ci"] = (metrics[group].get("ci") or {}).get(key)
    return {
        **scores,
        "threshold": float(threshold),
        "n_scans": len(records),
        "n_test": len(lesion),
        "n_test_subjects": len(subjects_of(lesion)),
        "n_healthy_test": len(healthy),
        "n_healthy_test_subjects": len(subjects_of(healthy)),
        "intervals": metrics["intervals"],
        "lesion_detection_rule": metrics["lesion_detection_rule"],
    }


def unsupervised_scores(records: Sequence[ScanRecord], z_threshold: float, deviation: DeviationConfig) -> dict[str, Any]:
    """The reference: the foundation model's calibrated z-map, no labels used."""
    return score_maps(records, [r.zmap for r in records], z_threshold, deviation)


def head_scores(predictor: HeadPredictor, records: Sequence[ScanRecord], disease: str | None = None) -> dict[str, Any]:
    """The head's scores on ``records``, which must share no subject with its training or calibration scans."""
    if predictor.threshold is None:
        raise BrainFMInputError(predictor.path, "head is not calibrated (no threshold in head_config.json)")
    check_disjoint({"the head's training or calibration scans": head_subjects(predictor),
                    "the scans it is scored on": subjects_of(records)}, predictor.path)
    maps = [record_probability(predictor, r, disease) for r in records]
    return score_maps(records, maps, predictor.threshold, predictor.deviation)


__all__ = ["REPORTED", "calibrate_head", "calibrate_threshold", "head_scores", "head_subjects", "load_head_predictor",
           "record_probability", "score_maps", "unsupervised_scores"]
