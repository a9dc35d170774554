"""``brainfm finetune semi|cross``: train heads on the shared ``Trainer`` and write the reports.

Layout of an output folder::

    features/                 cached [scan, pseudo-healthy, z-map] of every cohort scan (safetensors + JSON)
    split.json                calibration / training pool / test scans (seeded, by subject; calibration and test
                              hold only subjects the foundation model never saw, see brainfm.finetune.split)
    runs/<name>/              one training run per head: checkpoints/, logs/, head/, lora/, head_config.json,
                              eval.json (its test scans and its scores on them)
    curve.{json,md,png}       semi: Dice, AUPRC and healthy false-positive rate vs number of labelled scans, head
                              vs scratch vs unsupervised
    matrix.{json,md,png}      cross: train disease x test disease, with the unsupervised map as reference row

``--resume auto`` continues every unfinished run from its newest complete checkpoint and skips finished ones
(those with ``eval.json``), so an interrupted curve costs only the steps it lost.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from brainfm.anomaly.head import HEAD_CONFIG, HeadPredictor
from brainfm.config import FinetuneConfig, to_dict
from brainfm.finetune.evaluate import (
    REPORTED,
    calibrate_head,
    head_scores,
    load_head_predictor,
    unsupervised_scores,
)
from brainfm.finetune.features import FeatureSet, ScanRecord, hide_label, load_or_build_features, select
from brainfm.finetune.reports import write_curve, write_matrix
from brainfm.finetune.split import CohortSplit, check_disjoint, seen_subjects, split_cohort, subjects_of
from brainfm.finetune.task import HeadTask, build_samples, foundation_features, make_head
from brainfm.io import BrainFMInputError, write_json

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
UNSUPERVISED = "unsupervised"


def _scratch_config(config: FinetuneConfig) -> FinetuneConfig:
    """The baseline: a MONAI UNet on the scan alone, labels only (no foundation inputs, no unlabelled terms)."""
    return dataclasses.replace(
        config,
        head=dataclasses.replace(config.head, network=config.head.network.model_copy(update={"inputs": ("scan",)}),
                                 unet_features=False),
        lora=dataclasses.replace(config.lora, enabled=False),
        semi=dataclasses.replace(config.semi, pseudo_labels=False, consistency_weight=0.0),
        data=dataclasses.replace(config.data, unlabelled_batch_size=0),
    )


def train_head(
    config: FinetuneConfig,
    run_dir: Path,
    features: FeatureSet,
    labelled: Sequence[ScanRecord],
    unlabelled: Sequence[ScanRecord],
    calibration: Sequence[ScanRecord],
    *,
    diseases: Sequence[str] = (),
    resume: str | None = None,
) -> HeadPredictor:
    """Train one head on the shared ``brainfm.train.trainer.Trainer`` (checkpoints, guards, resume), export it
    into ``run_dir``, then calibrate its threshold on the healthy ``calibration`` scans."""
    from brainfm.train.trainer import Trainer

    if not labelled:
        raise BrainFMInputError(run_dir, "a head needs at least one labelled scan")
    check_disjoint({"the head's training scans": subjects_of(list(labelled) + list(unlabelled)),
                    "its calibration scans": subjects_of(calibration)}, run_dir)
    _check_same_training_data(run_dir, labelled, resume)
    spatial_dims = int(features.source.get("spatial_dims", 2))
    model_dir = features.source.get("model") or config.data.model
    data = config.data

    trainer = Trainer(config, run_dir)  # seeds every RNG: the head built next starts identically on every rank
    extractor, peft_model = None, None
    if config.head.unet_features:
        extractor, peft_model = foundation_features(model_dir, config, trainable_lora=config.lora.enabled)
    head = make_head(config, spatial_dims, diseases, feature_channels=0 if extractor is None else extractor.channels)
    common = dict(z_threshold=features.z_threshold, low_z=config.semi.pseudo_low_z,
                  min_brain_fraction=data.min_brain_fraction, seed=config.train.seed,
                  with_anatomy=extractor is not None, deviation=features.deviation)
    labelled_samples = build_samples(labelled, spatial_dims,
                                     negatives_per_positive=data.negative_slices_per_lesion_slice, **common)
    unlabelled_samples = None
    if unlabelled and data.unlabelled_batch_size > 0:
        unlabelled_samples = build_samples([hide_label(r) for r in unlabelled], spatial_dims, **common)
    description = {
        "format": "brainfm-head/1", "model": str(model_dir), "spatial_dims": spatial_dims,
        "inputs": list(config.head.network.inputs), "diseases": list(diseases),
        "disease_mode": config.head.network.disease_mode,
        "unet_features": extractor is not None,
        "feature_timestep": None if extractor is None else extractor.timestep,
        "labelled_scans": [r.name for r in labelled], "unlabelled_scans": [r.name for r in unlabelled],
        "labelled_subjects": subjects_of(labelled), "unlabelled_subjects": subjects_of(unlabelled),
        "z_threshold_for_pseudo_labels": features.z_threshold, "finetune_config": to_dict(config),
    }
    task = HeadTask(config, labelled_samples, unlabelled_samples, head, extractor, peft_model, description)
    trainer.fit(task, resume=resume)
    predictor = load_head_predictor(run_dir, model_dir)
    calibrate_head(predictor, calibration, features.deviation)
    return predictor


def _check_same_training_data(run_dir: Path, labelled: Sequence[ScanRecord], resume: str | None) -> None:
    """A run resumed for another split (other labelled scans) would test on what it trained on: refuse."""
    path = run_dir / HEAD_CONFIG
    if resume and path.is_file():
        recorded = json.loads(path.read_bytes()).get("labelled_scans")
        if recorded != [r.name for r in labelled]:
            raise BrainFMInputError(run_dir, "this run was trained on other labelled scans than the current split "
                                             "gives; use a new --output-dir")


def _test_names(tests: dict[str, list[ScanRecord]]) -> dict[str, list[str]]:
    return {group: [r.name for r in records] for group, records in tests.items() if records}


def _evaluate_run(run_dir: Path, predictor: HeadPredictor, tests: dict[str, list[ScanRecord]]) -> dict[str, Any]:
    """Scores per test group (``disease`` passed so a disease-aware head reads its own output)."""
    scores = {group: head_scores(predictor, records, disease=None if group == "all" else group)
              for group, records in tests.items() if records}
    write_json(run_dir / EVAL_FILE, {"tests": _test_names(tests), "scores": scores})
    return scores


def _cached_eval(run_dir: Path, resume: str | None, tests: dict[str, list[ScanRecord]]) -> dict[str, Any] | None:
    """A finished run's scores, when they were computed on exactly these test scans."""
    path = run_dir / EVAL_FILE
    if resume and path.is_file():
        stored = json.loads(path.read_bytes())
        if stored.get("tests") == _test_names(tests):
            return stored["scores"]
    return None


