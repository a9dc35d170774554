"""The front end for scans straight from the scanner: modality checks, CT intracranial extraction on clinical
geometry (craniotomy, gantry tilt, 5 mm slices, streaks), DICOM, N4, alignment of tilted heads, skull-stripped
inputs, deepbet's pinned weights. Real heads with skull (OASIS, pydeface) are in test_extraction.py."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from brainfm.config import PreprocessConfig
from brainfm.data import extraction
from brainfm.data.extraction import ct_intracranial_mask
from brainfm.data.modality import resolve_modality
from brainfm.data.preprocess import WORK_MM, preprocess_scan, to_input_space
from brainfm.data.volume import load_volume, resample_to_grid, working_grid
from brainfm.io import BrainFMInputError

DEMO = PreprocessConfig(spacing=(3.0, 3.0, 3.0), shape=(64, 64, 48))  # the demo's model grid
FAST = dataclasses.replace(DEMO, bias_correction=False, align_to_template=False)


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))
    return path


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _rotation(pitch_deg: float, roll_deg: float, centre=(0.0, -18.0, 18.0)) -> np.ndarray:
    """World 4x4: ``pitch_deg`` about x then ``roll_deg`` about y, through ``centre`` (mm)."""
    a, b = np.deg2rad(pitch_deg), np.deg2rad(roll_deg)
    about_x = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    about_y = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    motion = np.eye(4)
    motion[:3, :3] = about_y @ about_x
    motion[:3, 3] = np.asarray(centre) - motion[:3, :3] @ np.asarray(centre)
    return motion


def _move(array: np.ndarray, affine: np.ndarray, motion: np.ndarray, cval: float = 0.0) -> np.ndarray:
    """Content moved by ``motion`` (world) on the same voxel grid."""
    pull = np.linalg.inv(affine) @ np.linalg.inv(motion) @ affine
    return ndimage.affine_transform(array, pull[:3, :3], offset=pull[:3, 3], order=1, cval=cval)


# ------------------------------------------------------------------------------------------------------------
# A head CT the cohort generator does not make: craniotomy, gantry tilt, 5 mm slices, metal streaks
# ------------------------------------------------------------------------------------------------------------


def _ct_head() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A head CT from the cohort generator (OASIS anatomy: real skull base, orbits, sinuses, neck; 2 mm, HU), with
    what the generator never makes: a 50 mm craniotomy high on the left (the bone flap replaced by 25 HU soft
    tissue). Returns (hu, affine, intracranial truth: everything inside the skull by the generator's labels)."""
    from brainfm.data.synthetic.cohort import synthesize_subject
    from brainfm.data.synthetic.contrast import TISSUE_INDEX

    subject = synthesize_subject("ct", 3, modalities=("CT",), anatomy="oasis", resolution=2)
    hu, affine, labels = subject.images["CT"].copy(), subject.affine, subject.labels
    truth = ~np.isin(labels, [TISSUE_INDEX[name] for name in ("background", "soft_tissue", "skull")])
    skull = labels == TISSUE_INDEX["skull"]
    voxel = np.diag(affine)[:3]
    skull_mm = np.argwhere(skull) * voxel + affine[:3, 3]
    direction = np.array([-0.6, 0.1, 0.8]) / np.linalg.norm([-0.6, 0.1, 0.8])
    target = (np.argwhere(truth).mean(axis=0) * voxel + affine[:3, 3]) + 75.0 * direction
    centre = skull_mm[np.argmin(np.linalg.norm(skull_mm - target, axis=1))]
    hole = np.zeros_like(skull)
    hole[tuple(np.argwhere(skull)[np.linalg.norm(skull_mm - centre, axis=1) < 25.0].T)] = True
    hu[hole] = 25.0
    return hu, affine, truth


