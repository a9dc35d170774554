"""Fine-tuning heads on the frozen foundation model: features, the head task for the shared training loop,
the split by subject (unseen subjects for calibration and test), evaluation at healthy-calibrated thresholds,
label-efficiency curve and cross-disease matrix."""

from brainfm.finetune.evaluate import (
    calibrate_head,
    head_scores,
    load_head_predictor,
    score_maps,
    unsupervised_scores,
)
from brainfm.finetune.features import FeatureSet, ScanRecord, ScanVolume, build_features
from brainfm.finetune.run import run_cross, run_semi, train_head
from brainfm.finetune.split import seen_subjects, split_cohort

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
    "seen_subjects",
    "split_cohort",
    "train_head",
    "unsupervised_scores",
]
