"""preprocess: geometry (orientation, spacing, crop/pad, round trip), intensities, DICOM and bad inputs."""

from __future__ import annotations

import dataclasses
import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainfm.config import PreprocessConfig
from brainfm.data.extraction import derive_brain_mask
from brainfm.data.preprocess import (
    normalise_mri,
    preprocess_scan,
    recipe_dict,
    recipe_from_dict,
    to_input_space,
    window_ct,
)
from brainfm.data.volume import MAX_DIM, MAX_VOXELS, load_volume
from brainfm.io import BrainFMInputError

# Geometry, intensity and input checks: the grid stays axis-aligned and N4 is off so values can be compared exactly
# (the front end -- extraction routes, N4, alignment -- is tested in test_frontend.py).
RECIPE = PreprocessConfig(bias_correction=False, align_to_template=False)


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))
    return path


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def t1(mni_t1_2mm) -> tuple[np.ndarray, np.ndarray]:
    return mni_t1_2mm.get_fdata().astype(np.float32), np.asarray(mni_t1_2mm.affine, dtype=np.float64)


@pytest.fixture(scope="module")
def brain_mask_2mm() -> np.ndarray:
    from nilearn.datasets import load_mni152_brain_mask

    return load_mni152_brain_mask(resolution=2).get_fdata() > 0.5


@pytest.fixture(scope="module")
def t1_file(tmp_path_factory, t1) -> Path:
    return _save(tmp_path_factory.mktemp("t1") / "t1.nii.gz", *t1)


@pytest.fixture(scope="module")
def t1_scan(t1_file):
    return preprocess_scan(t1_file, "T1", RECIPE)


