"""Using a trained head: `brainfm detect --head` writes its probability map and mask beside the z-map on the
input's grid; `brainfm evaluate --head` scores it at its own healthy-calibrated threshold."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from brainfm.cli import main
from brainfm.finetune.evaluate import HeadPredictor
from brainfm.finetune.run import train_head
from brainfm.io import save_nifti

AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])


@pytest.fixture(scope="module")
def head_dir(feature_set, model_dir, finetune_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("head")
    healthy = [r for r in feature_set.records if not r.has_lesion]
    lesions = [r for r in feature_set.records if r.has_lesion]
    config = finetune_config(out, optim={"max_steps": 2})
    train_head(config, out / "run", feature_set, lesions[:2], healthy[2:], healthy[:2])
    return out / "run"


@pytest.fixture(scope="module")
def nifti_cohort(cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("nifti")
    rows = ["path,mask,label,lesion_type,modality"]
    for scan in (next(s for s in cohort if s.lesion_type == "tumour"), cohort[-1], cohort[0]):
        save_nifti(scan.image, AFFINE, root / f"{scan.name}.nii.gz", dtype=np.float32)
        save_nifti(scan.mask.astype(np.uint8), AFFINE, root / f"{scan.name}_mask.nii.gz", dtype=np.uint8)
        label = ""
        if scan.lesion_type != "healthy":
            save_nifti(scan.label, AFFINE, root / f"{scan.name}_label.nii.gz", dtype=np.uint8)
            label = f"{scan.name}_label.nii.gz"
        rows.append(f"{scan.name}.nii.gz,{scan.name}_mask.nii.gz,{label},{scan.lesion_type},T1")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def test_detect_with_head_writes_probability_and_mask_beside_the_zmap(head_dir, model_dir, nifti_cohort, tmp_path):
    scan = nifti_cohort / "tumour-0.nii.gz"
    code = main(["detect", "--model", str(model_dir), "--input", str(scan), "--mask",
                 str(nifti_cohort / "tumour-0_mask.nii.gz"), "--modality", "T1", "--out", str(tmp_path),
                 "--head", str(head_dir)])
    assert code == 0
    zmap = nib.load(tmp_path / "tumour-0_zmap.nii.gz")
    probability = nib.load(tmp_path / "tumour-0_head_prob.nii.gz")
    mask = nib.load(tmp_path / "tumour-0_head_mask.nii.gz")
    assert probability.shape == mask.shape == zmap.shape == nib.load(scan).shape
    np.testing.assert_allclose(probability.affine, zmap.affine)
    values, binary = probability.get_fdata(), np.asarray(mask.dataobj)
    assert 0.0 <= values.min() and values.max() <= 1.0 and values.max() > 0
    assert set(np.unique(binary)) <= {0, 1} and mask.get_data_dtype() == np.uint8
    report = json.loads((tmp_path / "tumour-0.json").read_text())
    threshold = json.loads((head_dir / "head_config.json").read_text())["threshold"]
    assert report["head"]["threshold"] == threshold
    assert report["head"]["flagged_voxels_model_grid"] is not None
    assert "tumour-0_head_prob.nii.gz" in report["outputs"] and "tumour-0_head_mask.nii.gz" in report["outputs"]


def test_evaluate_with_head_scores_it_at_its_threshold(head_dir, model_dir, nifti_cohort, tmp_path):
    code = main(["evaluate", "--model", str(model_dir), "--manifest", str(nifti_cohort / "manifest.csv"),
                 "--out", str(tmp_path), "--head", str(head_dir)])
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"ldm", "head"}
    head = metrics["head"]
    assert head["calibrated_threshold"] == HeadPredictor.load(head_dir).threshold
    assert head["overall"]["n_lesion_volumes"] == 2 and head["healthy"]["n_scans"] == 1
    assert 0.0 <= head["overall"]["auprc_pooled"] <= 1.0
    assert head["overall"]["auprc_pooled"] != metrics["ldm"]["overall"]["auprc_pooled"]  # its own map, not the z-map
    assert "head" in (tmp_path / "report.md").read_text()


def test_features_from_a_manifest_are_computed_once_and_cached(model_dir, nifti_cohort, tmp_path):
    from brainfm.anomaly.pipeline import load_model_dir
    from brainfm.config import FinetuneDataSection
    from brainfm.finetune.features import FeatureSet, load_or_build_features

    section = FinetuneDataSection(model=str(model_dir), manifest=str(nifti_cohort / "manifest.csv"))
    features = load_or_build_features(section, tmp_path / "features", progress=False)
    assert [(r.name, r.lesion_type) for r in features.records] == [
        ("tumour-0", "tumour"), ("stroke-2", "stroke"), ("healthy-0", "healthy")]
    assert features.records[0].has_lesion and features.records[2].label is None
    assert features.z_threshold == load_model_dir(model_dir).calibration.threshold
    for record in features.records:
        assert record.zmap.shape == record.pseudo_healthy.shape == record.image.shape
        assert not record.zmap[~record.mask].any()
    cached = FeatureSet.load(tmp_path / "features")
    for a, b in zip(features.records, cached.records, strict=True):
        assert a.name == b.name and np.array_equal(a.zmap, b.zmap) and np.array_equal(a.image, b.image)
    (tmp_path / "features" / "features.safetensors").write_bytes(b"truncated")
    from brainfm.io import BrainFMInputError

    with pytest.raises(BrainFMInputError, match="features"):
        FeatureSet.load(tmp_path / "features")
