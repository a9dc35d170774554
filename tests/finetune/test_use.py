"""Using a trained head: `brainfm detect --head` writes its probability map and mask beside the z-map on the
input's grid; `brainfm evaluate --head` scores it at its own healthy-calibrated threshold. The head is trained on
two tumour scans and calibrated on two healthy ones; every scan it is used on here is held out from both."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from brainfm.cli import main
from brainfm.finetune.evaluate import load_head_predictor
from brainfm.pipeline import BrainFMPipeline

# calibration on healthy subjects the foundation model never saw (conftest: it saw healthy-0, -1 and -2)
TRAIN, CALIBRATION, UNLABELLED = ("tumour-0", "tumour-1"), ("healthy-3", "healthy-5"), ("healthy-0", "healthy-2")
HELD_OUT = ("tumour-2", "stroke-2", "healthy-4")


@pytest.fixture(scope="module")
def head_dir(finetune_config, feature_set, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("head")
    records = feature_set.by_name()
    config = finetune_config(out, optim={"max_steps": 2})
    from brainfm.finetune.run import train_head

    train_head(config, out / "run", feature_set, [records[n] for n in TRAIN], [records[n] for n in UNLABELLED],
               [records[n] for n in CALIBRATION])
    return out / "run"


@pytest.fixture(scope="module")
def nifti_cohort(cohort, nifti_manifest, tmp_path_factory):
    root = tmp_path_factory.mktemp("nifti")
    scans = {scan.name: scan for scan in cohort}
    rows = nifti_manifest([scans[name] for name in (*HELD_OUT, TRAIN[0])], root).read_text().splitlines()
    (root / "manifest.csv").write_text("\n".join(rows[:-1]) + "\n")
    (root / "with_training_scan.csv").write_text("\n".join(rows) + "\n")  # + a scan the head was trained on
    return root


def test_detect_with_head_writes_probability_and_mask_beside_the_zmap(head_dir, model_dir, nifti_cohort, tmp_path):
    scan, brain_mask = nifti_cohort / "tumour-2.nii.gz", nifti_cohort / "tumour-2_mask.nii.gz"
    out = tmp_path / "out"
    code = main(["detect", "--model", str(model_dir), "--input", str(scan), "--mask", str(brain_mask),
                 "--modality", "T1", "--out", str(out), "--head", str(head_dir)])
    assert code == 0
    zmap = nib.load(out / "tumour-2_zmap.nii.gz")
    probability = nib.load(out / "tumour-2_head_prob.nii.gz")
    mask = nib.load(out / "tumour-2_head_mask.nii.gz")
    assert probability.shape == mask.shape == zmap.shape == nib.load(scan).shape
    np.testing.assert_allclose(probability.affine, zmap.affine)
    values, binary = probability.get_fdata(), np.asarray(mask.dataobj)
    brain = np.asarray(nib.load(brain_mask).dataobj) > 0
    assert not values[~brain].any() and values[brain].max() > 0  # the head's map lives in the brain only
    assert set(np.unique(binary)) <= {0, 1} and mask.get_data_dtype() == np.uint8
    report = json.loads((out / "tumour-2.json").read_text())
    threshold = json.loads((head_dir / "head_config.json").read_text())["threshold"]
    assert report["head"]["threshold"] == threshold
    assert "tumour-2_head_prob.nii.gz" in report["outputs"] and "tumour-2_head_mask.nii.gz" in report["outputs"]
    # the pipeline API, given the same head, flags exactly the voxels detect reported
    pipeline = BrainFMPipeline.from_pretrained(model_dir).load_head(head_dir)
    direct = pipeline(str(scan), modality="T1", mask=str(brain_mask))
    assert report["head"]["flagged_voxels_model_grid"] == int(direct.head_mask.sum())


def test_evaluate_with_head_scores_it_at_its_threshold(head_dir, model_dir, nifti_cohort, tmp_path):
    code = main(["evaluate", "--model", str(model_dir), "--manifest", str(nifti_cohort / "with_training_scan.csv"),
                 "--out", str(tmp_path / "report"), "--head", str(head_dir)])
    assert code == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert set(metrics) == {"ldm", "head"}
    head = metrics["head"]
    assert head["calibrated_threshold"] == load_head_predictor(head_dir).threshold
    # the head is scored on the held-out scans only; the map on all of them
    assert head["overall"]["n_lesion_volumes"] == 2 and head["healthy"]["n_scans"] == 1
    assert head["scans_of_head_training_subjects"] == [TRAIN[0]]
    assert metrics["ldm"]["overall"]["n_lesion_volumes"] == 3
    assert head["overall"]["auprc_pooled"] != metrics["ldm"]["overall"]["auprc_pooled"]  # its own map, not the z-map
    assert "head" in (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    # its healthy false-positive rate over the region its threshold was calibrated on: the eroded brain, as the map's
    healthy = {name: next(r for r in metrics[name]["per_volume"] if r["scan_id"] == "healthy-4") for name in metrics}
    assert healthy["head"]["region_voxels"] == healthy["ldm"]["region_voxels"] < healthy["head"]["brain_voxels"]
    assert head["healthy"]["fp_rate_pooled"] == pytest.approx(
        healthy["head"]["region_pred_voxels"] / healthy["head"]["region_voxels"])


def test_features_from_a_manifest_are_computed_once_and_cached(model_dir, nifti_cohort, tmp_path):
    from brainfm.config import FinetuneDataSection
    from brainfm.finetune.features import FeatureSet, load_or_build_features

    section = FinetuneDataSection(model=str(model_dir), manifest=str(nifti_cohort / "manifest.csv"))
    features = load_or_build_features(section, tmp_path / "features", progress=False)
    assert [(r.name, r.lesion_type) for r in features.records] == [
        ("tumour-2", "tumour"), ("stroke-2", "stroke"), ("healthy-4", "healthy")]
    assert features.records[0].has_lesion and features.records[2].label is None
    assert features.z_threshold == BrainFMPipeline.from_pretrained(model_dir).calibration.threshold
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