def _lps_twin(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Same world content stored with voxel axes 0 and 1 reversed (RAS -> LPS storage)."""
    flipped = data[::-1, ::-1, :].copy()
    twin = affine.copy()
    for axis in (0, 1):
        twin[:3, 3] = twin[:3, 3] + affine[:3, axis] * (data.shape[axis] - 1)
        twin[:3, axis] = -affine[:3, axis]
    return flipped, twin


def test_lps_copy_preprocesses_to_the_same_arrays(tmp_path, t1, t1_scan):
    data, affine = _lps_twin(*t1)
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    scan = preprocess_scan(_save(tmp_path / "lps.nii.gz", data, affine), "T1", RECIPE)
    np.testing.assert_allclose(scan.image, t1_scan.image, atol=1e-6)
    np.testing.assert_array_equal(scan.mask, t1_scan.mask)
    np.testing.assert_allclose(scan.affine, t1_scan.affine)
    np.testing.assert_allclose(scan.source_affine, affine)  # the input's own affine is kept for writing back


def test_output_grid_is_recipe_grid_centred_on_brain(t1_scan, brain_mask_2mm):
    assert t1_scan.image.shape == RECIPE.shape and t1_scan.image.dtype == np.float32
    assert t1_scan.mask.shape == RECIPE.shape and t1_scan.mask.dtype == np.uint8
    np.testing.assert_allclose(np.diag(t1_scan.affine)[:3], RECIPE.spacing)
    assert t1_scan.source_shape == (99, 117, 95)
    centre = np.array(np.nonzero(t1_scan.mask)).mean(axis=1)
    np.testing.assert_allclose(centre, (np.array(RECIPE.shape) - 1) / 2, atol=1.5)
    # Otsu-derived mask of the (skull-stripped) template matches its official brain mask.
    back = to_input_space(t1_scan.mask, t1_scan, order=0)
    assert _dice(back, brain_mask_2mm) > 0.95


def test_anisotropic_input_lands_on_recipe_spacing_and_shape(tmp_path, t1_scan):
    from nilearn.datasets import load_mni152_template

    one_mm = load_mni152_template(resolution=1)
    data = one_mm.get_fdata().astype(np.float32)[:, :, ::3]
    affine = np.asarray(one_mm.affine, dtype=np.float64).copy()
    affine[:3, 2] *= 3
    scan = preprocess_scan(_save(tmp_path / "aniso.nii.gz", data, affine), "T1", RECIPE)
    assert scan.image.shape == RECIPE.shape
    np.testing.assert_allclose(np.linalg.norm(scan.affine[:3, :3], axis=0), RECIPE.spacing)
    np.testing.assert_allclose(scan.affine[:3, :3], np.diag(RECIPE.spacing))
    assert scan.source_shape == data.shape
    # Same brain as the isotropic 2 mm template: volumes agree within 5 %.
    assert abs(int(scan.mask.sum()) - int(t1_scan.mask.sum())) / t1_scan.mask.sum() < 0.05


def test_mri_normalisation_percentiles_and_zero_outside(t1_scan):
    image, mask = t1_scan.image, t1_scan.mask > 0
    assert image.min() == 0.0 and image.max() == 1.0
    assert np.all(image[~mask] == 0)
    inside = image[mask]
    lo, hi = np.percentile(inside, RECIPE.mri_percentiles)
    assert lo == pytest.approx(0.0, abs=1e-6) and hi == pytest.approx(1.0, abs=1e-6)
    # Only the tails beyond the percentiles are clipped.
    assert 0.001 <= np.mean(inside == 0.0) <= 0.02 and 0.001 <= np.mean(inside == 1.0) <= 0.02


def test_normalise_mri_maps_percentiles_inside_mask_only():
    image = np.zeros((10, 10, 10), np.float32)
    image[2:8, 2:8, 2:8] = np.linspace(100, 200, 216).reshape(6, 6, 6)
    image[0, 0, 0] = 10_000  # outside the mask: must not influence the scaling
    mask = np.zeros_like(image, np.uint8)
    mask[2:8, 2:8, 2:8] = 1
    out = normalise_mri(image, mask, (0.0, 100.0))
    assert out[2, 2, 2] == 0.0 and out[7, 7, 7] == 1.0 and out[0, 0, 0] == 0.0
    np.testing.assert_allclose(out[mask > 0], np.linspace(0, 1, 216), atol=1e-6)


def test_ct_window_values():
    hu = np.array([-1000.0, 0.0, 40.0, 80.0, 1000.0], dtype=np.float32).reshape(5, 1, 1)
    out = window_ct(hu, np.ones_like(hu), (0.0, 80.0))
    np.testing.assert_allclose(out.ravel(), [0.0, 0.0, 0.5, 1.0, 1.0])
    assert window_ct(hu, np.zeros_like(hu), (0.0, 80.0)).max() == 0.0


def _ct_phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Head CT-like HU volume built from the template tissue maps: air, skull shell, brain tissue HU."""
    from scipy import ndimage

    from brainfm.data.registration import load_template

    template = load_template(2)
    brain = template.mask > 0
    hu = np.full(brain.shape, -1000.0, np.float32)
    head = ndimage.binary_dilation(brain, iterations=5)
    hu[head] = 45.0  # scalp / soft tissue
    hu[ndimage.binary_dilation(brain, iterations=3) & ~brain] = 900.0  # skull
    tissue = 8.0 * template.priors["csf"] + 40.0 * template.priors["gm"] + 28.0 * template.priors["wm"]
    hu[brain] = tissue[brain]
    return hu, template.affine, brain


def test_ct_end_to_end_window_and_derived_mask(tmp_path):
    hu, affine, brain = _ct_phantom()
    scan = preprocess_scan(_save(tmp_path / "ct.nii.gz", hu, affine), "CT", RECIPE)
    mask_back = to_input_space(scan.mask, scan, order=0) > 0
    assert _dice(mask_back, brain) > 0.95  # HU range + largest component finds the brain, not scalp or skull
    image_back = to_input_space(scan.image, scan, order=0)
    np.testing.assert_allclose(image_back[mask_back], np.clip(hu[mask_back] / 80.0, 0, 1), atol=1e-5)
    assert np.all(scan.image[scan.mask == 0] == 0)


def test_given_mask_and_label_are_resampled_nearest(tmp_path, t1, brain_mask_2mm):
    data, affine = t1
    label = np.zeros(data.shape, np.float32)
    label[40:46, 60:66, 40:44] = 1
    label[50:52, 50:52, 50:52] = 2  # a second class survives nearest-neighbour resampling
    scan = preprocess_scan(
        _save(tmp_path / "t1.nii.gz", data, affine),
        "T1",
        RECIPE,
        mask_path=_save(tmp_path / "mask.nii.gz", brain_mask_2mm * 0.9, affine),  # probabilistic: 0.9 >= 0.5
        label_path=_save(tmp_path / "label.nii.gz", label, affine),
    )
    assert scan.label is not None and scan.label.dtype == np.uint8 and scan.label.shape == RECIPE.shape
    assert int((scan.label == 1).sum()) == 6 * 6 * 4 and int((scan.label == 2).sum()) == 8
    np.testing.assert_array_equal(to_input_space(scan.label, scan, order=0), label.astype(np.uint8))
    np.testing.assert_array_equal(to_input_space(scan.mask, scan, order=0) > 0, brain_mask_2mm)


def _oblique(affine: np.ndarray, degrees: float) -> np.ndarray:
    theta = np.deg2rad(degrees)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    return rotation @ affine


@pytest.mark.parametrize("kind", ["anisotropic", "oblique"])
def test_to_input_space_round_trip(tmp_path, t1, brain_mask_2mm, kind):
    data, affine = t1
    brain = brain_mask_2mm
    if kind == "anisotropic":  # 2 x 2 x 4 mm input
        data, affine, brain = data[:, :, ::2].copy(), affine.copy(), brain[:, :, ::2]
        affine[:3, 2] *= 2
    else:  # rotated 12 degrees about z: the recipe grid is axis-aligned, the input is not
        affine = _oblique(affine, 12.0)
    scan = preprocess_scan(_save(tmp_path / f"{kind}.nii.gz", data, affine), "T1", RECIPE)
    back = to_input_space(scan.image, scan)
    assert back.shape == data.shape == scan.source_shape and back.dtype == np.float32
    mask_back = to_input_space(scan.mask, scan, order=0) > 0
    assert _dice(mask_back, brain) > 0.9
    reference = normalise_mri(data, mask_back, RECIPE.mri_percentiles)
    correlation = np.corrcoef(back[mask_back], reference[mask_back])[0, 1]
    assert correlation > 0.9


def test_to_input_space_rejects_wrong_shape(t1_scan):
    with pytest.raises(ValueError, match="recipe grid"):
        to_input_space(np.zeros((4, 4, 4), np.float32), t1_scan)


# ------------------------------------------------------------------------------------------------------------
# DICOM
# ------------------------------------------------------------------------------------------------------------


def test_dicom_single_slice_is_not_3d(tmp_path):
    from pydicom.data import get_testdata_file

    folder = tmp_path / "one_slice"
    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "slice0.dcm")
    with pytest.raises(BrainFMInputError, match="one_slice.*not 3D"):
        load_volume(folder)


