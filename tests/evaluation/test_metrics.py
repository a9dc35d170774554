"""Metric harness: hand-computed values on small arrays, then a template-derived end-to-end check."""

from __future__ import annotations

import numpy as np
import pytest

from brainfm.evaluation.metrics import MetricAccumulator, dice, size_bin, size_bin_names
from brainfm.io import BrainFMInputError


def volume(scores, labels):
    """A 1 x n 'slice' with every voxel inside the brain."""
    scores = np.asarray(scores, dtype=np.float64)[None, :]
    return scores, np.asarray(labels, dtype=bool)[None, :], np.ones_like(scores, dtype=bool)


def test_perfect_map_scores_one() -> None:
    rng = np.random.default_rng(0)
    acc = MetricAccumulator(threshold=0.5)
    for _ in range(3):
        label = rng.random((8, 8, 8)) < 0.1
        acc.add(label.astype(float) * 0.9 + 0.05, label, np.ones_like(label), voxel_volume_ml=0.008)
    overall = acc.compute()["overall"]
    for key in ("auroc_pooled", "auprc_pooled", "auroc_per_volume_mean", "auprc_per_volume_mean"):
        assert overall[key] == 1.0, key
    assert overall["dice_mean"] == 1.0 and overall["dice_pooled"] == 1.0 and overall["dice_oracle"] == 1.0
    assert overall["dice_oracle_threshold"] == np.float32(0.95)


def test_random_map_auprc_is_lesion_fraction() -> None:
    rng = np.random.default_rng(1)
    acc = MetricAccumulator()
    label = np.zeros((40, 40, 40), dtype=bool)
    label[5:15, 5:25, 5:25] = True  # 4000 of 64000 voxels: 6.25 %
    acc.add(rng.random(label.shape), label, np.ones_like(label), voxel_volume_ml=0.001)
    overall = acc.compute()["overall"]
    assert overall["lesion_fraction"] == 0.0625
    assert overall["auprc_pooled"] == pytest.approx(0.0625, abs=0.006)
    assert overall["auroc_pooled"] == pytest.approx(0.5, abs=0.02)
    assert overall["dice_mean"] is None  # no threshold and no predicted mask: no Dice at threshold


def test_pooled_and_per_volume_differ_as_computed_by_hand() -> None:
    # Each volume separates perfectly on its own, but volume B's healthy voxels outscore volume A's lesion.
    acc = MetricAccumulator()
    acc.add(*volume([1, 0, 0, 0], [1, 0, 0, 0]), voxel_volume_ml=1.0)
    acc.add(*volume([3, 2, 2, 2], [1, 0, 0, 0]), voxel_volume_ml=1.0)
    overall = acc.compute()["overall"]
    assert overall["auroc_per_volume_mean"] == 1.0 and overall["auprc_per_volume_mean"] == 1.0
    # positives {1, 3}, negatives {0,0,0,2,2,2}: 3 is above all 6, 1 above 3 of 6 -> AUROC (6 + 3) / 12
    assert overall["auroc_pooled"] == pytest.approx(0.75)
    # ranking 3(+) 2 2 2 1(+) 0 0 0: precision 1 at recall 0.5, 2/5 at recall 1 -> AP = 0.5 * 1 + 0.5 * 0.4
    assert overall["auprc_pooled"] == pytest.approx(0.7)
    # best pooled F1: threshold 3 -> TP 1, FP 0, FN 1 -> 2/3
    assert overall["dice_oracle"] == pytest.approx(2 / 3) and overall["dice_oracle_threshold"] == 3.0


