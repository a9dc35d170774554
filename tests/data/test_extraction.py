"""Brain extraction on real heads with skull that install offline (pinned wheels, sha256-checked): deepbet on the
OASIS template head against its own brain mask and on pydeface's mean head, and the routes of the other MRI
contrasts on subjects the cohort generator renders from OASIS's labels. deepbet costs ~10 s per head on two busy
cores: each head is extracted once per session."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainfm.config import PreprocessConfig
from brainfm.data.anatomies import source_file
from brainfm.data.preprocess import preprocess_scan, to_input_space
from brainfm.io import BrainFMInputError

FINE = PreprocessConfig(spacing=(1.5, 1.5, 1.5), shape=(112, 136, 112))  # the working grid: Dice of the extraction
DEMO = PreprocessConfig(spacing=(3.0, 3.0, 3.0), shape=(64, 64, 48))
FAST_T2 = dataclasses.replace(DEMO, bias_correction=False, align_to_template=False)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))
    return path


@pytest.fixture(scope="session")
def oasis_scan():
    """The OASIS template T1 with skull (1 mm, stored LIA) preprocessed bare: deepbet, N4, alignment."""
    return preprocess_scan(source_file("oasis/t1"), "T1", FINE)


def test_deepbet_on_the_oasis_head_matches_its_reference_mask(oasis_scan):
    reference = np.asarray(nib.load(str(source_file("oasis/mask"))).dataobj) > 0.5
    back = to_input_space(oasis_scan.mask, oasis_scan, order=0)
    dice = _dice(back, reference)
    print(f"deepbet on the OASIS head: Dice {dice:.3f} against T_template0_BrainCerebellumMask")
    assert dice >= 0.90  # measured 0.95
    assert oasis_scan.provenance["brain_extraction"] == "deepbet 1.0.2"
    assert 1300 < oasis_scan.brain_volume_ml < 1600  # reference mask: 1,339 ml; deepbet keeps more brainstem
    assert oasis_scan.provenance["warnings"] == []
    assert oasis_scan.provenance["bias_correction"] == "N4 (SimpleITK)"


def test_deepbet_on_the_pydeface_head_gives_a_brain_sized_mask():
    scan = preprocess_scan(source_file("pydeface/t1"), "T1", DEMO)  # mean head with skull and face, no mask
    assert scan.provenance["brain_extraction"] == "deepbet 1.0.2"
    assert 1100 < scan.brain_volume_ml < 1800  # measured 1,390 ml
    assert scan.provenance["warnings"] == []
    # the head itself is far larger: the mask is the brain, not the head
    data = np.asarray(nib.load(str(source_file("pydeface/t1"))).dataobj)
    head_ml = float((data > 0.1 * np.percentile(data, 99)).sum()) * abs(np.linalg.det(
        nib.load(str(source_file("pydeface/t1"))).affine[:3, :3])) / 1000.0
    assert head_ml > 2.5 * scan.brain_volume_ml


@pytest.fixture(scope="module")
def oasis_subject(tmp_path_factory) -> dict:
    """A generator subject on OASIS's labels (with its skull) in T1 and T2, one grid, and its own brain mask."""
    from brainfm.data.synthetic.cohort import synthesize_subject

    subject = synthesize_subject("contrasts", 7, modalities=("T1", "T2"), anatomy="oasis", resolution=2)
    folder = tmp_path_factory.mktemp("contrasts")
    paths = {m: _save(folder / f"{m}.nii.gz", image, subject.affine) for m, image in subject.images.items()}
    return {"paths": paths, "mask": subject.mask > 0, "folder": folder}


def test_t2_without_a_t1_goes_through_the_registered_head_template(oasis_subject):
    scan = preprocess_scan(oasis_subject["paths"]["T2"], "T2", FINE)
    assert scan.provenance["brain_extraction"].startswith("OASIS head template registered to the scan")
    dice = _dice(to_input_space(scan.mask, scan, order=0), oasis_subject["mask"])
    print(f"T2 rendered from OASIS's labels, template route: Dice {dice:.3f}")
    assert dice >= 0.90  # measured 0.956 (deepbet alone: 0.790)


def test_t2_with_its_subjects_t1_in_the_manifest_uses_deepbet_on_the_t1(oasis_subject, tmp_path):
    from brainfm.data.manifest import read_manifest

    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "subject", "modality", "t1"])
        writer.writerow([oasis_subject["paths"]["T2"], "sub-1", "T2", oasis_subject["paths"]["T1"]])
    (row,), rejected = read_manifest(manifest)
    assert not rejected and row.t1 == oasis_subject["paths"]["T1"]
    scan = preprocess_scan(row.path, row.modality, dataclasses.replace(FINE, align_to_template=False),
                           t1_path=row.t1)
    assert scan.provenance["brain_extraction"] == f"deepbet 1.0.2 on the co-registered T1 {row.t1}"
    dice = _dice(to_input_space(scan.mask, scan, order=0), oasis_subject["mask"])
    print(f"T2 with its co-registered T1: Dice {dice:.3f}")
    assert dice >= 0.92  # measured 0.96: deepbet's T1 accuracy carried over
    # a T1 that does not overlap the scan is refused, naming it
    far = oasis_subject["folder"] / "far_t1.nii.gz"
    image = nib.load(str(oasis_subject["paths"]["T1"]))
    shifted = image.affine.copy()
    shifted[:3, 3] += 400.0
    _save(far, np.asarray(image.dataobj), shifted)
    with pytest.raises(BrainFMInputError, match=r"far_t1\.nii\.gz: the T1 does not overlap its scan"):
        preprocess_scan(row.path, "T2", FAST_T2, t1_path=far)