def test_dicom_series_folder_loads_in_hounsfield_and_ras(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder = tmp_path / "series"
    folder.mkdir()
    origin = [float(v) for v in source.ImagePositionPatient]
    for index in range(4):  # written in reverse order: the reader must sort slices by position
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["brainfm-test", str(index)])
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + 5.0 * index]
        ds.save_as(folder / f"slice{3 - index}.dcm")
    data, affine = load_volume(folder)
    assert data.shape == (128, 128, 4) and data.dtype == np.float32
    hu = source.pixel_array.astype(np.float32) * float(source.RescaleSlope) + float(source.RescaleIntercept)
    for z in range(4):
        np.testing.assert_allclose(data[:, :, z], hu.T)  # DICOM rows are y: (x, y) after transpose
    pixel = float(source.PixelSpacing[0])
    np.testing.assert_allclose(np.diag(affine)[:3], [-pixel, -pixel, 5.0], atol=1e-4)  # LPS columns -> RAS
    np.testing.assert_allclose(affine[:3, 3], [-origin[0], -origin[1], origin[2]], atol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# Bad inputs: one clear error naming the file
# ------------------------------------------------------------------------------------------------------------


def _truncated(tmp_path: Path, t1) -> Path:
    good = _save(tmp_path / "good.nii.gz", *t1)
    raw = good.read_bytes()
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    return bad


def _garbage(tmp_path: Path, t1) -> Path:
    bad = tmp_path / "garbage.nii.gz"
    bad.write_bytes(gzip.compress(b"this is not a nifti header" * 3))
    return bad


def _four_d(tmp_path: Path, t1) -> Path:
    return _save(tmp_path / "fourd.nii.gz", np.random.default_rng(0).random((8, 8, 8, 3)), np.eye(4))


def _nan(tmp_path: Path, t1) -> Path:
    data = t1[0].copy()
    data[50, 50, 50] = np.nan
    data[51, 50, 50] = np.inf
    return _save(tmp_path / "nan.nii.gz", data, t1[1])


def _constant(tmp_path: Path, t1) -> Path:
    return _save(tmp_path / "constant.nii.gz", np.full((20, 20, 20), 7.0), np.eye(4))


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda tmp, t1: tmp / "missing.nii.gz", "file not found"),
        (_truncated, "unreadable NIfTI"),
        (_garbage, "unreadable NIfTI"),
        (_four_d, "4D data"),
        (_nan, "2 NaN/inf voxel"),
        (_constant, "constant volume"),
    ],
    ids=["missing", "truncated", "garbage", "4d", "nan", "constant"],
)
def test_bad_inputs_raise_one_line_error_naming_the_file(tmp_path, t1, make, problem):
    path = make(tmp_path, t1)
    with pytest.raises(BrainFMInputError) as info:
        preprocess_scan(path, "T1", RECIPE)
    message = str(info.value)
    assert message.startswith(str(path)) and problem in message and "\n" not in message
    assert info.value.path == str(path)


