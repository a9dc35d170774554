"""Report files: metrics.json equals the dict, report.md writes the protocol out, PNGs are real images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.image import imread

from brainfm.anomaly.deviation import residual_map
from brainfm.anomaly.normative import NormativeCalibration
from brainfm.config import DeviationConfig
from brainfm.evaluation import MetricAccumulator, write_report


@pytest.fixture(scope="module")
def evaluation(mni_t1_2mm):
    """Two methods on template-derived scans: a sharp detector and a noisier baseline, calibrated on healthy ones."""
    t1 = mni_t1_2mm.get_fdata()[20:80:3, 20:100:3, 20:80:3]
    t1 = t1 / t1.max()
    brain = t1 > 0.2
    rng = np.random.default_rng(0)
    config = DeviationConfig(target_fpr=0.02)
    grid = np.indices(brain.shape)
    results, calibrations, examples = {}, {}, []
    for method, noise in (("ldm", 0.02), ("vae_baseline", 0.06)):

        def healthy(noise=noise):
            recon = t1 + rng.normal(0, noise, t1.shape)
            return residual_map(t1, recon, brain)

        calibration = NormativeCalibration.fit([healthy() for _ in range(4)], [brain] * 4, config)
        accumulator = MetricAccumulator(threshold=calibration.threshold)
        for index, radius in enumerate((1.5, 3.0)):
            label = (((grid - np.array([10, 13, 10])[:, None, None, None]) ** 2).sum(0) <= radius**2) & brain
            scan = t1 + 0.3 * label
            recon = t1 + rng.normal(0, noise, t1.shape)
            result = calibration.analyse(residual_map(scan, recon, brain), brain)
            accumulator.add(
                result.zmap,
                label,
                brain,
                result.mask,
                result.subject_score,
                "tumour" if index else "stroke",
                0.027,
            )
            if method == "ldm":
                examples.append(
                    {
                        "image": scan,
                        "reconstruction": recon,
                        "zmap": result.zmap,
                        "pred_mask": result.mask,
                        "label": label,
                        "title": f"case {index}",
                        "threshold": calibration.threshold,
                    }
                )
        healthy_result = calibration.analyse(healthy(), brain)
        accumulator.add(healthy_result.zmap, None, brain, healthy_result.mask, healthy_result.subject_score)
        results[method] = accumulator.compute()
        calibrations[method] = calibration
    return results, calibrations, examples


def test_report_files_and_contents(tmp_path, evaluation) -> None:
    results, calibrations, examples = evaluation
    protocol = {
        **calibrations["ldm"].protocol(),
        "spacing_mm": [6.0, 6.0, 6.0],
        "dataset": "ICBM152 simulated",
    }
    paths = write_report(results, protocol, tmp_path / "report", examples=examples)
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "examples.png",
        "metrics.json",
        "pr_curves.png",
        "report.md",
    ]
    assert json.loads(paths["metrics_json"].read_text()) == results

    text = paths["report_md"].read_text(encoding="utf-8")
    threshold = calibrations["ldm"].threshold
    assert "- Evaluation grid: 20 x 27 x 20 voxels at 6 x 6 x 6 mm" in text
    assert (
        "- Post-processing: median filter 3 vox; brain mask eroded by 1 vox; connected components "
        "(26-connectivity) smaller than 5 vox removed"
    ) in text
    assert (
        f"- Threshold: z > {threshold:.4f}, calibrated on healthy validation scans only: quantile 0.98"
        in text
    )
    assert "- Healthy false-positive target: 2.00% of healthy brain voxels" in text
    assert "- dataset: ICBM152 simulated" in text
    overall_rows = [
        line
        for line in text.splitlines()
        if line.startswith("| ldm |") or line.startswith("| vae_baseline |")
    ]
    assert len(overall_rows) == 4  # overall table + healthy FP table, both methods side by side
    ldm_auprc = results["ldm"]["overall"]["auprc_pooled"]
    assert f"| ldm | 2 | {ldm_auprc:.4f} |" in text
    assert "| small (<1 ml) / ldm |" in text and "| tumour / vae_baseline |" in text
    assert "Dice oracle" in text and "pooled metrics use every brain voxel" in text

    for name in ("pr_curves.png", "examples.png"):
        image = imread(tmp_path / "report" / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0.01  # a drawn figure, not blank


def test_single_method_and_failed_write_leaves_nothing(tmp_path, evaluation) -> None:
    results, calibrations, _ = evaluation
    paths = write_report(results["ldm"], {"method": "ldm", "target_fpr": 0.02}, tmp_path / "one")
    assert paths["examples_png"] is None and not (tmp_path / "one" / "examples.png").exists()
    assert "| ldm |" in paths["report_md"].read_text(encoding="utf-8")
    broken = {
        "ldm": {**results["ldm"], "overall": {**results["ldm"]["overall"], "auprc_pooled": float("nan")}}
    }
    with pytest.raises(ValueError):
        write_report(broken, {}, tmp_path / "broken")
    assert not (tmp_path / "broken").exists()
