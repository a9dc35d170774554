"""``evaluate`` end to end on fixed maps (every number checked against scikit-learn or a hand count), which rows
of a manifest it scores, and label values it ignores."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from brainfm.anomaly import evaluate as evaluation
from brainfm.anomaly.evaluate import EvalCase, cases_from_manifest, ignore_values, split_label
from brainfm.anomaly.normative import NormativeCalibration
from brainfm.config import DeviationConfig
from brainfm.io import BrainFMInputError

THRESHOLD = 1.5
SHAPE = (12, 12, 10)


def _identity_calibration() -> NormativeCalibration:
    """Global z with centre 0 and scale 1, no median filter, no erosion, no component filter: the post-processed
    z-map inside the brain IS the score map, so the expected metrics can be computed from the fixed maps."""
    config = DeviationConfig(normalisation="global", median_filter_size=1, mask_erosion_vox=0, min_component_vox=1)
    variant = {"median_filter_size": 1, "min_component_vox": 1, "threshold": THRESHOLD, "achieved_fpr": 0.01}
    return NormativeCalibration(config=config, threshold=THRESHOLD, pooled_mean=0.0, pooled_std=1.0, center=0.0,
                                scale=1.0, variants={"unfiltered": variant})


def _fixed_cases() -> list[tuple[EvalCase, np.ndarray]]:
    """Lesion and healthy cases with their fixed score maps (a brain box, one cube lesion per lesion scan)."""
    rng = np.random.default_rng(7)
    brain = np.zeros(SHAPE, bool)
    brain[1:11, 1:11, 1:9] = True
    cases = []
    for i in range(6):
        label = None
        if i < 4:
            label = np.zeros(SHAPE, bool)
            label[2 + i:5 + i, 3:6, 2:5] = True
        score = rng.standard_normal(SHAPE).astype(np.float32) + (0 if label is None else 2.0 * label)
        cases.append((EvalCase(f"scan{i}", np.zeros(SHAPE, np.float32), brain, np.zeros((3, *SHAPE), np.float32),
                               {"modality": "T1"}, label, "tumour" if i % 2 else "stroke", 0.027, f"sub{i}"),
                      score.astype(np.float32)))
    return cases


def test_evaluate_metrics_equal_scikit_learn_on_fixed_maps(monkeypatch, tmp_path) -> None:
    """Through evaluate's whole path (scoring, calibration, post-processing, accumulation, report files): pooled
    and per-volume AUROC/AUPRC equal scikit-learn's on the same maps, Dice at the threshold equals a hand count."""
    cases = _fixed_cases()
    calibration = _identity_calibration()
    maps = {case.name: score for case, score in cases}
    pipeline = SimpleNamespace(calibration_for=lambda vae_only: calibration, reconstructor=lambda vae_only: None,
                               baselines=None, head_predictor=lambda: None, model_dir=tmp_path,
                               recipe=SimpleNamespace(spacing=(3.0, 3.0, 3.0)))
    monkeypatch.setattr(evaluation, "cases_from_manifest", lambda *args: iter([case for case, _ in cases]))
    monkeypatch.setattr(evaluation._Scorer, "__call__",
                        lambda self, case: evaluation._Scored(maps[case.name], None, calibration))
    monkeypatch.setattr(evaluation._Scorer, "protocol", lambda self: calibration.protocol())
    (tmp_path / "eval.csv").write_text("path\n")
    result = evaluation.evaluate(pipeline, tmp_path / "eval.csv", tmp_path / "report", progress=False)
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    overall = metrics["ldm"]["overall"]

    lesion_cases = [(c, s) for c, s in cases if c.label is not None]
    truth = np.concatenate([c.label[c.mask] for c, _ in lesion_cases])
    scores = np.concatenate([s[c.mask] for c, s in lesion_cases])
    assert overall["auroc_pooled"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    assert overall["auprc_pooled"] == pytest.approx(average_precision_score(truth, scores), abs=1e-12)
    per_volume_auroc = [roc_auc_score(c.label[c.mask], s[c.mask]) for c, s in lesion_cases]
    per_volume_auprc = [average_precision_score(c.label[c.mask], s[c.mask]) for c, s in lesion_cases]
    assert overall["auroc_per_volume_mean"] == pytest.approx(np.mean(per_volume_auroc), abs=1e-9)
    assert overall["auprc_per_volume_mean"] == pytest.approx(np.mean(per_volume_auprc), abs=1e-9)
    predicted = [(s > THRESHOLD) & c.mask for c, s in lesion_cases]
    tp = sum(int((p & c.label).sum()) for p, (c, _) in zip(predicted, lesion_cases, strict=True))
    flagged = sum(int(p.sum()) for p in predicted)
    assert overall["dice_pooled"] == pytest.approx(2 * tp / (flagged + int(truth.sum())))
    dices = [2 * (p & c.label).sum() / (p.sum() + c.label.sum()) for p, (c, _) in zip(predicted, lesion_cases,
                                                                                        strict=True)]
    assert overall["dice_mean"] == pytest.approx(np.mean(dices))
    healthy = [(c, s) for c, s in cases if c.label is None]
    fp = sum(int(((s > THRESHOLD) & c.mask).sum()) for c, s in healthy) / sum(int(c.mask.sum()) for c, _ in healthy)
    assert metrics["ldm"]["healthy"]["fp_rate_pooled"] == pytest.approx(fp)
    stroke = [(c, s) for c, s in lesion_cases if c.lesion_type == "stroke"]
    assert metrics["ldm"]["by_lesion_type"]["stroke"]["auprc_pooled"] == pytest.approx(average_precision_score(
        np.concatenate([c.label[c.mask] for c, _ in stroke]), np.concatenate([s[c.mask] for c, s in stroke])))
    # the unfiltered variant here has the same settings and threshold: the same numbers
    variant = metrics["ldm"]["postprocessing_variants"]["unfiltered"]
    assert variant["overall"]["dice_pooled"] == overall["dice_pooled"]
    assert "[95% CI]" in (tmp_path / "report" / "report.md").read_text(encoding="utf-8")


class _FakePipeline:
    """Enough of BrainFMPipeline for cases_from_manifest: 'preprocessing' loads the label values as they are."""

    def __init__(self, labels: dict[str, np.ndarray]) -> None:
        self.labels = labels

    def prepare(self, path, modality, mask, label=None, meta=None, t1_path=None):
        scan = SimpleNamespace(image=np.zeros(SHAPE, np.float32), mask=np.ones(SHAPE, np.uint8),
                               label=None if label is None else self.labels[label.name])
        return SimpleNamespace(scan=scan, anatomy=np.zeros((3, *SHAPE), np.float32), meta={"modality": "T1"},
                               voxel_volume_ml=0.027)


def _manifest(tmp_path, rows: list[dict[str, str]], columns: list[str]):
    for row in rows:
        for key in ("path", "label"):
            if row.get(key):
                (tmp_path / row[key]).write_bytes(b"")
    lines = [",".join(columns)] + [",".join(row.get(c, "") for c in columns) for row in rows]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "m.csv"


def test_manifest_split_decides_which_rows_are_scored(tmp_path) -> None:
    """With a split column only the requested split is scored (blank-split rows, which the shard writer may put
    in training, are not); a manifest in which no row names a split is one evaluation set."""
    rows = [{"path": "a.nii.gz", "split": "train"}, {"path": "b.nii.gz", "split": "val"},
            {"path": "c.nii.gz", "split": "test"}, {"path": "d.nii.gz", "split": ""}]
    manifest = _manifest(tmp_path, rows, ["path", "split"])
    failures: list = []
    names = [c.name for c in cases_from_manifest(_FakePipeline({}), manifest, failures, "test")]
    assert names == ["c"] and not failures
    assert [c.name for c in cases_from_manifest(_FakePipeline({}), manifest, failures, "val")] == ["b"]
    unsplit = _manifest(tmp_path, [{"path": "a.nii.gz"}, {"path": "d.nii.gz"}], ["path", "split"])
    assert [c.name for c in cases_from_manifest(_FakePipeline({}), unsplit, failures, "test")] == ["a", "d"]


def test_label_ignore_values_are_neither_lesion_nor_background(tmp_path) -> None:
    """WMH 2017's label 2 ("other pathology"): excluded from both classes, per the manifest's label_ignore."""
    raw = np.zeros(SHAPE, np.uint8)
    raw[2:4, 2:4, 2:4] = 1
    raw[6:8, 6:8, 6:8] = 2
    manifest = _manifest(tmp_path, [{"path": "s.nii.gz", "label": "s_label.nii.gz", "label_ignore": "2"}],
                         ["path", "label", "label_ignore"])
    (case,) = cases_from_manifest(_FakePipeline({"s_label.nii.gz": raw}), manifest, [], "test")
    assert case.label.sum() == 8 and case.ignore.sum() == 8 and not (case.label & case.ignore).any()
    assert ignore_values("2;3", "x") == (2, 3) and ignore_values("", "x") == ()
    lesion, ignore = split_label(raw, ())
    assert lesion.sum() == 16 and ignore is None
    with pytest.raises(BrainFMInputError, match="label_ignore must list integer"):
        ignore_values("other", "x")
