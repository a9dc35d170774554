"""Fine-tuning heads on the frozen foundation model: features, the head task for the shared training loop,
evaluation at healthy-calibrated thresholds, label-efficiency curve and cross-disease matrix."""

from brainfm.finetune.evaluate import (
    HeadPredictor,
    calibrate_head,
    head_scores,
    score_maps,
    unsupervised_scores,
)
from brainfm.finetune.features import FeatureSet, ScanRecord, ScanVolume, build_features, split_cohort
from brainfm.finetune.run import run_cross, run_semi, train_head

__all__ = [
    "FeatureSet",
    "HeadPredictor",
    "ScanRecord",
    "ScanVolume",
    "build_features",
    "calibrate_head",
    "head_scores",
    "run_cross",
    "run_semi",
    "score_maps",
    "split_cohort",
    "train_head",
    "unsupervised_scores",
]