def test_dice_at_threshold_equals_hand_count_and_oracle_is_upper_bound() -> None:
    label = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], dtype=bool)
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.1, 0.95, 0.3, 0.2, 0.1, 0.0])
    pred = scores > 0.5  # TP 3, FP 1, FN 2
    assert dice(pred, label) == pytest.approx(6 / 9)
    acc = MetricAccumulator(threshold=0.5)
    record = acc.add(scores[None], label[None], np.ones((1, 10), dtype=bool), voxel_volume_ml=0.1)
    assert (record["tp"], record["fp"], record["fn"]) == (3, 1, 2)
    assert record["dice"] == pytest.approx(6 / 9)
    overall = acc.compute()["overall"]
    assert overall["dice_mean"] == pytest.approx(6 / 9) and overall["dice_pooled"] == pytest.approx(6 / 9)
    assert overall["dice_oracle"] >= overall["dice_pooled"]
    # by hand: threshold 0.7 -> TP 3, FP 1, FN 2 (6/9); 0.1 -> TP 5, FP 4 (10/14 = 0.714) is the best
    assert overall["dice_oracle"] == pytest.approx(10 / 14) and overall[
        "dice_oracle_threshold"
    ] == np.float32(0.1)
    # an explicit predicted mask overrides the threshold; voxels outside the brain never count
    brain = np.ones((1, 10), dtype=bool)
    brain[0, 5] = False
    record = MetricAccumulator(threshold=0.5).add(
        scores[None], label[None], brain, pred_mask=pred[None], voxel_volume_ml=0.1
    )
    assert (record["tp"], record["fp"], record["fn"]) == (3, 0, 2)
    assert record["dice"] == pytest.approx(6 / 8)


def test_subject_auroc_healthy_fp_rate_and_exclusions() -> None:
    acc = MetricAccumulator(threshold=2.0)
    brain = np.ones((4, 5), dtype=bool)
    healthy_scores = [0.1, 0.4, 0.35]
    for index, score in enumerate(healthy_scores):
        z = np.zeros((4, 5))
        z.flat[:index] = 5.0  # 0, 1 and 2 flagged voxels out of 20
        acc.add(z, None, brain, subject_score=score)
    lesion = np.zeros((4, 5), dtype=bool)
    lesion[0, :2] = True
    for score in (0.8, 0.3, 0.9):
        acc.add(np.where(lesion, 3.0, 0.0), lesion, brain, subject_score=score, voxel_volume_ml=0.5)
    acc.add(np.zeros((4, 5)), np.zeros((4, 5), dtype=bool), brain, subject_score=0.2)  # labelled, lesion-free
    result = acc.compute()
    # 3 lesion vs 4 healthy scans: too few for a subject AUROC (>= 10 per class), and the result says why
    assert result["overall"]["subject_auroc"] is None and "subject_auroc" not in result["overall"]["ci"]
    assert result["overall"]["subject_auroc_note"].startswith("not computed: 3 lesion and 4 healthy")
    assert result["overall"]["n_subject_healthy"] == 4 and result["overall"]["n_subject_lesion"] == 3
    assert result["healthy"]["n_scans"] == 4
    assert result["healthy"]["fp_rate_pooled"] == pytest.approx(3 / 80)
    assert result["healthy"]["fp_rate_per_scan_mean"] == pytest.approx((0 + 0.05 + 0.1 + 0) / 4)
    assert result["healthy"]["fp_rate_per_scan_max"] == pytest.approx(0.1)
    # the lesion-free labelled scan is in the pooled metrics but excluded (and counted) per volume
    assert result["overall"]["n_volumes"] == 4 and result["overall"]["n_volumes_excluded_per_volume"] == 1
    assert result["overall"]["n_voxels"] == 80


def test_split_by_lesion_type_and_size() -> None:
    acc = MetricAccumulator(threshold=0.5)
    brain = np.ones((10, 10), dtype=bool)
    rng = np.random.default_rng(2)
    cases = [("stroke", 1), ("stroke", 4), ("tumour", 30), ("tumour", 30)]  # voxels x 0.5 ml: 0.5, 2, 15, 15
    for lesion_type, voxels in cases:
        label = np.zeros(100, dtype=bool)
        label[:voxels] = True
        label = label.reshape(10, 10)
        scores = np.where(label, 1.0, 0.0) if lesion_type == "tumour" else rng.random((10, 10))
        acc.add(scores, label, brain, lesion_type=lesion_type, voxel_volume_ml=0.5)
    result = acc.compute()
    assert sorted(result["by_lesion_type"]) == ["stroke", "tumour"]
    assert result["by_lesion_type"]["tumour"]["auprc_pooled"] == 1.0
    assert result["by_lesion_type"]["tumour"]["dice_mean"] == 1.0
    assert result["by_lesion_type"]["stroke"]["n_volumes"] == 2
    small, medium, large = size_bin_names((1.0, 10.0))
    assert (small, medium, large) == ("small (<1 ml)", "medium (1-10 ml)", "large (>10 ml)")
    assert {k: v["n_volumes"] for k, v in result["by_size"].items()} == {small: 1, medium: 1, large: 2}
    assert result["by_size"][large]["auroc_pooled"] == 1.0
    assert [r["lesion_ml"] for r in result["per_volume"]] == [0.5, 2.0, 15.0, 15.0]
    assert size_bin(1.0, (1.0, 10.0)) == medium and size_bin(10.0, (1.0, 10.0)) == medium
    assert size_bin(10.01, (1.0, 10.0)) == large


