"""Fine-tuning heads on the frozen foundation model: features, the head task for the shared training loop,
evaluation at healthy-calibrated thresholds, label-efficiency curve and cross-disease matrix."""

from brainfm.finetune.evaluate import (
    calibrate_head,
    head_scores,
    load_head_predictor,
    score_maps,
    unsupervised_scores,
)
from brainfm.finetune.features import FeatureSet, ScanRecord, ScanVolume, build_features, split_cohort
from brainfm.finetune.run import run_cross, run_semi, train_head

__all__ = [
    "FeatureSet",
    "ScanRecord",
    "ScanVolume",
    "build_features",
    "calibrate_head",
    "head_scores",
    "load_head_predictor",
    "run_cross",
    "run_semi",
    "score_maps",
    "split_cohort",
    "train_head",
    "unsupervised_scores",
]