def _acquire(hu: np.ndarray, affine: np.ndarray, tilt_deg: float, slice_mm: float,
             pixel_mm: tuple[float, float], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A clinical acquisition of ``hu``: axial slices ``slice_mm`` thick (slice profile blurred in), pixels of
    ``pixel_mm`` (x, y: anisotropic in-plane), gantry tilted by ``tilt_deg`` (a sheared affine), metal streaks
    around a clip in three slices, noise of 6 HU."""
    rng = np.random.default_rng(seed)
    blurred = ndimage.gaussian_filter1d(hu, slice_mm / 2.355, axis=2)
    tilt = np.deg2rad(tilt_deg)
    extent = np.array(hu.shape) * np.diag(affine)[:3]
    acq = np.eye(4)
    acq[:3, 0] = [pixel_mm[0], 0.0, 0.0]
    acq[:3, 1] = [0.0, pixel_mm[1] * np.cos(tilt), pixel_mm[1] * np.sin(tilt)]  # rows tilt with the gantry
    acq[:3, 2] = [0.0, 0.0, slice_mm]  # table feed
    shape = (int(extent[0] / pixel_mm[0]), int(extent[1] / pixel_mm[1]), int(extent[2] / slice_mm))
    acq[:3, 3] = affine[:3, 3] - [0.0, 0.0, shape[1] * pixel_mm[1] * np.sin(tilt) / 2]
    pull = np.linalg.inv(affine) @ acq
    data = ndimage.affine_transform(blurred, pull[:3, :3], offset=pull[:3, 3], output_shape=shape, order=1,
                                    cval=-1000.0)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    cx, cy = 0.55 * shape[0], 0.6 * shape[1]
    spokes = np.cos(7 * np.arctan2(y - cy, x - cx))
    distance_mm = np.hypot((x - cx) * pixel_mm[0], (y - cy) * pixel_mm[1])
    streaks = 400.0 * np.sign(spokes) * np.abs(spokes) ** 30 * np.exp(-distance_mm / 40)
    middle = shape[2] // 2
    data[:, :, middle - 1 : middle + 2] += streaks[:, :, None]
    data[int(cx) - 2 : int(cx) + 2, int(cy) - 2 : int(cy) + 2, middle] = 3000.0  # the clip
    data += rng.normal(0.0, 6.0, data.shape)
    return data.astype(np.float32), acq


@pytest.fixture(scope="module")
def ct_head() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _ct_head()


@pytest.fixture(scope="module")
def clinical_ct(tmp_path_factory, ct_head) -> dict:
    hu, affine, truth = ct_head
    data, acq = _acquire(hu, affine, tilt_deg=15.0, slice_mm=5.0, pixel_mm=(0.8, 0.6))
    folder = tmp_path_factory.mktemp("ct")
    return {"path": _save(folder / "ct_tilted_5mm.nii.gz", data, acq), "data": data, "affine": acq,
            "truth": truth, "truth_affine": affine}


def test_ct_intracranial_extraction_on_clinical_geometry(clinical_ct):
    data, acq = clinical_ct["data"], clinical_ct["affine"]
    assert np.linalg.norm(acq[:3, 2]) == 5.0 and abs(acq[2, 1]) > 0  # thick slices, sheared (tilted) affine
    grid, size = working_grid(acq, data.shape, (WORK_MM,) * 3)
    work = resample_to_grid(data, acq, grid, size, mode="bilinear", fill=float(data.min()))
    truth = resample_to_grid(clinical_ct["truth"].astype(np.float32), clinical_ct["truth_affine"], grid, size,
                             mode="bilinear") > 0.5
    mask = ct_intracranial_mask(work, grid, DEMO)
    dice = _dice(mask, truth)
    print(f"CT intracranial Dice (OASIS head, craniotomy, 15 deg tilt, 5 mm slices, streaks): {dice:.3f}")
    assert dice >= 0.90  # measured 0.935
    assert abs(int(mask.sum()) - int(truth.sum())) < 0.08 * truth.sum()
    # the intensity-only mask of brain_extraction off does worse (measured 0.896)
    assert _dice(extraction.derive_brain_mask(work, "CT", DEMO), truth) < dice - 0.02


def test_ct_end_to_end_on_the_input_grid(clinical_ct):
    scan = preprocess_scan(clinical_ct["path"], None, DEMO)  # no modality: CT is told by its HU
    assert scan.modality == "CT" and scan.provenance["modality"]["source"] == "inferred from intensities"
    assert scan.provenance["brain_extraction"] == "CT Hounsfield units (intracranial)"
    assert scan.provenance["bias_correction"] == "off"  # N4 is for MRI only
    truth = resample_to_grid(clinical_ct["truth"].astype(np.float32), clinical_ct["truth_affine"],
                             clinical_ct["affine"], list(clinical_ct["data"].shape), mode="bilinear") > 0.5
    back = to_input_space(scan.mask, scan, order=0)
    assert back.shape == clinical_ct["data"].shape
    assert _dice(back, truth) >= 0.85  # through the 3 mm model grid and back onto 0.8 x 0.6 x 5 mm, tilted
    assert 1600 < scan.brain_volume_ml < 2200
    assert scan.provenance["warnings"] == []  # 5 mm slices are within 2x the demo's 3 mm grid


def test_warnings_for_thick_slices_and_implausible_brain_volumes():
    from brainfm.data.preprocess import _warnings

    thick = _warnings(1400.0, np.array([0.8, 0.8, 5.0]), PreprocessConfig())  # a 2 mm model
    assert thick == ["slice thickness 5.0 mm exceeds 2x the model's 2 mm spacing: detail between slices is "
                     "interpolated, small lesions may be missed"]
    assert _warnings(1400.0, np.array([0.8, 0.8, 5.0]), DEMO) == []
    for volume in (650.0, 3003.0):
        (warning,) = _warnings(volume, np.ones(3), DEMO)
        assert warning.startswith(f"extracted brain volume {volume:.0f} ml is outside 800-2200 ml")


# ------------------------------------------------------------------------------------------------------------
# Modality: checked against the intensities, inferred when none is named; refusals are one line
# ------------------------------------------------------------------------------------------------------------


def test_ct_given_as_t1_is_refused_with_the_evidence(clinical_ct):
    with pytest.raises(BrainFMInputError) as info:
        preprocess_scan(clinical_ct["path"], "T1", DEMO)
    message = str(info.value)
    assert message.startswith(f"{clinical_ct['path']}: modality T1 given, but the intensities are CT Hounsfield")
    assert "near -1000 HU (air)" in message and "above 700 HU (bone)" in message and "\n" not in message


def test_mri_given_as_ct_is_refused_and_mri_contrast_needs_a_name(tmp_path, mni_t1_2mm):
    path = _save(tmp_path / "t1.nii.gz", mni_t1_2mm.get_fdata(), mni_t1_2mm.affine)
    with pytest.raises(BrainFMInputError, match=r"t1\.nii\.gz: modality CT given, but the intensities are not CT "
                                                r"Hounsfield units \(0\.0% of voxels near -1000 HU"):
        preprocess_scan(path, "CT", DEMO)
    data = mni_t1_2mm.get_fdata()
    with pytest.raises(BrainFMInputError, match="give the modality: the intensities look like MRI"):
        resolve_modality(path, data, None)
    assert resolve_modality(path, data, None, serves=("T1", "CT"))[0] == "T1"
    assert resolve_modality(path, data, "flair")[0] == "FLAIR"


# ------------------------------------------------------------------------------------------------------------
# DICOM series in LPS with thick slices
# ------------------------------------------------------------------------------------------------------------


def _write_dicom_series(folder: Path, hu: np.ndarray, affine: np.ndarray) -> None:
    """A CT series (int16 HU, LPS patient coordinates, one file per slice) written with SimpleITK."""
    import SimpleITK as sitk

    folder.mkdir()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.transpose(np.round(hu), (2, 1, 0)).astype(np.int16))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    series = "1.2.826.0.1.3680043.2.1125.1.20240917"
    for z in range(image.GetDepth()):
        piece = image[:, :, z]
        for tag, value in (("0008|0060", "CT"), ("0020|000e", series), ("0020|000d", series + ".0"),
                           ("0020|0013", str(z + 1)),
                           ("0020|0037", "\\".join(f"{v:.6f}" for v in (*direction[0::3], *direction[1::3]))),
                           ("0020|0032", "\\".join(f"{v:.4f}" for v in image.TransformIndexToPhysicalPoint(
                               (0, 0, z)))),
                           ("0008|0018", f"{series}.{z + 1}")):
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(piece)


def test_lps_dicom_series_with_5mm_slices_matches_its_nifti(tmp_path, ct_head):
    hu, affine, _ = ct_head
    axial = np.diag([0.9, 0.9, 5.0, 1.0])
    axial[:3, 3] = affine[:3, 3]
    extent = np.array(hu.shape) * np.diag(affine)[:3]
    shape = tuple(int(e / s) for e, s in zip(extent, (0.9, 0.9, 5.0), strict=True))
    pull = np.linalg.inv(affine) @ axial
    data = ndimage.affine_transform(ndimage.gaussian_filter1d(hu, 1.0, axis=2), pull[:3, :3],
                                    offset=pull[:3, 3], output_shape=shape, order=1, cval=-1000.0)
    data = np.round(data)
    _write_dicom_series(tmp_path / "series", data, axial)
    loaded, loaded_affine = load_volume(tmp_path / "series")
    np.testing.assert_allclose(loaded_affine, axial, atol=1e-3)  # LPS in the files, RAS in brainfm
    np.testing.assert_array_equal(loaded, data)
    from_dicom = preprocess_scan(tmp_path / "series", "CT", FAST)
    from_nifti = preprocess_scan(_save(tmp_path / "same.nii.gz", data, axial), "CT", FAST)
    np.testing.assert_array_equal(from_dicom.mask, from_nifti.mask)
    np.testing.assert_allclose(from_dicom.image, from_nifti.image, atol=1e-3)  # positions stored to 0.1 um


# ------------------------------------------------------------------------------------------------------------
# MRI: skull-stripped inputs, N4, alignment of tilted heads
# ------------------------------------------------------------------------------------------------------------


def test_skull_stripped_input_is_recognised_and_left_as_it_is(tmp_path, mni_t1_2mm):
    path = _save(tmp_path / "brain.nii.gz", mni_t1_2mm.get_fdata(), mni_t1_2mm.affine)
    scan = preprocess_scan(path, "T1", FAST)
    assert scan.provenance["brain_extraction"].startswith("none: input already skull-stripped")
    assert 1700 < scan.brain_volume_ml < 2000  # ICBM152's brain with its CSF
    assert scan.provenance["warnings"] == []


def test_n4_removes_a_known_bias_field(tmp_path, mni_t1_2mm):
    data, affine = mni_t1_2mm.get_fdata().astype(np.float32), mni_t1_2mm.affine
    ramp = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in data.shape], indexing="ij"))
    biased = data * np.exp(0.25 * ramp[0] + 0.2 * ramp[1] * ramp[2] - 0.15 * ramp[2] ** 2)  # +-30 % shading
    clean = preprocess_scan(_save(tmp_path / "clean.nii.gz", data, affine), "T1", FAST)
    corrected = preprocess_scan(_save(tmp_path / "biased.nii.gz", biased, affine), "T1",
                                dataclasses.replace(FAST, bias_correction=True))
    uncorrected = preprocess_scan(tmp_path / "biased.nii.gz", "T1", FAST)
    assert corrected.provenance["bias_correction"] == "N4 (SimpleITK)"
    assert uncorrected.provenance["bias_correction"] == "off"
    inside = (clean.mask > 0) & (corrected.mask > 0) & (uncorrected.mask > 0)
    error_corrected = float(np.abs(corrected.image - clean.image)[inside].mean())
    error_uncorrected = float(np.abs(uncorrected.image - clean.image)[inside].mean())
    assert error_corrected < 0.5 * error_uncorrected


def test_tilted_head_gives_the_upright_model_input(tmp_path, mni_t1_2mm):
    """A head pitched 20 and rolled 15 degrees is registered to the template and the model grid turns with it:
    the model sees the same input as for the upright head (without alignment it would not)."""
    data, affine = mni_t1_2mm.get_fdata().astype(np.float32), mni_t1_2mm.affine
    upright = preprocess_scan(_save(tmp_path / "upright.nii.gz", data, affine), "T1", DEMO)
    tilted_path = _save(tmp_path / "tilted.nii.gz", _move(data, affine, _rotation(20.0, 15.0)), affine)
    tilted = preprocess_scan(tilted_path, "T1", DEMO)
    assert upright.provenance["alignment_rotation_degrees"] < 2.0
    assert abs(tilted.provenance["alignment_rotation_degrees"] - 24.9) < 1.5  # 20 deg then 15 deg: 24.9 deg
    both = (upright.mask > 0) & (tilted.mask > 0)
    assert _dice(upright.mask, tilted.mask) > 0.97
    assert np.corrcoef(upright.image[both], tilted.image[both])[0, 1] > 0.97
    assert float(np.abs(upright.image - tilted.image)[both].mean()) < 0.04
    # outputs map back onto the tilted input through the rotated grid
    back = to_input_space(tilted.mask, tilted, order=0)
    truth = _move((data > 0.05).astype(np.float32), affine, _rotation(20.0, 15.0)) > 0.5
    assert _dice(back, ndimage.binary_fill_holes(truth)) > 0.9


# ------------------------------------------------------------------------------------------------------------
# deepbet: pinned version and weights, no GUI
# ------------------------------------------------------------------------------------------------------------


def test_deepbet_weights_are_checked_and_its_gui_is_never_imported(monkeypatch):
    extraction._deepbet.cache_clear()
    try:
        bet = extraction._deepbet()
        assert type(bet).__name__ == "BrainExtraction" and "customtkinter" not in sys.modules
        extraction._deepbet.cache_clear()
        tampered = dict(extraction.DEEPBET_WEIGHTS, **{"data/models/model.pt": "0" * 64})
        monkeypatch.setattr(extraction, "DEEPBET_WEIGHTS", tampered)
        with pytest.raises(BrainFMInputError, match=r"model\.pt: deepbet weights sha256 de8ee7c69654\.\.\. differ"):
            extraction._deepbet()
        monkeypatch.setattr(extraction, "DEEPBET_VERSION", "0.9")
        with pytest.raises(BrainFMInputError, match="deepbet 1.0.2 is installed but 0.9 is pinned"):
            extraction._deepbet()
    finally:
        extraction._deepbet.cache_clear()