def test_negative_subsampling_is_flagged_deterministic_and_close() -> None:
    rng = np.random.default_rng(3)
    volumes = []
    for _ in range(3):
        label = rng.random((20, 20, 20)) < 0.02
        volumes.append((np.where(label, 1.0, 0.0) + rng.normal(0, 0.6, label.shape), label))
    exact, capped, again = MetricAccumulator(), MetricAccumulator(max_pooled_negatives=6000), None
    again = MetricAccumulator(max_pooled_negatives=6000)
    for scores, label in volumes:
        for acc in (exact, capped, again):
            acc.add(scores, label, np.ones_like(label), voxel_volume_ml=0.001)
    exact_result, capped_result = exact.compute(), capped.compute()
    assert not exact_result["sampling"]["pooled_negatives_subsampled"]
    assert capped_result["sampling"]["pooled_negatives_subsampled"]
    assert capped_result["sampling"]["negatives_kept"] == 6000
    assert "subsample" in capped_result["sampling"]["note"]
    assert capped_result == again.compute()
    for key in ("auroc_pooled", "auprc_pooled", "dice_oracle"):
        assert capped_result["overall"][key] == pytest.approx(exact_result["overall"][key], abs=0.03), key
    # per-volume metrics never use the subsample
    assert (
        capped_result["overall"]["auprc_per_volume_mean"] == exact_result["overall"]["auprc_per_volume_mean"]
    )
    assert capped_result["overall"]["lesion_fraction"] == exact_result["overall"]["lesion_fraction"]


def test_template_lesion_end_to_end(mni_t1_2mm) -> None:
    """A simulated bright lesion on the real template: the ideal z-score finds it, noise does not."""
    t1 = mni_t1_2mm.get_fdata()[::2, ::2, ::2]
    brain = t1 > 0.2 * t1.max()
    grid = np.indices(brain.shape)
    centre = np.array([25, 30, 25])[:, None, None, None]
    label = (((grid - centre) ** 2).sum(axis=0) <= 9) & brain
    rng = np.random.default_rng(4)
    acc = MetricAccumulator(threshold=2.5)
    acc.add(np.where(label, 4.0, 0.0) + rng.standard_normal(brain.shape), label, brain, voxel_volume_ml=0.064)
    acc.add(rng.standard_normal(brain.shape), None, brain)
    result = acc.compute()
    assert result["overall"]["auroc_pooled"] > 0.97
    assert result["overall"]["auprc_pooled"] > 5 * result["overall"]["lesion_fraction"]
    assert result["healthy"]["fp_rate_pooled"] == pytest.approx(0.0062, abs=0.002)  # P(N(0,1) > 2.5)
    assert list(result["by_size"]) == ["medium (1-10 ml)"]  # 123 voxels x 0.064 ml = 7.9 ml
    assert (
        result["overall"]["pr_curve"]["recall"][0] == 1.0
        and len(result["overall"]["pr_curve"]["recall"]) <= 200
    )


def test_bad_inputs_name_the_scan() -> None:
    acc = MetricAccumulator()
    with pytest.raises(BrainFMInputError, match="sub-07: label has shape"):
        acc.add(np.zeros((4, 4)), np.zeros((3, 4)), np.ones((4, 4)), scan_id="sub-07", voxel_volume_ml=1.0)
    scores = np.zeros((4, 4))
    scores[1, 1] = np.nan
    with pytest.raises(BrainFMInputError, match="NaN"):
        acc.add(scores, None, np.ones((4, 4)))
    with pytest.raises(ValueError, match="voxel_volume_ml"):
        acc.add(np.zeros((4, 4)), np.eye(4), np.ones((4, 4)))