def test_bad_modality_and_empty_mask(tmp_path, t1, t1_file):
    with pytest.raises(BrainFMInputError, match=r"t1\.nii\.gz: unknown modality 'MRA'"):
        preprocess_scan(t1_file, "MRA", RECIPE)
    far = np.eye(4)
    far[:3, 3] = 5000.0  # a mask that does not overlap the scan
    mask_path = _save(tmp_path / "faraway_mask.nii.gz", np.ones((5, 5, 5)), far)
    with pytest.raises(BrainFMInputError, match="faraway_mask.nii.gz: empty brain mask"):
        preprocess_scan(t1_file, "T1", RECIPE, mask_path=mask_path)


def test_recipe_dict_is_json_and_round_trips():
    from brainfm.version import __version__

    recipe = PreprocessConfig(spacing=(3.0, 3.0, 3.0), tissue_priors=("gm", "wm", "csf"))
    payload = json.loads(json.dumps(recipe_dict(recipe)))
    assert payload["id"] == "brainfm.data.preprocess" and payload["brainfm_version"] == __version__
    assert payload["params"]["spacing"] == [3.0, 3.0, 3.0]
    assert recipe_from_dict(payload, "index.json") == recipe
    assert recipe_from_dict(payload["params"], "config.json") == recipe  # a model folder's bare copy
    with pytest.raises(BrainFMInputError, match=r"^index\.json: invalid preprocessing recipe .*colour"):
        recipe_from_dict({**payload, "params": {**payload["params"], "colour": 1}}, "index.json")
    with pytest.raises(BrainFMInputError, match="not a brainfm.data.preprocess recipe"):
        recipe_from_dict({**payload, "id": "other.recipe"}, "index.json")
    with pytest.raises(BrainFMInputError, match="must be a JSON object"):
        recipe_from_dict([1, 2], "recipe.json")


# ------------------------------------------------------------------------------------------------------------
# Headers claiming huge volumes: refused before any voxel is read or allocated
# ------------------------------------------------------------------------------------------------------------


