"""Head and map scores on FIXED maps equal a hand computation: the healthy false-positive rate over the eroded
brain the threshold was calibrated on, Dice, lesion-wise detection and pooled AUPRC (scikit-learn), with the
bootstrap intervals over subjects of ``brainfm.evaluation`` (two scans of one subject resample together)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from brainfm.anomaly.deviation import eroded_mask
from brainfm.config import DeviationConfig
from brainfm.finetune.evaluate import score_maps
from brainfm.finetune.features import ScanRecord
from brainfm.finetune.reports import value_text

SHAPE = (12, 12, 12)
DEVIATION = DeviationConfig(mask_erosion_vox=1, min_component_vox=2)
THRESHOLD = 0.5


def _record(name: str, subject: str, label: np.ndarray | None) -> ScanRecord:
    mask = np.zeros(SHAPE, bool)
    mask[1:11, 1:11, 1:11] = True
    return ScanRecord(name=name, subject=subject, image=np.zeros(SHAPE, np.float32), mask=mask,
                      anatomy=np.zeros((1, *SHAPE), np.float32), meta={}, label=label,
                      lesion_type="healthy" if label is None else "tumour", voxel_volume_ml=0.001)


def _cohort():
    """Three lesion subjects (two lesions each: one the map finds, one it misses) and three healthy subjects,
    one of them with two scans; maps with flagged blocks inside the eroded brain, a flagged edge voxel outside
    it and a single flagged voxel (removed as smaller than ``min_component_vox``)."""
    records, maps = [], []
    rng = np.random.default_rng(0)
    for i in range(3):
        label = np.zeros(SHAPE, np.uint8)
        label[3:5, 3:5, 3:5] = 1  # found: the map covers it
        label[7:9, 7:9, 7:9] = 1  # missed
        score = rng.uniform(0.0, 0.4, SHAPE).astype(np.float32)
        score[3:5, 3:5, 3:5] = 0.9
        score[3:5, 7:9, 3:3 + i + 2] = 0.8  # a false-positive lesion of 8, 12 or 16 voxels
        score[7:9, 7:9, 7:9] = 0.45 + 0.01 * i  # below the threshold, above the background for AUPRC
        records.append(_record(f"lesion-{i}", f"lesion-{i}", label))
        maps.append(score)
    for name, subject, block in (("h0-a", "h0", 3), ("h0-b", "h0", 2), ("h1", "h1", 0), ("h2", "h2", 4)):
        score = rng.uniform(0.0, 0.4, SHAPE).astype(np.float32)
        score[2:2 + block, 5:7, 5:7] = 0.7  # 4 * block flagged voxels inside the eroded brain
        score[1, 1, 1] = 0.9  # brain edge: outside the eroded brain the threshold was calibrated on
        score[8, 2, 8] = 0.9  # a single voxel: removed by post-processing
        records.append(_record(name, subject, None))
        maps.append(score)
    return records, maps


def test_scores_on_a_fixed_map_equal_a_hand_computation():
    records, maps = _cohort()
    scores = score_maps(records, maps, THRESHOLD, DEVIATION)
    region = eroded_mask(records[0].mask, 1)
    assert int(region.sum()) == 8 ** 3
    # healthy false-positive rate: flagged voxels of the eroded brain, pooled over the 4 healthy scans
    flagged = 4 * (3 + 2 + 0 + 4)
    assert scores["fp_rate"] == pytest.approx(flagged / (4 * 8 ** 3))
    assert scores["healthy_fp_lesions_per_scan"] == pytest.approx(3 / 4)  # h0-a, h0-b and h2 have one blob each
    # lesion scans: Dice of each, then the mean
    dices = []
    for i in range(3):
        predicted = 8 + 4 * (i + 2)
        dices.append(2 * 8 / (predicted + 16))
    assert scores["dice"] == pytest.approx(np.mean(dices))
    assert scores["lesion_sensitivity"] == pytest.approx(3 / 6)  # one of two lesions found in each scan
    assert scores["fp_lesions_per_scan"] == pytest.approx(1.0)
    # pooled AUPRC over the brain voxels of the lesion scans (scikit-learn on the same float32 values)
    truth = np.concatenate([r.label[r.mask] > 0 for r in records[:3]])
    values = np.concatenate([m[r.mask] for r, m in zip(records[:3], maps[:3], strict=True)])
    assert scores["auprc"] == pytest.approx(average_precision_score(truth, values))
    assert (scores["n_test"], scores["n_test_subjects"]) == (3, 3)
    assert (scores["n_healthy_test"], scores["n_healthy_test_subjects"]) == (4, 3)
    # intervals over subjects: h0's two scans are drawn together, so no resample can hold h0-a without h0-b
    low, high = scores["fp_rate_ci"]
    per_subject = {"h0": (4 * 5, 2 * 8 ** 3), "h1": (0, 8 ** 3), "h2": (16, 8 ** 3)}
    rates = [f / r for f, r in per_subject.values()]
    assert min(rates) <= low <= scores["fp_rate"] <= high <= max(rates)
    assert scores["dice_ci"][0] <= scores["dice"] <= scores["dice_ci"][1]
    assert scores["intervals"]["unit"] == "subject"
    assert value_text(scores, "fp_rate") == f"{scores['fp_rate']:.3f} [{low:.3f}, {high:.3f}]"


def test_one_subject_gives_values_without_intervals():
    records, maps = _cohort()
    scores = score_maps(records[:1] + records[3:4], maps[:1] + maps[3:4], THRESHOLD, DEVIATION)
    assert scores["fp_rate"] == pytest.approx(12 / 8 ** 3)
    assert scores["fp_rate_ci"] is None and scores["dice_ci"] is None
    assert value_text(scores, "fp_rate") == f"{12 / 8 ** 3:.3f}"
    assert value_text({**scores, "dice": None, "status": "too few scans (1)"}, "dice") == "too few scans (1)"