def _cohort(n_lesion: int = 12, n_healthy: int = 10, seed: int = 5):
    """Small 3D scans with one spherical lesion each (three sizes) and healthy scans: noise + lesion signal."""
    rng = np.random.default_rng(seed)
    shape, grid = (16, 16, 12), np.indices((16, 16, 12))
    scans = []
    for i in range(n_lesion):
        centre = rng.integers(4, 10, 3)[:, None, None, None]
        label = ((grid - centre) ** 2).sum(axis=0) <= (1, 4, 9)[i % 3]
        scans.append(((rng.standard_normal(shape) + label * rng.uniform(1.0, 3.0)).astype(np.float32), label))
    scans += [(rng.standard_normal(shape).astype(np.float32), None) for _ in range(n_healthy)]
    return scans


def test_pooled_metrics_equal_scikit_learn_and_intervals_cover_them() -> None:
    """The pooled values are exact (scikit-learn on the concatenated voxels), the subject AUROC appears with 10
    scans per class, and every interval brackets its point value; the binned AUPRC the bootstrap uses stays
    within 0.002 of the exact one."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    acc = MetricAccumulator(threshold=2.0)
    scores, truths = [], []
    for i, (z, label) in enumerate(_cohort()):
        acc.add(z, label, np.ones(z.shape, bool), subject_score=float(z.max()), voxel_volume_ml=0.027,
                lesion_type=None if label is None else "blob", scan_id=f"s{i}")
        if label is not None:
            scores.append(z.ravel())
            truths.append(label.ravel())
    result = acc.compute()
    overall, y, s = result["overall"], np.concatenate(truths), np.concatenate(scores)
    assert overall["auprc_pooled"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert overall["auroc_pooled"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert overall["subject_auroc"] is not None and overall["subject_auroc_note"] is None
    for key in ("auprc_pooled", "auroc_pooled", "dice_pooled", "dice_oracle", "lesion_sensitivity",
                "auprc_per_volume_mean", "subject_auroc"):
        low, high = overall["ci"][key]
        assert low <= overall[key] <= high and high - low > 0, key
    low, high = result["healthy"]["ci"]["fp_rate_pooled"]
    assert low <= result["healthy"]["fp_rate_pooled"] <= high
    assert result["intervals"]["n_resamples"] == 1000 and result["intervals"]["unit"] == "subject"
    assert result["intervals"]["auprc_binned_error_max"] < 0.002
    again = MetricAccumulator(threshold=2.0)
    for i, (z, label) in enumerate(_cohort()):
        again.add(z, label, np.ones(z.shape, bool), subject_score=float(z.max()), voxel_volume_ml=0.027,
                  lesion_type=None if label is None else "blob", scan_id=f"s{i}")
    assert again.compute()["overall"]["ci"] == overall["ci"]  # seeded


def test_bootstrap_resamples_subjects_not_scans() -> None:
    """Two scans of one subject move together: with every lesion subject scanned twice (identical maps) the
    interval equals the one-scan-per-subject interval, not a narrower one."""
    once, twice = MetricAccumulator(threshold=2.0), MetricAccumulator(threshold=2.0)
    for i, (z, label) in enumerate(_cohort(n_healthy=0)):
        once.add(z, label, np.ones(z.shape, bool), voxel_volume_ml=0.027, subject=f"sub{i}")
        for contrast in ("T1", "T2"):
            twice.add(z, label, np.ones(z.shape, bool), voxel_volume_ml=0.027, subject=f"sub{i}",
                      scan_id=f"sub{i}_{contrast}")
    a, b = once.compute()["overall"], twice.compute()["overall"]
    assert b["n_subjects"] == 12 and b["n_volumes"] == 24
    assert a["ci"]["auprc_pooled"] == pytest.approx(b["ci"]["auprc_pooled"], abs=0.002)


def test_lesion_wise_detection_ignore_and_fp_region() -> None:
    """Lesion-wise counts by the stated rule, ignored voxels in neither class, the FP rate over the given region."""
    brain = np.ones((12, 12, 12), bool)
    label = np.zeros_like(brain)
    label[1:3, 1:3, 1:3] = True  # 8 voxels: 1 predicted voxel covers 12.5 % -> detected
    label[6:9, 6:9, 6:9] = True  # 27 voxels: 1 predicted voxel covers 3.7 % -> missed
    pred = np.zeros_like(brain)
    pred[1, 1, 1] = pred[6, 6, 6] = True
    pred[10:12, 0:2, 10:12] = True  # a component away from every lesion: a false-positive lesion
    pred[0, 11, 0] = True  # ... inside the ignored region: not a false positive
    ignore = np.zeros_like(brain)
    ignore[0:2, 10:12, 0:2] = True
    acc = MetricAccumulator()
    record = acc.add(np.where(label, 2.0, 0.0), label, brain, pred_mask=pred, voxel_volume_ml=1.0, ignore=ignore)
    assert (record["n_lesions"], record["n_detected"], record["n_fp_components"]) == (2, 1, 1)
    assert record["ignored_voxels"] == 8 and record["brain_voxels"] == 12**3 - 8
    healthy_pred = np.zeros_like(brain)
    healthy_pred[5, 5, 5] = healthy_pred[0, 0, 0] = True
    region = np.zeros_like(brain)
    region[2:10, 2:10, 2:10] = True  # e.g. the eroded brain the threshold was calibrated on
    healthy = acc.add(np.zeros(brain.shape), None, brain, pred_mask=healthy_pred, fp_region=region)
    assert healthy["fp_rate"] == pytest.approx(1 / 512) and healthy["n_fp_components"] == 2
    result = acc.compute()
    assert result["overall"]["lesion_sensitivity"] == 0.5 and result["overall"]["fp_lesions_per_scan"] == 1.0
    assert result["healthy"]["fp_lesions_per_scan"] == 2.0 and ">= 10%" in result["lesion_detection_rule"]


def test_by_modality_equals_each_modality_evaluated_alone():
    """A pooled model's metrics per modality are exactly those of an accumulator fed that modality's scans only;
    without ``modality`` nothing is grouped, and ``by_modality=False`` leaves the groups out."""
    rng = np.random.default_rng(7)
    brain = np.ones((10, 10, 6), bool)
    scans = []
    for i in range(8):
        label = None
        if i % 4:  # three lesion scans, one healthy scan per modality
            label = np.zeros(brain.shape, bool)
            label[2 + i % 3:5 + i % 3, 3:6, 2:4] = True
        gain = 1.0 if i % 2 else 3.0  # the two modalities separate lesions differently
        score = rng.normal(size=brain.shape) + (0 if label is None else gain * label)
        scans.append((score, label, "T1" if i % 2 else "CT", f"s{i}", "tumour" if i % 3 else "stroke"))
    pooled = MetricAccumulator(threshold=1.5)
    alone = {"T1": MetricAccumulator(threshold=1.5), "CT": MetricAccumulator(threshold=1.5)}
    for score, label, modality, subject, kind in scans:
        for accumulator, tag in ((pooled, modality), (alone[modality], None)):
            accumulator.add(score, label, brain, lesion_type=kind, voxel_volume_ml=0.001, scan_id=subject,
                            subject=subject, modality=tag)
    result = pooled.compute()
    assert set(result["by_modality"]) == {"CT", "T1"}
    for modality, accumulator in alone.items():
        expected, entry = accumulator.compute(), result["by_modality"][modality]
        assert expected["by_modality"] == {}
        for key in ("auprc_pooled", "auroc_pooled", "dice_pooled", "n_lesion_volumes"):
            assert entry["overall"][key] == pytest.approx(expected["overall"][key])
        assert entry["overall"]["ci"]["auprc_pooled"] == pytest.approx(expected["overall"]["ci"]["auprc_pooled"])
        assert entry["healthy"]["fp_rate_pooled"] == pytest.approx(expected["healthy"]["fp_rate_pooled"])
        assert set(entry["by_lesion_type"]) == set(expected["by_lesion_type"])
    assert result["by_modality"]["CT"]["overall"]["auprc_pooled"] > result["by_modality"]["T1"]["overall"][
        "auprc_pooled"]
    assert pooled.compute(by_modality=False)["by_modality"] == {}
