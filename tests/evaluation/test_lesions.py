"""Chance level of lesion-wise detection: hand counts, and the FFT path against a brute-force count."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from brainfm.evaluation.lesions import MIN_LESION_OVERLAP, chance_detections
from brainfm.evaluation.metrics import MetricAccumulator


def brute_force(pred: np.ndarray, lesion: np.ndarray, region: np.ndarray) -> float:
    """Every lesion moved to every centre in ``region`` where it touches no lesion voxel, counted one by one."""
    structure = ndimage.generate_binary_structure(lesion.ndim, lesion.ndim)
    truth, count = ndimage.label(lesion, structure=structure)
    expected = 0.0
    for index, box in enumerate(ndimage.find_objects(truth), start=1):
        offsets = np.argwhere(truth[box] == index) - np.array([s // 2 for s in truth[box].shape])
        needed = max(1, int(np.ceil(MIN_LESION_OVERLAP * len(offsets) - 1e-9)))
        hits = placements = 0
        for centre in itertools.product(*(range(n) for n in lesion.shape)):
            if not region[centre]:
                continue
            cells = offsets + np.array(centre)
            inside = np.all((cells >= 0) & (cells < np.array(lesion.shape)), axis=1)
            cells = tuple(cells[inside].T)
            if lesion[cells].any():
                continue
            placements += 1
            hits += int(pred[cells].sum() >= needed)
        expected += hits / placements
    return expected


def test_chance_counts_by_hand() -> None:
    region = np.ones((10, 10), bool)
    lesion = np.zeros_like(region)
    lesion[0, 0] = True  # one voxel: 99 places off itself
    pred = np.zeros_like(region)
    pred[5, :] = True  # ten flagged voxels
    assert chance_detections(pred, lesion, region) == pytest.approx(10 / 99)
    assert chance_detections(np.zeros_like(pred), lesion, region) == 0.0
    assert chance_detections(region.copy(), lesion, region) == pytest.approx(1.0)  # everything flagged
    assert chance_detections(pred, np.zeros_like(lesion), region) == 0.0


def test_chance_needs_ten_percent_of_a_large_lesion() -> None:
    """A 5 x 5 lesion (25 voxels) needs 3 covered voxels: flagged voxels 6 apart (at most one under it anywhere)
    never detect it by chance; bars of 3 do, as often as a count over every place says."""
    region = np.ones((30, 30), bool)
    lesion = np.zeros_like(region)
    lesion[1:6, 1:6] = True
    sparse, bars = np.zeros_like(region), np.zeros_like(region)
    sparse[::6, ::6] = True
    bars[::9, 10:13] = True
    assert chance_detections(sparse, lesion, region) == 0.0
    assert chance_detections(bars, lesion, region) == pytest.approx(brute_force(bars, lesion, region))
    assert 0.05 < chance_detections(bars, lesion, region) < 0.1  # 27 of the 418 places (off the lesion)


def test_fft_path_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    shape = (14, 14, 10)
    region = np.zeros(shape, bool)
    region[1:13, 1:13, 1:9] = True
    lesion = np.zeros(shape, bool)
    lesion[2:8, 2:8, 2:7] = rng.random((6, 6, 5)) < 0.8  # a large irregular lesion: the FFT path
    lesion[10, 10, 6] = lesion[11, 11, 6] = True  # a small one: the direct path
    lesion &= region
    pred = (rng.random(shape) < 0.2) & region
    assert chance_detections(pred, lesion, region) == pytest.approx(brute_force(pred, lesion, region), abs=1e-9)


def test_chance_level_in_the_metrics() -> None:
    """The sensitivity of a mask that sees nothing equals its chance level; one that finds every lesion exceeds it."""
    rng = np.random.default_rng(1)
    brain = np.ones((16, 16, 16), bool)
    lesion = np.zeros_like(brain)
    for corner in ((2, 2, 2), (10, 10, 10), (2, 11, 5)):
        lesion[tuple(slice(c, c + 2) for c in corner)] = True
    blind = MetricAccumulator()
    seeing = MetricAccumulator()
    off = MetricAccumulator(chance_level=False)
    noise = rng.random(brain.shape) < 0.05
    blind.add(noise.astype(float), lesion, brain, pred_mask=noise, voxel_volume_ml=1.0)
    seeing.add(lesion.astype(float), lesion, brain, pred_mask=lesion | noise, voxel_volume_ml=1.0)
    off.add(lesion.astype(float), lesion, brain, pred_mask=lesion, voxel_volume_ml=1.0)
    chance_blind = blind.compute()["overall"]["lesion_sensitivity_chance"]
    assert chance_blind == pytest.approx(brute_force(noise, lesion, brain) / 3)
    assert 0.1 < chance_blind < 0.5
    found = seeing.compute()["overall"]
    assert found["lesion_sensitivity"] == 1.0 and found["lesion_sensitivity_chance"] < 0.5
    assert "lesion_sensitivity_chance" in found["ci"]
    result = off.compute()["overall"]
    assert "lesion_sensitivity_chance" not in result and "lesion_sensitivity_chance" not in result["ci"]