def _huge_nifti(path: Path, shape: tuple[int, ...]) -> Path:
    """A header-only .nii.gz (no voxel data) that claims ``shape``: tiny on disk."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4, mtime=0))
    return path


@pytest.mark.parametrize(
    "shape",
    [(1024, 1024, 1024), (10000, 10000, 10000), (5000, 8, 8)],
    ids=["1024^3", "10000^3", "one-long-axis"],
)
def test_huge_nifti_header_is_refused_from_the_header_alone(tmp_path, shape):
    import time
    import tracemalloc

    path = _huge_nifti(tmp_path / "huge.nii.gz", shape)
    assert path.stat().st_size < 120
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(BrainFMInputError) as info:
            preprocess_scan(path, "T1", RECIPE)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20 and time.perf_counter() - started < 5.0  # no 1 GB allocation, no read attempt
    message = str(info.value)
    assert message.startswith(f"{path}: header claims {'x'.join(map(str, shape))} voxels, over the limit")
    assert str(MAX_DIM) in message and str(MAX_VOXELS) in message and "\n" not in message


def test_huge_metaimage_header_is_refused(tmp_path):
    header = tmp_path / "huge.mha"
    header.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 2048 2048 2048\nElementType = MET_UCHAR\n"
        "ElementDataFile = LOCAL\n"
    )
    with pytest.raises(BrainFMInputError, match=r"huge\.mha: header claims 2048x2048x2048 voxels"):
        load_volume(header)


def test_huge_dicom_series_header_is_refused(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder = tmp_path / "huge_series"
    folder.mkdir()
    for index in range(2):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["brainfm-huge", str(index)])
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * index]
        ds.Rows = ds.Columns = 8192  # the pixel data stays 128 x 128: only the header lies
        ds.save_as(folder / f"slice{index}.dcm")
    with pytest.raises(BrainFMInputError, match=r"huge_series: header claims 8192x8192x2 voxels"):
        load_volume(folder)


# ------------------------------------------------------------------------------------------------------------
# Lesion labels: on the image's own grid, and never vanishing into a "healthy" scan
# ------------------------------------------------------------------------------------------------------------


def _sphere_label(shape: tuple[int, ...], centre: tuple[int, int, int], radius: float) -> np.ndarray:
    distance = np.linalg.norm(np.indices(shape) - np.array(centre)[:, None, None, None], axis=0)
    return (distance < radius).astype(np.float32)


def test_label_on_another_grid_is_refused_with_the_reason(tmp_path, t1, t1_file):
    data, affine = t1
    label = _sphere_label(data.shape, (50, 60, 45), 4)
    cropped = _save(tmp_path / "cropped_label.nii.gz", label[:, :, :-1], affine)
    with pytest.raises(
        BrainFMInputError,
        match=r"cropped_label\.nii\.gz: lesion label grid 99x117x94 does not "
        r"match its image's 99x117x95",
    ):
        preprocess_scan(t1_file, "T1", RECIPE, label_path=cropped)
    moved_affine = affine.copy()
    moved_affine[:3, 3] += (2.0, 0.0, 0.0)  # one voxel to the right: the same shape, another place
    moved = _save(tmp_path / "moved_label.nii.gz", label, moved_affine)
    with pytest.raises(
        BrainFMInputError,
        match=r"moved_label\.nii\.gz: lesion label grid \(affine\) does not match"
        r" its image's: voxels differ by up to 1 voxel",
    ):
        preprocess_scan(t1_file, "T1", RECIPE, label_path=moved)
    rounding = affine.copy()
    rounding[:3, 3] += 1e-4  # float32 header rounding is not a different grid
    scan = preprocess_scan(t1_file, "T1", RECIPE, label_path=_save(tmp_path / "ok.nii.gz", label, rounding))
    assert int(scan.label.sum()) == int(label.sum())


def test_label_whose_lesion_falls_outside_the_model_grid_is_refused(tmp_path, t1, t1_file):
    data, affine = t1
    recipe = dataclasses.replace(RECIPE, shape=(80, 96, 80))  # crops ~10 voxels off each side of the 99x117x95 input
    lesion = _sphere_label(data.shape, (0, 0, 0), 2.5)  # an octant of a sphere in the input's corner
    corner = _save(tmp_path / "corner_label.nii.gz", lesion, affine)
    with pytest.raises(BrainFMInputError) as info:
        preprocess_scan(t1_file, "T1", recipe, label_path=corner)
    message = str(info.value)
    n = int(lesion.sum())
    assert n == 20 and message.startswith(
        f"{corner}: lesion label: all {n} lesion voxel(s) fall outside the model"
    )
    assert "never scored as a healthy control" in message and "\n" not in message
    # a lesion inside the grid, and an empty label (a labelled scan without lesion), are both kept
    inside = preprocess_scan(
        t1_file,
        "T1",
        recipe,
        label_path=_save(tmp_path / "inside.nii.gz", _sphere_label(data.shape, (50, 60, 45), 3), affine),
    )
    assert int(inside.label.sum()) == int(_sphere_label(data.shape, (50, 60, 45), 3).sum())
    empty = preprocess_scan(
        t1_file, "T1", recipe, label_path=_save(tmp_path / "empty.nii.gz", np.zeros(data.shape), affine)
    )
    assert empty.label is not None and not empty.label.any()


# ------------------------------------------------------------------------------------------------------------
# Library calls (SimpleITK Otsu, MONAI largest component) against the hand-written versions they replaced
# ------------------------------------------------------------------------------------------------------------


def _numpy_otsu(values: np.ndarray, bins: int = 256) -> float:
    """The hand-written Otsu brainfm used before (bin centre of maximal between-class variance)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    mean_low = np.cumsum(hist * centres) / np.maximum(weight_low, 1)
    mean_high = ((hist * centres).sum() - np.cumsum(hist * centres)) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def _scipy_largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def test_simpleitk_otsu_matches_the_numpy_otsu_on_template_scans(t1):
    from brainfm.data.extraction import otsu_threshold

    data = t1[0]
    noisy = data * (1 + 0.1 * np.linspace(-1, 1, data.shape[0])[:, None, None])
    noisy = (noisy + np.random.default_rng(0).normal(0, 0.005, data.shape)).astype(np.float32)
    for image in (data, noisy):
        reference = _numpy_otsu(image.ravel())
        # ITK widens the histogram's top edge by 1/100 bin: thresholds agree to 1e-4 of the intensity range
        assert abs(otsu_threshold(image) - reference) < 1e-4 * float(image.max() - image.min())
        assert abs(int((image > otsu_threshold(image)).sum()) - int((image > reference).sum())) <= 2
    # the derived brain mask of the template is voxel-for-voxel the one the numpy version gave
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(3, 1)
    before = ndimage.binary_fill_holes(
        _scipy_largest_component(
            ndimage.binary_opening(data > _numpy_otsu(data.ravel()), structure, iterations=1)
        )
    )
    np.testing.assert_array_equal(derive_brain_mask(data, "T1", RECIPE), before)


def test_monai_largest_component_matches_scipy_on_template_masks(brain_mask_2mm):
    from brainfm.data.extraction import largest_component

    rng = np.random.default_rng(0)
    islands = brain_mask_2mm | (rng.random(brain_mask_2mm.shape) < 0.01)  # the brain plus scattered specks
    bridged = islands.copy()
    bridged[10:14, 10:14, 10:14] = True  # a separate block
    for mask in (brain_mask_2mm, islands, bridged, np.zeros((8, 8, 8), bool)):
        np.testing.assert_array_equal(largest_component(mask), _scipy_largest_component(mask))
    hu, _, _ = _ct_phantom()
    in_range = (hu >= RECIPE.ct_brain_hu[0]) & (hu <= RECIPE.ct_brain_hu[1])
    np.testing.assert_array_equal(largest_component(in_range), _scipy_largest_component(in_range))
