"""Baselines on scans made from the real ICBM152 template (4 mm): the prior fit, the normative atlas's statistics,
healthy-calibrated thresholds, lesion scores, persistence, and the small-lesion post-processing choice."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from brainfm.anomaly.baselines import (
    ATLAS,
    INTENSITY,
    PRIOR_FIT,
    Baselines,
    HealthyScan,
    choose_small_lesion_variant,
    fit_atlas,
    fit_baselines,
    prior_fit,
    tail_score,
)
from brainfm.anomaly.deviation import eroded_mask, residual_map
from brainfm.anomaly.normative import NormativeCalibration
from brainfm.config import DeviationConfig


@pytest.fixture(scope="module")
def template(template_volumes) -> dict[str, np.ndarray]:
    image = template_volumes["image"].numpy()[::2, ::2, ::2]
    anatomy = template_volumes["anatomy"].numpy()[:, ::2, ::2, ::2]
    return {"image": image, "mask": anatomy[0] > 0.5, "anatomy": anatomy}


def _subject(template: dict[str, np.ndarray], seed: int) -> HealthyScan:
    """The template with its own smooth gain field and noise, brain-masked as preprocessing leaves it."""
    rng = np.random.default_rng(seed)
    gain = 1.0 + 0.05 * ndimage.gaussian_filter(rng.standard_normal(template["image"].shape), 6) * 10
    image = template["image"] * gain + rng.normal(0, 0.02, template["image"].shape)
    mask = template["mask"]
    return HealthyScan((np.clip(image, 0, 1) * mask).astype(np.float32), mask, template["anatomy"], "T1")


def test_tail_score_and_prior_fit(template) -> None:
    values = np.array([0.2, 0.5, 0.9])
    np.testing.assert_allclose(tail_score(values, "high", 0.5), [-0.3, 0.0, 0.4], atol=1e-6)
    np.testing.assert_allclose(tail_score(values, "low", 0.5), [0.3, 0.0, -0.4], atol=1e-6)
    np.testing.assert_allclose(tail_score(values, "both", 0.5), [0.3, 0.0, 0.4], atol=1e-6)
    gm, wm, mask = template["anatomy"][1], template["anatomy"][2], template["mask"]
    exact = (0.2 + 0.3 * gm - 0.1 * wm + 0.05 * gm * wm + 0.1 * wm**2) * mask
    np.testing.assert_allclose(prior_fit(exact, mask, template["anatomy"]), exact, atol=1e-5)
    assert prior_fit(exact, mask, template["anatomy"])[~mask].max() == 0.0


def test_atlas_is_the_voxelwise_mean_and_std_of_the_training_scans(template) -> None:
    scans = [_subject(template, seed) for seed in range(5)]
    config = DeviationConfig(smoothing_sigma_vox=0.0)
    statistics, count = fit_atlas(iter(scans), ["T1"], config)
    assert count == 5
    images = np.stack([s.image for s in scans])
    mask = template["mask"]
    np.testing.assert_allclose(statistics["T1"].mean_map[mask], images.mean(0)[mask], atol=1e-5)
    expected_std = np.maximum(images.std(0, ddof=1), config.std_floor * statistics["T1"].pooled_std)
    np.testing.assert_allclose(statistics["T1"].std_map[mask], expected_std[mask], rtol=1e-4, atol=1e-6)


def test_baselines_hold_the_healthy_fpr_score_a_dark_lesion_and_round_trip(template, tmp_path) -> None:
    config = DeviationConfig(target_fpr=0.02)
    train = [_subject(template, seed) for seed in range(10, 16)]
    val = [_subject(template, seed) for seed in range(20, 24)]
    baselines = fit_baselines(val, iter(train), config)
    assert set(baselines.entries) == {INTENSITY, ATLAS, PRIOR_FIT} and baselines.n_atlas_scans == 6
    assert baselines.entry(INTENSITY, "T1").tail == "low" and baselines.entry(ATLAS, "T1").statistics is not None
    assert baselines.entry(INTENSITY, "T1").calibration.config.normalisation == "global"
    healthy = _subject(template, 99)
    lesion = np.zeros(template["mask"].shape, bool)
    lesion[20:25, 24:29, 18:23] = True
    lesion &= eroded_mask(template["mask"], 2)
    dark = dataclasses.replace(healthy, image=np.where(lesion, 0.05, healthy.image).astype(np.float32))
    kept = eroded_mask(template["mask"], config.mask_erosion_vox)
    for method in (INTENSITY, ATLAS, PRIOR_FIT):
        calibration = baselines.entry(method, "T1").calibration
        flagged = calibration.analyse(baselines.score(method, healthy.image, healthy.mask, healthy.anatomy, "T1")[0],
                                      healthy.mask).mask
        assert flagged[kept].mean() < 3 * config.target_fpr, method  # an unseen healthy scan: near the target
        found = calibration.analyse(baselines.score(method, dark.image, dark.mask, dark.anatomy, "T1")[0],
                                    dark.mask).mask
        assert found[lesion].mean() > 0.5, method  # a dark T1 lesion is flagged
    baselines.save(tmp_path / "baselines")
    loaded = Baselines.load(tmp_path / "baselines")
    assert loaded.summary() == baselines.summary()
    for method in (INTENSITY, ATLAS, PRIOR_FIT):
        np.testing.assert_array_equal(loaded.score(method, dark.image, dark.mask, dark.anatomy, "T1")[0],
                                      baselines.score(method, dark.image, dark.mask, dark.anatomy, "T1")[0])
        assert loaded.entry(method, "T1").calibration.threshold == baselines.entry(method, "T1").calibration.threshold


def test_small_lesion_setting_is_chosen_on_validation_lesions(template) -> None:
    """Lesions of 2 voxels vanish under a 3x3x3 median filter and a 5-voxel minimum component: the choice made on
    labelled validation scans is a setting without the median filter, and it records every candidate's score."""
    rng = np.random.default_rng(3)
    mask = template["mask"]
    healthy = [residual_map(rng.random(mask.shape).astype(np.float32), np.zeros(mask.shape), mask) * 0.1
               for _ in range(4)]
    calibration = NormativeCalibration.fit(healthy, [mask] * 4, DeviationConfig())
    residuals, labels = [], []
    inner = np.argwhere(eroded_mask(mask, 2))
    for seed in range(3):
        label = np.zeros(mask.shape, bool)
        for x, y, z in inner[np.random.default_rng(seed).choice(len(inner), 12, replace=False)]:
            label[x, y, z:z + 2] = True  # 2-voxel dots
        residuals.append(np.where(label & mask, 0.6, 0.1 * rng.random(mask.shape)).astype(np.float32) * mask)
        labels.append(label & mask)
    choose_small_lesion_variant(calibration, residuals, [mask] * 3, labels, ["svd"] * 3)
    scores = calibration.small_lesion_selection["scores"]
    assert calibration.variants[calibration.small_lesion_variant]["median_filter_size"] == 1
    assert scores[calibration.small_lesion_variant] > 10 * scores["median3-min5"]  # the default erases the dots
    assert calibration.small_lesion_selection["lesion_types"] == ["svd"]
