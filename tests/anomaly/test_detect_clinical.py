"""``brainfm detect`` on scans as they come from a scanner: a head with skull, stored LPS, tilted and in 5 mm slices;
a tilted healthy head flags what the upright one flags; a CT given to an MRI model is refused with the evidence;
an implausible extracted brain volume is a warning in the JSON and on the figure. Tiny untrained networks: what is
tested is the front end and the geometry, not detection quality (the demo measures that)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from brainfm.anomaly import detect as detect_module
from brainfm.anomaly.calibrate import calibrate
from brainfm.anomaly.detect import detect_scan
from brainfm.config import PreprocessConfig, ReconstructionConfig
from brainfm.diffusion import make_scheduler
from brainfm.io import BrainFMInputError
from brainfm.models import BrainVAE, Conditioner, LatentUNet
from brainfm.pipeline import BrainFMPipeline

RECIPE = PreprocessConfig(spacing=(4.0, 4.0, 4.0), shape=(40, 48, 40))  # front end on (the default)
TILT = (20.0, 15.0)  # degrees of pitch, then roll


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))
    return path


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _rotation(pitch_deg: float, roll_deg: float, centre: np.ndarray) -> np.ndarray:
    a, b = np.deg2rad(pitch_deg), np.deg2rad(roll_deg)
    about_x = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    about_y = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    motion = np.eye(4)
    motion[:3, :3] = about_y @ about_x
    motion[:3, 3] = centre - motion[:3, :3] @ centre
    return motion


def _healthy_variant(t1: np.ndarray, brain: np.ndarray, seed: int) -> np.ndarray:
    """A 'subject': the ICBM152 brain with its own smooth bias field, gain and noise."""
    rng = np.random.default_rng(seed)
    bias = ndimage.gaussian_filter(rng.normal(size=t1.shape), 12)
    bias = 1.0 + 0.1 * bias / (np.abs(bias).max() + 1e-9)
    noisy = t1 * bias * rng.uniform(0.8, 1.2) + rng.normal(0, 0.02 * t1[brain].mean(), t1.shape)
    return (np.clip(noisy, 0, None) * brain).astype(np.float32)


@pytest.fixture(scope="module")
def healthy(tmp_path_factory, mni_t1_2mm) -> dict:
    """Skull-stripped healthy subjects (the model's calibration set), and one of them upright and tilted."""
    from nilearn.datasets import load_mni152_brain_mask

    root = tmp_path_factory.mktemp("healthy")
    t1, affine = np.asarray(mni_t1_2mm.get_fdata(), np.float32), mni_t1_2mm.affine
    brain = np.asarray(load_mni152_brain_mask(resolution=2).get_fdata()) > 0.5
    rows = []
    for i in range(3):
        path = _save(root / f"healthy{i}.nii.gz", _healthy_variant(t1, brain, seed=i), affine)
        rows.append({"path": path.name, "modality": "T1", "split": "val", "age": str(50 + i), "sex": "F"})
    with open(root / "healthy.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    subject = _healthy_variant(t1, brain, seed=7)
    motion = _rotation(*TILT, centre=np.array([0.0, -18.0, 18.0]))
    pull = np.linalg.inv(affine) @ np.linalg.inv(motion) @ affine
    tilted = ndimage.affine_transform(subject, pull[:3, :3], offset=pull[:3, 3], order=1)
    return {"root": root, "manifest": root / "healthy.csv", "brain": brain, "affine": affine,
            "upright": _save(root / "upright.nii.gz", subject, affine),
            "tilted": _save(root / "tilted.nii.gz", tilted, affine)}


@pytest.fixture(scope="module")
def model(healthy) -> BrainFMPipeline:
    """A tiny untrained 2D model calibrated on the healthy subjects through the front end."""
    torch.manual_seed(0)
    vae = BrainVAE(spatial_dims=2, channels=(8, 16), latent_channels=2, attention_levels=(False, False),
                   norm_num_groups=8)
    unet = LatentUNet(spatial_dims=2, latent_channels=2, anatomy_channels=1 + len(RECIPE.tissue_priors),
                      channels=(16, 16), attention_levels=(False, True), num_head_channels=8, cross_attention_dim=16,
                      norm_num_groups=8)
    conditioner = Conditioner(hidden_size=16, num_heads=2, cross_attention_dim=16)
    pipeline = BrainFMPipeline(vae, unet, conditioner, make_scheduler("ddpm", 100), recipe=RECIPE, modalities=["T1"],
                               reconstruction=ReconstructionConfig(t_star=(0.3,), num_inference_steps=4, seeds=(0,)))
    calibrate(pipeline, healthy["manifest"], split="val", include_vae_baseline=False, progress=False)
    return pipeline


@pytest.fixture
def titles(monkeypatch) -> list[str]:
    """The titles detect gives its figures (the figure is still written)."""
    seen: list[str] = []
    original = detect_module.write_detection_figure

    def record(path, image, analysis, brain, title):
        seen.append(title)
        return original(path, image, analysis, brain, title)

    monkeypatch.setattr(detect_module, "write_detection_figure", record)
    return seen


def test_a_tilted_healthy_head_flags_what_the_upright_one_flags(model, healthy, tmp_path):
    upright = detect_scan(model, healthy["upright"], "T1", out_dir=tmp_path / "upright")
    tilted = detect_scan(model, healthy["tilted"], "T1", out_dir=tmp_path / "tilted")
    report = json.loads((tmp_path / "tilted" / "tilted.json").read_text())
    assert abs(report["preprocessing"]["alignment_rotation_degrees"] - 24.9) < 2.0
    print(f"flagged fraction of the brain: upright {upright.anomalous_fraction:.4f}, "
          f"tilted 20/15 deg {tilted.anomalous_fraction:.4f}")
    assert abs(tilted.anomalous_fraction - upright.anomalous_fraction) < 0.01


@pytest.fixture(scope="module")
def clinical_head(tmp_path_factory) -> dict:
    """The OASIS head with skull, tilted 20 degrees in the scanner, acquired in 1 x 1 x 5 mm LPS slices, and its
    reference brain mask moved and sampled the same way."""
    from brainfm.data.anatomies import source_file

    head = nib.load(str(source_file("oasis/t1")))
    brain = nib.load(str(source_file("oasis/mask")))
    centre = (head.affine @ np.append((np.array(head.shape) - 1) / 2.0, 1.0))[:3]
    motion = _rotation(20.0, 0.0, centre)
    lps = np.diag([-1.0, -1.0, 5.0, 1.0])
    shape = (190, 230, 44)
    lps[:3, 3] = centre - lps[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    assert nib.aff2axcodes(lps) == ("L", "P", "S")

    def acquire(image: nib.Nifti1Image, order: int, blur: bool) -> np.ndarray:
        data = np.asarray(image.get_fdata(dtype=np.float32))
        pull = np.linalg.inv(image.affine) @ np.linalg.inv(motion) @ lps  # the head turned by ``motion``
        out = ndimage.affine_transform(data, pull[:3, :3], offset=pull[:3, 3], output_shape=shape, order=order)
        return ndimage.gaussian_filter1d(out, 0.5, axis=2) if blur else out

    folder = tmp_path_factory.mktemp("clinical")
    return {"path": _save(folder / "head_lps_tilted_5mm.nii.gz", acquire(head, 1, True), lps),
            "brain": acquire(brain, 1, False) > 0.5, "affine": lps, "shape": shape}


def test_detect_on_a_tilted_lps_head_with_skull_in_5mm_slices(model, clinical_head, tmp_path, titles):
    result = detect_scan(model, clinical_head["path"], None, out_dir=tmp_path)  # modality: the model's only one
    for key in ("pseudohealthy", "zmap", "mask", "uncertainty"):
        image = nib.load(tmp_path / f"head_lps_tilted_5mm_{key}.nii.gz")
        assert image.shape == clinical_head["shape"]
        np.testing.assert_allclose(image.affine, clinical_head["affine"], atol=1e-5)
    report = json.loads((tmp_path / "head_lps_tilted_5mm.json").read_text())
    steps = report["preprocessing"]
    assert steps["brain_extraction"] == "deepbet 1.0.2" and steps["bias_correction"] == "N4 (SimpleITK)"
    assert steps["modality"]["source"].startswith("inferred from intensities")
    assert steps["source_spacing_mm"] == [1.0, 1.0, 5.0]
    assert 12.0 < steps["alignment_rotation_degrees"] < 30.0  # 20 degrees of tilt on top of the template's own pose
    assert set(steps["seconds"]) == {"read", "extraction", "bias_correction", "alignment", "resample"}
    assert 1300 < report["extracted_brain_volume_ml"] < 1650 and report["warnings"] == []
    # the z-map covers the extracted brain, mapped back through the rotated model grid onto 1 x 1 x 5 mm slices
    covered = np.asarray(nib.load(tmp_path / "head_lps_tilted_5mm_zmap.nii.gz").dataobj) != 0
    dice = _dice(covered, clinical_head["brain"])
    print(f"brain covered by the maps vs OASIS's reference mask on the input grid: Dice {dice:.3f}")
    assert dice > 0.85
    assert titles == [f"head_lps_tilted_5mm: subject score {result.subject_score:.2f}, "
                      f"{report['anomalous_volume_ml']:.1f} ml flagged, "
                      f"brain {report['extracted_brain_volume_ml']:.0f} ml"]


def test_ct_given_to_an_mri_model_is_refused_with_the_evidence(model, tmp_path):
    from brainfm.data.synthetic.cohort import synthesize_subject

    subject = synthesize_subject("ct", 3, modalities=("CT",), anatomy="oasis", resolution=3)
    path = _save(tmp_path / "head_ct.nii.gz", subject.images["CT"], subject.affine)
    out = tmp_path / "out"
    with pytest.raises(BrainFMInputError) as inferred:
        detect_scan(model, path, None, out_dir=out)
    assert str(inferred.value).startswith(f"{path}: the intensities are CT Hounsfield units (")
    assert str(inferred.value).endswith("and this model serves T1 only")
    with pytest.raises(BrainFMInputError, match=r"head_ct\.nii\.gz: modality T1 given, but the intensities are CT "
                                                r"Hounsfield units \(\d+\.\d% of voxels near -1000 HU \(air\)"):
        detect_scan(model, path, "T1", out_dir=out)
    assert not out.exists() or not any(out.iterdir())


def test_an_implausible_brain_volume_is_a_warning_in_the_json_and_the_figure(model, healthy, tmp_path, titles):
    too_big = ndimage.binary_dilation(healthy["brain"], iterations=3)  # 6 mm of scalp taken for brain
    mask = _save(tmp_path / "big_mask.nii.gz", too_big, healthy["affine"])
    detect_scan(model, healthy["upright"], "T1", mask, out_dir=tmp_path / "out")
    report = json.loads((tmp_path / "out" / "upright.json").read_text())
    assert report["extracted_brain_volume_ml"] > 2200
    (warning,) = report["warnings"]
    assert warning.startswith(f"extracted brain volume {report['extracted_brain_volume_ml']:.0f} ml is outside "
                              "800-2200 ml: the brain extraction likely failed")
    assert titles[0].endswith(f"\nWARNING: extracted brain volume {report['extracted_brain_volume_ml']:.0f} ml is "
                              "outside 800-2200 ml")
