"""Lesion-wise sensitivity at matched healthy false-positive rates: thresholds and detections against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from brainfm.evaluation.lesions import lesion_detection, lesion_detection_scores
from brainfm.evaluation.metrics import MetricAccumulator
from brainfm.evaluation.operating import check_rates, healthy_sample, matched_thresholds

SHAPE = (24, 24, 12)
RATES = (0.01, 0.05)


def _brain() -> np.ndarray:
    brain = np.zeros(SHAPE, bool)
    brain[2:-2, 2:-2, 1:-1] = True
    return brain


def _scans(seed: int, lesion_gain: float, noise: float) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Four healthy maps, then five lesion maps with cubes of 1-75 voxels raised by up to ``lesion_gain``; the
    background of every map is Gaussian with standard deviation ``noise`` (the same draws whatever ``noise``)."""
    rng = np.random.default_rng(seed)
    scans: list[tuple[np.ndarray, np.ndarray | None]] = []
    for _ in range(4):
        scans.append(((rng.normal(size=SHAPE) * noise).astype(np.float32), None))
    for _ in range(5):
        z = (rng.normal(size=SHAPE) * noise).astype(np.float32)
        label = np.zeros(SHAPE, bool)
        for _ in range(4):
            r = int(rng.integers(0, 3))
            c = rng.integers([3, 3, 2], [20, 20, 9])
            label[c[0] - r:c[0] + r + 1, c[1] - r:c[1] + r + 1, c[2]:c[2] + r + 1] = True
        z[label] += rng.uniform(0.0, lesion_gain, size=int(label.sum())).astype(np.float32)
        scans.append((z, label))
    return scans


def _accumulate(scans: list[tuple[np.ndarray, np.ndarray | None]], threshold: float) -> dict:
    accumulator = MetricAccumulator(threshold=threshold, matched_fp_rates=RATES,
                                    bootstrap=None, chance_level=False)
    for i, (z, label) in enumerate(scans):
        accumulator.add(z, label, _brain(), voxel_volume_ml=0.001, scan_id=f"scan{i}")
    return accumulator.compute()


def test_detection_score_is_the_needed_highest_score() -> None:
    scores = np.zeros((6, 40))
    lesion = np.zeros_like(scores, bool)
    lesion[1, 1:3] = True  # two voxels: one needed, so its highest score
    scores[1, 1:3] = [0.5, 2.0]
    lesion[4, 5:30] = True  # 25 voxels: three needed (10 %), so its third highest score
    scores[4, 5:30] = np.linspace(0.0, 2.4, 25)
    values = lesion_detection_scores(scores, lesion)
    assert sorted(values.tolist()) == pytest.approx([2.0, 2.2])
    assert lesion_detection_scores(scores, np.zeros_like(lesion)).size == 0


def test_thresholds_flag_at_most_the_rate_and_are_the_lowest_that_do() -> None:
    values = np.arange(1000, dtype=np.float64)  # 1 % above 989, 5 % above 949
    healthy = healthy_sample()
    healthy.add(values[:600])
    healthy.add(values[600:])
    (t1, f1), (t5, f5) = matched_thresholds(healthy, RATES)
    assert (t1, f1) == (989.0, pytest.approx(0.01))
    assert (t5, f5) == (949.0, pytest.approx(0.05))
    subsampled = healthy_sample(capacity=200)  # a uniform sample of the values: close, not exact
    subsampled.add(values)
    assert not subsampled.exact
    assert matched_thresholds(subsampled, (0.05,))[0][0] == pytest.approx(949.0, abs=40.0)
    assert matched_thresholds(healthy_sample(), RATES) == [None, None]
    with pytest.raises(ValueError):
        check_rates((0.0,))


def test_matched_sensitivity_equals_a_brute_force_count() -> None:
    scans = _scans(0, lesion_gain=2.5, noise=1.0)
    metrics = _accumulate(scans, threshold=2.0)
    brain = _brain()
    healthy_values = np.concatenate([z[brain] for z, label in scans if label is None])
    for rate, threshold, achieved in zip(RATES, metrics["matched_fp"]["thresholds"],
                                         metrics["matched_fp"]["healthy_fp_rate"], strict=True):
        flagged = float(np.mean(healthy_values > threshold))
        assert flagged == pytest.approx(achieved) and flagged <= rate
        assert np.mean(healthy_values >= threshold) > rate  # any lower threshold would flag more than the rate
        counts = [lesion_detection((z > threshold) & brain, label & brain) for z, label in scans if label is not None]
        expected = sum(c["n_detected"] for c in counts) / sum(c["n_lesions"] for c in counts)
        assert metrics["overall"][f"lesion_sensitivity_at_fp_{rate:g}"] == pytest.approx(expected)
        assert 0.0 < expected < 1.0
    assert metrics["overall"]["lesion_sensitivity_at_fp_0.05"] > metrics["overall"]["lesion_sensitivity_at_fp_0.01"]


def test_matched_rates_undo_a_looser_threshold() -> None:
    """The same lesions in maps twice as noisy: at one fixed threshold the noisier maps flag far more of the healthy
    brain and so 'detect' more lesions; at matched healthy false-positive rates, where the comparison is fair, the
    noisier maps (which separate lesions from healthy tissue worse) detect fewer."""
    quiet, noisy = _accumulate(_scans(1, 2.0, 1.0), 2.0), _accumulate(_scans(1, 2.0, 2.0), 2.0)
    assert noisy["healthy"]["fp_rate_pooled"] > 5 * quiet["healthy"]["fp_rate_pooled"]
    assert noisy["overall"]["lesion_sensitivity"] > quiet["overall"]["lesion_sensitivity"]
    for rate in RATES:
        key = f"lesion_sensitivity_at_fp_{rate:g}"
        assert noisy["overall"][key] < quiet["overall"][key]


def test_matched_rates_are_off_by_default_and_have_intervals() -> None:
    plain = MetricAccumulator(threshold=2.0, bootstrap=None, chance_level=False)
    for i, (z, label) in enumerate(_scans(2, 4.0, 1.0)):
        plain.add(z, label, _brain(), voxel_volume_ml=0.001, scan_id=f"scan{i}")
    result = plain.compute()
    assert "matched_fp" not in result and "lesion_sensitivity_at_fp_0.01" not in result["overall"]
    with_ci = MetricAccumulator(threshold=2.0, matched_fp_rates=(0.01,), chance_level=False)
    for i, (z, label) in enumerate(_scans(2, 4.0, 1.0)):
        with_ci.add(z, label, _brain(), voxel_volume_ml=0.001, scan_id=f"scan{i}")
    overall = with_ci.compute()["overall"]
    low, high = overall["ci"]["lesion_sensitivity_at_fp_0.01"]
    assert low <= overall["lesion_sensitivity_at_fp_0.01"] <= high and low < high


def test_the_report_shows_the_matched_rate_and_says_how_it_is_read(tmp_path) -> None:
    from brainfm.evaluation.report import write_report

    metrics = _accumulate(_scans(0, lesion_gain=2.5, noise=1.0), threshold=2.0)
    write_report(metrics, {"method": "ldm"}, tmp_path)
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    header = next(line for line in text.splitlines() if line.startswith("| method | volumes |"))
    overall = next(line for line in text.splitlines() if line.startswith("| ldm |"))
    column = header.split(" | ").index("lesion sens. @ 1 % healthy FP")
    assert overall.split(" | ")[column] == f"{metrics['overall']['lesion_sensitivity_at_fp_0.01']:.4f}"
    assert "never a threshold to deploy" in text
