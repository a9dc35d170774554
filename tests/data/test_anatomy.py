"""anatomy: registered tissue priors (recovering a known affine), scalars, and independence from lesion labels."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from brainfm.config import PreprocessConfig
from brainfm.data.anatomy import compute_anatomy
from brainfm.data.preprocess import preprocess_scan
from brainfm.data.registration import load_template

RECIPE = PreprocessConfig(tissue_priors=("gm", "wm", "csf"))
SHIFT_MM = (6.0, 0.0, 0.0)
ROTATION_DEG = 5.0


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))
    return path


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _known_motion() -> np.ndarray:
    """World-space 4x4: rotate 5 degrees about z through the brain centre, then shift 6 mm along x."""
    theta = np.deg2rad(ROTATION_DEG)
    centre = np.array([0.0, -18.0, 18.0])
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    to_centre, back = np.eye(4), np.eye(4)
    to_centre[:3, 3], back[:3, 3] = -centre, centre
    shift = np.eye(4)
    shift[:3, 3] = SHIFT_MM
    return shift @ back @ rotation @ to_centre


def _move(array: np.ndarray, affine: np.ndarray, motion: np.ndarray) -> np.ndarray:
    """Content moved by ``motion`` on the same voxel grid: output voxel v samples the input at motion^-1(world(v))."""
    pull = np.linalg.inv(affine) @ np.linalg.inv(motion) @ affine
    return ndimage.affine_transform(
        array, pull[:3, :3], offset=pull[:3, 3], order=1, mode="constant", cval=0.0
    )


def _on_grid(array: np.ndarray, array_affine: np.ndarray, grid_affine: np.ndarray, shape) -> np.ndarray:
    pull = np.linalg.inv(array_affine) @ grid_affine
    return ndimage.affine_transform(array, pull[:3, :3], offset=pull[:3, 3], output_shape=shape, order=1)


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """A template T1 moved by a known rigid motion, its own moved GM map, and the preprocessed scan + anatomy."""
    template = load_template(2)
    motion = _known_motion()
    folder = tmp_path_factory.mktemp("moved")
    t1_path = _save(folder / "moved_t1.nii.gz", _move(template.t1, template.affine, motion), template.affine)
    lesion = np.zeros(template.t1.shape, np.float32)
    lesion[55:65, 60:70, 45:55] = 1  # inside the brain
    label_path = _save(folder / "lesion.nii.gz", lesion, template.affine)
    scan = preprocess_scan(t1_path, "T1", RECIPE)
    anatomy = compute_anatomy(scan, RECIPE)
    moved_gm = _move(np.asarray(template.priors["gm"]), template.affine, motion)
    return {
        "scan": scan,
        "anatomy": anatomy,
        "motion": motion,
        "gm_truth": _on_grid(moved_gm, template.affine, scan.affine, scan.image.shape),
        "t1_path": t1_path,
        "label_path": label_path,
    }


def test_priors_shape_range_and_zero_outside_mask(moved):
    priors, mask = moved["anatomy"].priors, moved["scan"].mask > 0
    assert priors.shape == (3, *RECIPE.shape) and priors.dtype == np.float32
    assert priors.min() >= 0.0 and priors.max() <= 1.0
    assert np.all(priors[:, ~mask] == 0.0)
    assert priors[0][mask].mean() > 0.2 and priors[1][mask].mean() > 0.2  # real tissue, not an empty map
    # GM and WM priors are spatially distinct: the WM core is not labelled GM.
    assert _dice(priors[0] > 0.5, priors[1] > 0.5) < 0.05


def test_registration_recovers_known_motion(moved):
    gm = moved["anatomy"].priors[0] > 0.5
    truth = (moved["gm_truth"] > 0.5) & (moved["scan"].mask > 0)
    assert _dice(gm, truth) > 0.8
    # scan_to_template should undo the motion: compare where it sends brain points.
    expected = np.linalg.inv(moved["motion"])
    points = np.array(
        [[0, -18, 18, 1], [40, -18, 18, 1], [-40, -18, 18, 1], [0, 40, 18, 1], [0, -60, 50, 1]]
    ).T
    error_mm = np.linalg.norm((moved["anatomy"].scan_to_template @ points - expected @ points)[:3], axis=0)
    assert error_mm.max() < 2.0


def test_scalars_match_hand_computed_values(moved):
    scan, anatomy = moved["scan"], moved["anatomy"]
    mask = scan.mask > 0
    voxel_ml = float(np.prod(RECIPE.spacing)) / 1000.0
    assert anatomy.scalars["brain_volume_ml"] == pytest.approx(mask.sum() * voxel_ml, rel=1e-9)
    for index, name in enumerate(RECIPE.tissue_priors):
        expected = anatomy.priors[index].sum(dtype=np.float64) / mask.sum()
        assert anatomy.scalars[f"{name}_fraction"] == pytest.approx(expected, rel=1e-6)
    template_ml = load_template(2).mask.sum() * 8.0 / 1000.0  # ICBM152 brain at 2 mm voxels of 8 ul
    assert anatomy.scalars["brain_volume_ml"] == pytest.approx(template_ml, rel=0.05)
    fractions = sum(anatomy.scalars[f"{name}_fraction"] for name in RECIPE.tissue_priors)
    assert 0.85 < fractions <= 1.0 + 1e-6


def test_lesion_label_never_changes_anatomy(moved):
    with_label = preprocess_scan(moved["t1_path"], "T1", RECIPE, label_path=moved["label_path"])
    assert with_label.label is not None and with_label.label.sum() > 0
    anatomy = compute_anatomy(with_label, RECIPE)
    np.testing.assert_array_equal(anatomy.priors, moved["anatomy"].priors)  # also proves determinism
    assert anatomy.scalars == moved["anatomy"].scalars


def test_ct_scan_gets_priors_from_ct_like_template(tmp_path):
    template = load_template(2)
    brain = template.mask > 0
    hu = np.full(brain.shape, -1000.0, np.float32)
    hu[ndimage.binary_dilation(brain, iterations=3)] = 900.0  # skull shell
    tissue = 8.0 * template.priors["csf"] + 40.0 * template.priors["gm"] + 28.0 * template.priors["wm"]
    hu[brain] = tissue[brain]
    motion = _known_motion()
    moved_hu = _move(hu + 1000.0, template.affine, motion) - 1000.0  # air stays air outside the moved head
    recipe = PreprocessConfig()  # default priors: gm, wm
    scan = preprocess_scan(_save(tmp_path / "ct.nii.gz", moved_hu, template.affine), "CT", recipe)
    anatomy = compute_anatomy(scan, recipe)
    assert anatomy.priors.shape == (2, *recipe.shape)
    assert set(anatomy.scalars) == {"brain_volume_ml", "gm_fraction", "wm_fraction"}
    truth = (
        _on_grid(
            _move(np.asarray(template.priors["gm"]), template.affine, motion),
            template.affine,
            scan.affine,
            scan.image.shape,
        )
        > 0.5
    )
    assert _dice(anatomy.priors[0] > 0.5, truth & (scan.mask > 0)) > 0.8
