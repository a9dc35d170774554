"""The synthetic cohort: real ICBM152 anatomy, simulated subjects and simulated lesions."""

from __future__ import annotations

import csv
import hashlib

import nibabel as nib
import numpy as np
import pytest

from brainfm.cli import main
from brainfm.data import synthetic
from brainfm.data.synthetic import (
    HEALTHY_DATASET,
    LESION_DATASET,
    LESION_KINDS,
    MANIFEST_COLUMNS,
    SITES,
    load_templates,
    simulate_lesion,
    synthesize_cohort,
    synthesize_subject,
)
from brainfm.io import BrainFMInputError

VOXEL_ML = 8 / 1000.0  # one 2 mm voxel


def _read_manifest(path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """2 healthy + 4 lesion subjects (one per kind), half of each group rendered as CT."""
    out = tmp_path_factory.mktemp("cohort")
    manifest = synthesize_cohort(out, n_healthy=2, n_lesion=4, seed=5, ct_fraction=0.5)
    columns, rows = _read_manifest(manifest)
    return out, manifest, columns, rows


@pytest.fixture(scope="module")
def cli_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    code = main(["data", "synth", "--out", str(out), "--subjects", "4", "--seed", "1"])
    return code, out


@pytest.fixture(scope="module")
def template():
    return load_templates(2)[0]


def test_manifest_columns_counts_and_metadata(cohort):
    out, manifest, columns, rows = cohort
    assert manifest == out / "manifest.csv"
    assert tuple(columns) == MANIFEST_COLUMNS
    healthy = [r for r in rows if r["dataset"] == HEALTHY_DATASET]
    lesion = [r for r in rows if r["dataset"] == LESION_DATASET]
    assert len(healthy) == 2 and len(lesion) == 4 and len(rows) == 6
    assert {r["subject"] for r in healthy}.isdisjoint({r["subject"] for r in lesion})
    assert len({r["subject"] for r in rows}) == 6
    assert all(r["split"] == "" and r["label"] == "" and r["lesion_type"] == "healthy" for r in healthy)
    assert all(float(r["lesion_volume_ml"]) == 0.0 for r in healthy)
    assert all(r["split"] == "test" and r["label"] for r in lesion)
    assert sorted(r["lesion_type"] for r in lesion) == sorted(LESION_KINDS)
    assert [r["modality"] for r in healthy].count("CT") == 1
    assert [r["modality"] for r in lesion].count("CT") == 2
    assert {r["modality"] for r in rows} == {"T1", "CT"}
    for row in rows:
        assert 20 <= int(row["age"]) <= 85
        assert row["sex"] in {"F", "M"}
        assert row["site"] in SITES
        assert not row["path"].startswith("/")  # relative to the manifest's folder
        assert (out / row["path"]).is_file() and (out / row["mask"]).is_file()


def test_written_files_have_template_affine_and_labels_inside_mask(cohort, mni_t1_2mm):
    out, _, _, rows = cohort
    for row in rows:
        image = nib.load(out / row["path"])
        mask_img = nib.load(out / row["mask"])
        assert image.get_data_dtype() == np.float32
        np.testing.assert_allclose(image.affine, mni_t1_2mm.affine)
        np.testing.assert_allclose(mask_img.affine, mni_t1_2mm.affine)
        assert image.shape == mni_t1_2mm.shape
        mask = np.asarray(mask_img.dataobj) > 0
        assert 0.7 < mask.sum() / 235375 < 1.4  # the template brain has 235,375 voxels at 2 mm
        data = np.asarray(image.dataobj)
        assert np.isfinite(data).all()
        if row["label"]:
            label_img = nib.load(out / row["label"])
            np.testing.assert_allclose(label_img.affine, mni_t1_2mm.affine)
            label = np.asarray(label_img.dataobj) > 0
            assert label.any()
            assert not (label & ~mask).any()
            assert float(row["lesion_volume_ml"]) == pytest.approx(label.sum() * VOXEL_ML, abs=1e-3)


def test_ct_subjects_are_in_hounsfield_units(cohort):
    out, _, _, rows = cohort
    for row in (r for r in rows if r["modality"] == "CT"):
        image = np.asarray(nib.load(out / row["path"]).dataobj)
        mask = np.asarray(nib.load(out / row["mask"]).dataobj) > 0
        low, median, high = np.percentile(image[mask], [1, 50, 99])
        assert 0 <= low and high <= 80 and 20 <= median <= 45
        assert image.max() > 600  # a skull shell, so an HU window actually matters
        assert np.median(image[0:3, 0:3, -3:]) < -900  # air in the field-of-view corner
    for row in (r for r in rows if r["modality"] == "T1"):
        image = np.asarray(nib.load(out / row["path"]).dataobj)
        assert image.min() >= 0  # Rician magnitude, arbitrary scanner units
        assert np.percentile(image[np.asarray(nib.load(out / row["mask"]).dataobj) > 0], 50) > 100


def _ct_from_priors(anatomy) -> np.ndarray:
    """A plain CT-like volume from the template priors, to test the lesion painter on HU input."""
    csf = np.clip(1 - anatomy.gm - anatomy.wm, 0, 1) * anatomy.mask
    return (10 * csf + 40 * anatomy.gm + 28 * anatomy.wm - 1000 * (1 - anatomy.mask)).astype(np.float32)


@pytest.mark.parametrize("modality", ["T1", "CT"])
@pytest.mark.parametrize("kind", LESION_KINDS)
def test_simulate_lesion_changes_only_and_clearly_the_label(template, kind, modality):
    image = template.t1 if modality == "T1" else _ct_from_priors(template)
    mask = template.mask > 0.5
    span = np.median(image[mask & (template.wm > 0.9)]) - np.median(image[mask & (template.gm + template.wm < 0.3)])
    lesioned, label = simulate_lesion(image, template.mask, template.wm, template.gm, kind,
                                      np.random.default_rng(11), modality)
    inside = label.astype(bool)
    assert label.dtype == np.uint8 and inside.any()
    assert not (inside & ~mask).any()
    np.testing.assert_array_equal(lesioned[~inside], image[~inside])
    difference = lesioned[inside] - image[inside]
    assert np.abs(difference).min() >= 0.1 * span - 1e-4  # every labelled voxel was actually altered
    assert np.abs(difference).mean() > 0.2 * span
    volume_ml = inside.sum() * VOXEL_ML
    xs = np.argwhere(inside)[:, 0]
    if kind == "tumour":  # dark necrosis and oedema plus a bright enhancing rim
        assert (difference < -0.1 * span).sum() > 0 and (difference > 0.1 * span).sum() > 0
        assert 1.0 < volume_ml < 250.0
    else:  # the others are hypointense in T1 and hypodense in CT
        assert difference.mean() < -0.3 * span
    if kind == "stroke":
        midline = np.argwhere(mask)[:, 0].mean()
        assert (xs > midline).all() or (xs < midline).all()  # one hemisphere only
        assert 1.0 < volume_ml < 250.0
    if kind == "ms":
        assert template.wm[inside].mean() > 0.5 and 0.01 < volume_ml < 40.0
    if kind == "svd":
        assert template.wm[inside].mean() > 0.7 and 0.01 < volume_ml < 10.0


def test_simulate_lesion_rejects_unknown_kind_and_shape_mismatch(template):
    with pytest.raises(ValueError, match="lesion kind"):
        simulate_lesion(template.t1, template.mask, template.wm, template.gm, "cyst", np.random.default_rng(0))
    with pytest.raises(ValueError, match="one shape"):
        simulate_lesion(template.t1[:-1], template.mask, template.wm, template.gm, "ms", np.random.default_rng(0))


@pytest.mark.parametrize("modality", ["T1", "CT"])
def test_full_subject_with_and_without_lesion_differs_only_in_label(cohort, modality):
    """Re-render a written lesion subject without its lesion: only the labelled voxels may differ."""
    out, _, _, rows = cohort
    row = next(r for r in rows if r["dataset"] == LESION_DATASET and r["modality"] == modality)
    index = int(row["subject"].rsplit("-", 1)[1])  # subjects are seeded by (seed, group, index)
    sick = np.asarray(nib.load(out / row["path"]).dataobj)
    inside = np.asarray(nib.load(out / row["label"]).dataobj).astype(bool)
    plain = synthesize_subject(row["subject"], (5, 1, index), modality=modality)
    assert (str(plain.age), plain.sex, plain.site) == (row["age"], row["sex"], row["site"])
    np.testing.assert_array_equal(np.asarray(nib.load(out / row["mask"]).dataobj), plain.mask)
    np.testing.assert_array_equal(sick[~inside], plain.image[~inside])
    brain = plain.mask.astype(bool)
    spread = np.percentile(plain.image[brain], 90) - np.percentile(plain.image[brain], 10)
    assert np.abs(sick[inside] - plain.image[inside]).mean() > 0.15 * spread


def test_cli_synth_writes_manifest_and_is_byte_for_byte_reproducible(cli_cohort, tmp_path, template):
    code, out = cli_cohort
    assert code == 0
    _, rows = _read_manifest(out / "manifest.csv")
    assert [r["dataset"] for r in rows].count(HEALTHY_DATASET) == 4
    assert [r["dataset"] for r in rows].count(LESION_DATASET) == 2  # default: half of --subjects
    masks = [np.asarray(nib.load(out / r["mask"]).dataobj) for r in rows[:2]]
    assert not np.array_equal(*masks)
    dice = [2 * (m.astype(bool) & (template.mask > 0)).sum() / (m.sum() + template.mask.sum()) for m in masks]
    assert all(0.8 < d < 0.995 for d in dice)  # warped, but still the same anatomy

    # a separate run with the same seed reproduces the same subjects, byte for byte
    synthesize_cohort(tmp_path, n_healthy=2, n_lesion=0, seed=1)
    for row in rows[:2]:
        for column in ("path", "mask"):
            assert _sha(tmp_path / row[column]) == _sha(out / row[column])


def test_different_seeds_give_different_subjects(cohort, cli_cohort):
    """Subject 0 of seed 5 and of seed 1: a different warp (mask) and different intensities."""
    (out_a, _, _, rows_a), (_, out_b) = cohort, cli_cohort
    _, rows_b = _read_manifest(out_b / "manifest.csv")
    row_a = next(r for r in rows_a if r["modality"] == "T1" and r["dataset"] == HEALTHY_DATASET)
    row_b = next(r for r in rows_b if r["subject"] == row_a["subject"])
    mask_a, mask_b = (np.asarray(nib.load(o / r["mask"]).dataobj) for o, r in ((out_a, row_a), (out_b, row_b)))
    assert (mask_a != mask_b).sum() > 1000
    image_a, image_b = (np.asarray(nib.load(o / r["path"]).dataobj) for o, r in ((out_a, row_a), (out_b, row_b)))
    assert np.abs(image_a - image_b).mean() > 10


def test_cohort_rejects_bad_arguments(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BrainFMInputError, match="file"):
        synthesize_cohort(tmp_path / "file", n_healthy=1, n_lesion=0)
    with pytest.raises(ValueError, match="ct_fraction"):
        synthesize_cohort(tmp_path / "a", n_healthy=1, ct_fraction=1.5)
    with pytest.raises(ValueError, match="lesion_kinds"):
        synthesize_cohort(tmp_path / "b", n_healthy=2, lesion_kinds=("cyst",))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_colin27_is_optional(monkeypatch, tmp_path):
    monkeypatch.setattr(synthetic, "COLIN27_CANDIDATES", (tmp_path / "missing.nii.gz",))
    assert synthetic._load_colin27(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))) is None