def _prepare(config: FinetuneConfig, out: Path, progress: bool) -> tuple[FeatureSet, CohortSplit]:
    features = load_or_build_features(config.data, out / "features", progress=progress)
    seen = seen_subjects(features.source.get("model") or config.data.model, config.data.pretraining_subjects)
    split = split_cohort(features, config.data, seen)
    write_json(out / "split.json", split.to_dict())
    return features, split


def _output_dir(config: FinetuneConfig, output_dir: str | os.PathLike | None, kind: str) -> Path:
    return Path(output_dir) if output_dir is not None else Path(config.train.output_dir) / kind


def _metric_notes(features: FeatureSet) -> dict[str, str]:
    from brainfm.evaluation.bootstrap import CI_METHOD
    from brainfm.evaluation.lesions import OVERLAP_RULE

    target = f"{features.deviation.target_fpr:g}"
    return {
        "dice": f"mean Dice over the test lesion scans at the healthy-calibrated threshold (target FPR {target})",
        "auprc": "pooled voxel AUPRC over the brain of the test lesion scans",
        "lesion_sensitivity": "detected / all lesions of the test lesion scans at the same threshold, pooled",
        "fp_lesions_per_scan": "predicted components touching no lesion, per test lesion scan",
        "fp_rate": f"healthy false-positive rate at the same threshold: flagged share of the eroded brain of the "
                   f"unseen healthy test scans, pooled (calibrated to {target} on other healthy scans)",
        "intervals": f"95 % intervals (*_ci): {CI_METHOD}; none with fewer than 2 subjects",
        "lesion_detection_rule": OVERLAP_RULE,
    }


# the lesion metrics a matrix cell withholds when its kind has too few test subjects (the healthy ones stay)
_LESION_METRICS = tuple(name for name, (group, _) in REPORTED.items() if group == "overall")


def _cell(scores: dict[str, Any], minimum: int) -> dict[str, Any]:
    """A matrix cell; with fewer than ``minimum`` test subjects its lesion metrics are withheld, not shown."""
    n = scores["n_test_subjects"]
    if n >= minimum:
        return {**scores, "status": None}
    withheld = dict.fromkeys(name + suffix for name in _LESION_METRICS for suffix in ("", "_ci"))
    return {**scores, **withheld, "status": f"too few scans ({n})"}


