"""Deviation maps and healthy calibration on the real ICBM152 brain mask (4 mm: every other 2 mm voxel)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage, stats

from brainfm.anomaly.deviation import binarize, eroded_mask, postprocess, residual_map, subject_score
from brainfm.anomaly.normative import (
    CALIBRATION_ARRAYS,
    CALIBRATION_JSON,
    NormativeCalibration,
    UniformSample,
    upper_threshold,
)
from brainfm.config import DeviationConfig
from brainfm.io import BrainFMInputError


@pytest.fixture(scope="module")
def brain_mask() -> np.ndarray:
    from nilearn.datasets import load_mni152_brain_mask

    return load_mni152_brain_mask(resolution=2).get_fdata()[::2, ::2, ::2] > 0.5


@pytest.fixture(scope="module")
def healthy_std(brain_mask: np.ndarray) -> np.ndarray:
    """A residual spread that grows smoothly from inferior to superior (0.05 to 0.25): voxelwise stats must
    follow it, a single global std cannot."""
    return np.broadcast_to(np.linspace(0.05, 0.25, brain_mask.shape[2]), brain_mask.shape).copy()


def healthy_residuals(brain_mask: np.ndarray, std: np.ndarray, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        np.where(brain_mask, 0.1 + std * rng.standard_normal(brain_mask.shape), 0.0) for _ in range(count)
    ]


def calibration_fpr(calibration: NormativeCalibration, residuals, mask, config) -> float:
    kept = eroded_mask(mask, config.mask_erosion_vox)
    flagged = [
        (postprocess(calibration.zmap(r, mask), mask, config) > calibration.threshold)[kept]
        for r in residuals
    ]
    return float(np.concatenate(flagged).mean())


def test_residual_map_kinds_mask_and_errors() -> None:
    image = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    recon = np.array([[2.0, 2.0, 2.0], [2.0, 7.0, 2.0], [2.0, 2.0, 2.0]])
    mask = np.zeros((3, 3), dtype=bool)
    mask[1, :] = True
    np.testing.assert_array_equal(residual_map(image, recon, mask, "abs"), [[0, 0, 0], [2, 2, 4], [0, 0, 0]])
    np.testing.assert_array_equal(
        residual_map(image, recon, mask, "signed_pos"), [[0, 0, 0], [2, -2, 4], [0, 0, 0]]
    )
    np.testing.assert_array_equal(
        residual_map(image, recon, mask, "signed_neg"), [[0, 0, 0], [-2, 2, -4], [0, 0, 0]]
    )
    full = np.ones((3, 3), dtype=bool)
    eroded = residual_map(image, recon, full, "abs", erosion_vox=1)
    assert np.count_nonzero(eroded) == 1 and eroded[1, 1] == 2.0

    bad = image.copy()
    bad[0, 0] = np.nan
    with pytest.raises(BrainFMInputError, match="sub-01.nii.gz: image contains NaN"):
        residual_map(bad, recon, mask, source="sub-01.nii.gz")
    with pytest.raises(BrainFMInputError, match="reconstruction has shape"):
        residual_map(image, recon[:2], mask)
    with pytest.raises(BrainFMInputError, match="2D slice or a 3D volume"):
        residual_map(np.zeros((2, 2, 2, 2)), np.zeros((2, 2, 2, 2)), np.ones((2, 2, 2, 2)))


@pytest.mark.parametrize("normalisation", ["voxelwise", "regional", "global"])
def test_calibrated_threshold_gives_requested_fpr(brain_mask, healthy_std, normalisation) -> None:
    config = DeviationConfig(normalisation=normalisation, target_fpr=0.01)
    residuals = [np.abs(r) for r in healthy_residuals(brain_mask, healthy_std, 6, seed=1)]
    regions = np.where(np.arange(brain_mask.shape[2]) < brain_mask.shape[2] // 2, 1, 2)
    regions = np.broadcast_to(regions, brain_mask.shape)
    calibration = NormativeCalibration.fit(residuals, [brain_mask] * 6, config, regions=[regions] * 6)
    assert calibration.n_scans == 6 and calibration.threshold_sample_exact
    assert calibration.n_threshold_voxels == 6 * eroded_mask(brain_mask, 1).sum()
    if normalisation == "regional":
        fpr = np.concatenate(
            [
                (
                    postprocess(calibration.zmap(r, brain_mask, regions), brain_mask, config)
                    > calibration.threshold
                )[eroded_mask(brain_mask, 1)]
                for r in residuals
            ]
        ).mean()
    else:
        fpr = calibration_fpr(calibration, residuals, brain_mask, config)
    assert abs(fpr - 0.01) <= 0.002
    assert abs(calibration.achieved_fpr - fpr) < 1e-9
    assert calibration.healthy_scores.shape == (6,) and np.all(np.isfinite(calibration.healthy_scores))


def test_voxelwise_z_of_healthy_residual_is_standard_normal(brain_mask, healthy_std) -> None:
    config = DeviationConfig(residual="signed_pos", smoothing_sigma_vox=1.0)
    calibration = NormativeCalibration.fit(
        healthy_residuals(brain_mask, healthy_std, 12, seed=2), [brain_mask] * 12, config
    )
    (new_scan,) = healthy_residuals(brain_mask, healthy_std, 1, seed=99)
    z = calibration.zmap(new_scan, brain_mask)
    inside = z[brain_mask]
    assert abs(inside.mean()) < 0.03
    assert abs(inside.std() - 1.0) < 0.05
    assert stats.kstest(inside, "norm").statistic < 0.03
    assert np.all(z[~brain_mask] == 0)
    # the point of voxelwise statistics: unit spread both where the residual spread is small and where large
    low, high = brain_mask.copy(), brain_mask.copy()
    low[:, :, brain_mask.shape[2] // 3 :] = False
    high[:, :, : 2 * brain_mask.shape[2] // 3] = False
    assert abs(z[low].std() - 1) < 0.08 and abs(z[high].std() - 1) < 0.08
    assert new_scan[high].std() > 1.8 * new_scan[low].std()


def test_bright_blob_gives_high_z_and_one_connected_mask(brain_mask, healthy_std) -> None:
    config = DeviationConfig()
    calibration = NormativeCalibration.fit(
        [np.abs(r) for r in healthy_residuals(brain_mask, healthy_std, 8, seed=3)], [brain_mask] * 8, config
    )
    (scan,) = healthy_residuals(brain_mask, healthy_std, 1, seed=4)
    grid = np.indices(brain_mask.shape)
    centre = np.array(ndimage.center_of_mass(brain_mask)).round().astype(int)
    blob = ((grid - centre[:, None, None, None]) ** 2).sum(axis=0) <= 2.5**2
    scan = np.abs(scan) + np.where(blob, 6 * healthy_std, 0.0)
    result = calibration.analyse(scan, brain_mask)
    assert np.median(result.zmap[blob]) > calibration.threshold + 3
    labels, count = ndimage.label(result.mask, structure=np.ones((3, 3, 3)))
    blob_components = set(np.unique(labels[blob])) - {0}
    assert len(blob_components) == 1
    overlap = (result.mask & blob).sum()
    assert overlap >= 0.8 * blob.sum()
    assert result.mask.sum() - overlap < 0.01 * brain_mask.sum()
    assert result.subject_score > calibration.healthy_scores.max()


def test_min_component_filter_removes_specks() -> None:
    config = DeviationConfig(mask_erosion_vox=0, min_component_vox=5, median_filter_size=0)
    z = np.zeros((12, 12, 12), dtype=np.float32)
    z[2:5, 2:5, 2:5] = 4.0  # 27 voxels: kept
    z[8, 8, 8] = 9.0  # single speck
    z[9, 2, 2] = z[10, 3, 3] = 9.0  # two diagonal neighbours: one 26-connected component of 2
    z[6, 9, 2:6] = 3.0  # a line of 4: still below 5
    mask = np.ones_like(z, dtype=bool)
    expected = np.zeros_like(mask)
    expected[2:5, 2:5, 2:5] = True
    np.testing.assert_array_equal(binarize(z, 1.0, mask, config), expected)
    unfiltered = binarize(z, 1.0, mask, DeviationConfig(mask_erosion_vox=0, min_component_vox=0))
    assert unfiltered.sum() == 27 + 1 + 2 + 4


def test_postprocess_median_and_erosion() -> None:
    config = DeviationConfig(median_filter_size=3, mask_erosion_vox=1)
    mask = np.zeros((11, 11, 11), dtype=bool)
    mask[1:10, 1:10, 1:10] = True
    z = np.where(mask, 1.0, 0.0).astype(np.float32)
    z[3, 3, 3] = 50.0  # isolated spike: removed by the median
    z[5:8, 5:8, 5:8] = 7.0  # 3x3x3 block: its centre keeps its value
    z[1, 5, 5] = -40.0  # on the brain border: removed by the erosion
    processed = postprocess(z, mask, config)
    kept = eroded_mask(mask, 1)
    assert kept.sum() == 7**3
    assert processed[3, 3, 3] == 1.0
    assert processed[6, 6, 6] == 7.0
    assert processed[kept].min() == 1.0
    assert np.all(processed[~kept] == 1.0)  # outside the eroded mask: the lowest kept value
    with pytest.raises(BrainFMInputError, match="empty after eroding"):
        postprocess(np.ones((3, 3, 3)), np.ones((3, 3, 3)), DeviationConfig(mask_erosion_vox=2))


def test_subject_score_hand_values() -> None:
    z = np.zeros((10, 20), dtype=np.float32)
    z.flat[:200] = np.arange(200, dtype=np.float32)
    mask = np.ones_like(z, dtype=bool)
    base = {"mask_erosion_vox": 0, "min_component_vox": 0}
    assert (
        subject_score(z, mask, DeviationConfig(subject_score="mean_top1pct", **base)) == 198.5
    )  # top 2 of 200
    assert subject_score(z, mask, DeviationConfig(subject_score="p99", **base)) == pytest.approx(
        np.percentile(z, 99)
    )
    assert (
        subject_score(z, mask, DeviationConfig(subject_score="lesion_load", **base), threshold=149.5) == 0.25
    )
    with pytest.raises(ValueError, match="threshold"):
        subject_score(z, mask, DeviationConfig(subject_score="lesion_load"))


def test_upper_threshold_and_uniform_sample() -> None:
    values = np.arange(1000, dtype=np.float32)
    threshold = upper_threshold(values, 0.01)
    assert threshold == 989.0 and (values > threshold).sum() == 10
    sample = UniformSample(capacity=500, seed=0)
    for chunk in np.split(np.arange(2000, dtype=np.float32), 4):
        sample.add(chunk)
    held = sample.values()
    assert held.size == 500 and not sample.exact and sample.n_seen == 2000 and np.unique(held).size == 500
    again = UniformSample(capacity=500, seed=0)
    for chunk in np.split(np.arange(2000, dtype=np.float32), 4):
        again.add(chunk)
    np.testing.assert_array_equal(np.sort(again.values()), np.sort(held))
    assert abs(np.median(held) - 1000) < 100  # uniform: the sample median tracks the stream's


def test_fit_is_streaming_replayable_and_capped(brain_mask, healthy_std) -> None:
    config = DeviationConfig()
    residuals = [np.abs(r) for r in healthy_residuals(brain_mask, healthy_std, 4, seed=5)]
    with pytest.raises(TypeError, match="one-shot"):
        NormativeCalibration.fit((r for r in residuals), [brain_mask] * 4, config)
    from_list = NormativeCalibration.fit(residuals, [brain_mask] * 4, config)
    from_callable = NormativeCalibration.fit(
        lambda: (r for r in residuals), lambda: iter([brain_mask] * 4), config
    )
    assert from_callable.threshold == from_list.threshold
    np.testing.assert_array_equal(from_callable.std_map, from_list.std_map)
    capped = NormativeCalibration.fit(residuals, [brain_mask] * 4, config, sample_capacity=20_000)
    assert not capped.threshold_sample_exact and capped.n_threshold_voxels == from_list.n_threshold_voxels
    assert abs(calibration_fpr(capped, residuals, brain_mask, config) - 0.01) <= 0.002
    with pytest.raises(ValueError):
        NormativeCalibration.fit(residuals, [brain_mask] * 3, config)


def test_regional_and_global_statistics(brain_mask) -> None:
    regions = np.broadcast_to(
        np.where(np.arange(brain_mask.shape[0]) < brain_mask.shape[0] // 2, 1, 2)[:, None, None],
        brain_mask.shape,
    )
    std = np.where(regions == 1, 0.05, 0.2)
    residuals = healthy_residuals(brain_mask, std, 5, seed=6)
    regional = NormativeCalibration.fit(
        residuals,
        [brain_mask] * 5,
        DeviationConfig(normalisation="regional", residual="signed_pos"),
        regions=[regions] * 5,
    )
    np.testing.assert_array_equal(regional.region_ids, [1, 2])
    np.testing.assert_allclose(regional.region_std, [0.05, 0.2], rtol=0.02)
    np.testing.assert_allclose(regional.region_mean, [0.1, 0.1], atol=0.005)
    z = regional.zmap(healthy_residuals(brain_mask, std, 1, seed=7)[0], brain_mask, regions)
    for label in (1, 2):
        inside = z[brain_mask & (regions == label)]
        assert abs(inside.mean()) < 0.05 and abs(inside.std() - 1) < 0.05
    with pytest.raises(ValueError, match="region"):
        regional.zmap(residuals[0], brain_mask)

    global_cal = NormativeCalibration.fit(
        healthy_residuals(brain_mask, np.full(brain_mask.shape, 0.3), 3, seed=8),
        [brain_mask] * 3,
        DeviationConfig(normalisation="global", residual="signed_pos"),
    )
    assert global_cal.center == pytest.approx(0.1, abs=0.005)
    assert global_cal.scale == pytest.approx(0.3, rel=0.02)


def test_save_load_round_trip_is_exact_and_pickle_free(tmp_path, brain_mask, healthy_std) -> None:
    config = DeviationConfig(subject_score="lesion_load", target_fpr=0.02)
    residuals = [np.abs(r) for r in healthy_residuals(brain_mask, healthy_std, 3, seed=9)]
    calibration = NormativeCalibration.fit(residuals, [brain_mask] * 3, config)
    calibration.save(tmp_path / "cal")
    assert sorted(p.name for p in (tmp_path / "cal").iterdir()) == [CALIBRATION_JSON, CALIBRATION_ARRAYS]
    for path in (tmp_path / "cal").iterdir():
        head = path.read_bytes()[:2]
        assert (
            head[:1] != b"\x80" and b"pickle" not in path.read_bytes()
        )  # no pickle protocol header anywhere
    loaded = NormativeCalibration.load(tmp_path / "cal")
    assert loaded.config == config
    for name in ("threshold", "pooled_mean", "pooled_std", "center", "scale", "n_scans", "achieved_fpr"):
        assert getattr(loaded, name) == getattr(calibration, name), name
    for name in ("mean_map", "std_map", "count_map", "healthy_scores"):
        original, restored = getattr(calibration, name), getattr(loaded, name)
        assert restored.dtype == original.dtype
        np.testing.assert_array_equal(restored, original)
    assert loaded.region_ids is None
    np.testing.assert_array_equal(
        loaded.zmap(residuals[0], brain_mask), calibration.zmap(residuals[0], brain_mask)
    )

    arrays = tmp_path / "cal" / CALIBRATION_ARRAYS
    data = bytearray(arrays.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])  # flip the last array bytes: a silently damaged file
    arrays.write_bytes(bytes(data))
    with pytest.raises(BrainFMInputError, match="checksum"):
        NormativeCalibration.load(tmp_path / "cal")
    with pytest.raises(BrainFMInputError, match="calibration file not found"):
        NormativeCalibration.load(tmp_path / "missing")


def test_postprocessing_variants_have_their_own_thresholds_and_round_trip(tmp_path, brain_mask, healthy_std) -> None:
    """Each post-processing variant is thresholded on the same healthy scans at the same target FPR (so its own
    healthy FP rate is on target), keeps the statistics, and survives save/load; the small-lesion choice too."""
    config = DeviationConfig(target_fpr=0.02)
    residuals = healthy_residuals(brain_mask, healthy_std, 4, seed=11)
    calibration = NormativeCalibration.fit(residuals, [brain_mask] * 4, config)
    assert set(calibration.variants) == {"unfiltered", "median1-min2", "median1-min3", "median3-min1",
                                         "median3-min3", "median3-min5"}
    # the default settings (median 3, minimum 5) are one of the variants: the same threshold
    assert calibration.variants["median3-min5"]["threshold"] == calibration.threshold
    unfiltered = calibration.variant("unfiltered")
    assert (unfiltered.config.median_filter_size, unfiltered.config.min_component_vox) == (1, 1)
    assert unfiltered.threshold != calibration.threshold and unfiltered.mean_map is calibration.mean_map
    assert calibration_fpr(unfiltered, residuals, brain_mask, unfiltered.config) == pytest.approx(0.02, abs=0.002)
    calibration.small_lesion_variant = "median1-min2"
    calibration.small_lesion_selection = {"criterion": "pooled Dice", "scores": {"median1-min2": 0.3}}
    calibration.save(tmp_path / "cal")
    loaded = NormativeCalibration.load(tmp_path / "cal")
    assert loaded.variants == calibration.variants and loaded.small_lesion_variant == "median1-min2"
    assert loaded.small_lesion_selection == calibration.small_lesion_selection
    with pytest.raises(KeyError, match="no post-processing variant"):
        loaded.variant("median9")
    atlas = NormativeCalibration.fit_statistics(residuals, [brain_mask] * 4, config)
    assert np.isnan(atlas.threshold) and atlas.mean_map is not None and atlas.variants == {}