# ------------------------------------------------------------------------------------------------ semi
def run_semi(config: FinetuneConfig, *, resume: str | None = None, output_dir: str | os.PathLike | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Label-efficiency curve: for each number of labelled scans, a semi-supervised head on the foundation
    model's maps and a scan-only UNet trained from scratch on the same labels, vs the unsupervised map."""
    out = _output_dir(config, output_dir, "semi")
    features, split = _prepare(config, out, progress)
    order = split.labelled_order()
    test = select(features, [n for names in split.test.values() for n in names] + split.healthy_test)
    calibration = select(features, split.calibration)
    if not any(r.has_lesion for r in test):
        raise BrainFMInputError(config.data.manifest, "no lesion scans left for testing")
    reference = unsupervised_scores(test, features.z_threshold, features.deviation)
    points: list[dict[str, Any]] = []
    for count in config.semi.labelled_counts:
        n = len(order) if count == "all" else min(int(count), len(order))
        trained = [p for p in points if p["n_labelled"] == n]
        if trained:  # e.g. "10" and "all" both capped to the labelled scans there are: one run serves both
            for point in trained:
                point.setdefault("also_requested", []).append(count)
            continue
        if n == 0:
            points.append({"n_labelled": 0, "requested": count, "method": UNSUPERVISED, **reference})
            continue
        labelled = select(features, order[:n])
        unlabelled = select(features, order[n:] + split.healthy_train)
        methods = [("head", config)] + ([("scratch", _scratch_config(config))] if config.semi.baseline else [])
        for method, method_config in methods:
            run_dir = out / "runs" / f"{method}-n{n}"
            scores = _cached_eval(run_dir, resume, {"all": test})
            if scores is None:
                predictor = train_head(method_config, run_dir, features, labelled, unlabelled, calibration,
                                       resume=resume)
                scores = _evaluate_run(run_dir, predictor, {"all": test})
            points.append({"n_labelled": n, "requested": count, "method": method, "run": str(run_dir),
                           **scores["all"]})
    payload = {
        "kind": "label_efficiency_curve",
        "metrics": _metric_notes(features),
        "unsupervised_reference": reference,
        "points": points,
        "test_scans": [r.name for r in test],
        "healthy_test_scans": split.healthy_test,
        "calibration_scans": split.calibration,
        "labelled_pool_size": len(order),
        "seen_subjects": split.seen,
        "source": features.source,
        "simulated_data_note": "scores on brainfm's SIMULATED lesions measure methods, not clinical performance",
    }
    write_curve(payload, out)
    return payload


# ------------------------------------------------------------------------------------------------ cross
def run_cross(config: FinetuneConfig, *, resume: str | None = None, output_dir: str | os.PathLike | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Cross-disease matrix: a head per training group of lesion kinds, scored on each kind's test scans."""
    out = _output_dir(config, output_dir, "cross")
    features, split = _prepare(config, out, progress)
    calibration = select(features, split.calibration)
    healthy_train = select(features, split.healthy_train)
    healthy_test = select(features, split.healthy_test)
    lesion_tests = {kind: select(features, split.test.get(kind, [])) for kind in config.cross.test_kinds}
    missing = [kind for kind, records in lesion_tests.items() if not records]
    if missing:
        raise BrainFMInputError(config.data.manifest, f"no test scans of lesion kind(s) {missing}")
    # every cell: the kind's lesion scans (Dice, AUPRC) and the healthy controls (false-positive rate)
    tests = {kind: records + healthy_test for kind, records in lesion_tests.items()}
    minimum = config.cross.min_test_scans
    rows = [{"train": UNSUPERVISED, "cells": {kind: _cell(unsupervised_scores(records, features.z_threshold,
                                                                              features.deviation), minimum)
                                              for kind, records in tests.items()}}]
    for group in config.cross.train_groups:
        name = "+".join(group)
        labelled = select(features, [n for kind in group for n in split.train_pool.get(kind, [])])
        if not labelled:
            raise BrainFMInputError(config.data.manifest, f"no training scans of lesion kind(s) {list(group)}")
        run_dir = out / "runs" / f"head-{name}"
        scores = _cached_eval(run_dir, resume, tests)
        if scores is None:
            predictor = train_head(config, run_dir, features, labelled, healthy_train, calibration,
                                   diseases=tuple(group), resume=resume)
            scores = _evaluate_run(run_dir, predictor, tests)
        rows.append({"train": name, "run": str(run_dir),
                     "cells": {kind: _cell(scores[kind], minimum) for kind in tests}})
    payload = {
        "kind": "cross_disease_matrix",
        "metrics": _metric_notes(features),
        "test_kinds": list(tests),
        "rows": rows,
        "disease_mode": config.head.network.disease_mode,
        "min_test_scans": minimum,
        "n_test": {kind: len(subjects_of(records)) for kind, records in lesion_tests.items()},
        "test_scans": {kind: [r.name for r in records] for kind, records in lesion_tests.items()},
        "healthy_test_scans": split.healthy_test,
        "calibration_scans": split.calibration,
        "seen_subjects": split.seen,
        "source": features.source,
        "simulated_data_note": "scores on brainfm's SIMULATED lesions measure methods, not clinical performance",
    }
    write_matrix(payload, out)
    return payload


__all__ = ["run_cross", "run_semi", "train_head"]
