"""Model folders, calibration and ``detect`` on scans made from the real ICBM152 template, with tiny networks.

The networks are untrained: what is tested here is the plumbing that must hold for any model — recipe reuse,
geometry back to the input grid, calibrated false-positive control on healthy scans, refusal of bad inputs and
all-or-nothing outputs — not detection quality (the demo measures that).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from brainfm.anomaly.calibrate import calibrate
from brainfm.anomaly.detect import detect_scan
from brainfm.config import DataConfig, ReconstructionConfig, load_config
from brainfm.diffusion import make_scheduler
from brainfm.io import MANIFEST_NAME, BrainFMInputError
from brainfm.models import BrainVAE, Conditioner, LatentUNet
from brainfm.pipeline import BrainFMPipeline

RECIPE = load_config("configs/data/tiny.yaml", DataConfig).preprocess  # 4 mm, 40 x 48 x 40


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny convolutions on a shared 2-core machine: one intra-op thread avoids oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _healthy_variant(t1: np.ndarray, mask: np.ndarray, seed: int) -> np.ndarray:
    """A 'subject': the template with its own smooth bias field, gain and scanner noise."""
    rng = np.random.default_rng(seed)
    bias = ndimage.gaussian_filter(rng.normal(size=t1.shape), 12)
    bias = 1.0 + 0.1 * bias / (np.abs(bias).max() + 1e-9)
    noisy = t1 * bias * rng.uniform(0.8, 1.2) + rng.normal(0, 0.02 * t1[mask > 0].mean(), t1.shape)
    return (np.clip(noisy, 0, None) * (mask > 0)).astype(np.float32)


@pytest.fixture(scope="module")
def scans(tmp_path_factory, mni_t1_2mm) -> dict:
    """Healthy NIfTI scans (+ brain masks) on the template grid, an LPS anisotropic copy and a manifest."""
    from nilearn.datasets import load_mni152_brain_mask

    root = tmp_path_factory.mktemp("scans")
    t1 = np.asarray(mni_t1_2mm.get_fdata(), dtype=np.float32)
    mask = (np.asarray(load_mni152_brain_mask(resolution=2).get_fdata()) > 0.5).astype(np.uint8)
    affine = mni_t1_2mm.affine
    nib.save(nib.Nifti1Image(mask, affine), root / "mask.nii.gz")
    rows = []
    for i in range(5):
        path = root / f"healthy{i}.nii.gz"
        nib.save(nib.Nifti1Image(_healthy_variant(t1, mask, seed=i), affine), path)
        rows.append({"path": path.name, "mask": "mask.nii.gz", "split": "val" if i < 4 else "test",
                     "modality": "T1", "age": str(40 + i), "sex": "F"})
    with open(root / "healthy.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    # LPS orientation (x and y flipped) and anisotropic voxels (2 x 2 x 4 mm): same world, another voxel grid
    lps = _healthy_variant(t1, mask, seed=9)[::-1, ::-1, ::2]
    lps_affine = affine @ np.array([[-1, 0, 0, t1.shape[0] - 1], [0, -1, 0, t1.shape[1] - 1], [0, 0, 2, 0],
                                    [0, 0, 0, 1]], dtype=float)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(lps), lps_affine), root / "lps.nii.gz")
    nib.save(nib.Nifti1Image(np.ascontiguousarray(mask[::-1, ::-1, ::2]), lps_affine), root / "lps_mask.nii.gz")
    return {"root": root, "affine": affine, "shape": t1.shape, "lps_affine": lps_affine, "lps_shape": lps.shape,
            "t1": t1, "mask": mask}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, scans):
    """A tiny untrained 2D model folder, calibrated on 4 healthy scans of the 'val' split."""
    torch.manual_seed(0)
    vae = BrainVAE(spatial_dims=2, channels=(8, 16), latent_channels=2, attention_levels=(False, False),
                   norm_num_groups=8)
    unet = LatentUNet(spatial_dims=2, latent_channels=2, anatomy_channels=1 + len(RECIPE.tissue_priors),
                      channels=(16, 16), attention_levels=(False, True), num_head_channels=8, cross_attention_dim=16,
                      norm_num_groups=8)
    conditioner = Conditioner(hidden_size=16, num_heads=2, cross_attention_dim=16)
    folder = tmp_path_factory.mktemp("model") / "model"
    pipeline = BrainFMPipeline(vae, unet, conditioner, make_scheduler("ddpm", 100), recipe=RECIPE, modalities=["T1"],
                               reconstruction=ReconstructionConfig(t_star=(0.3,), num_inference_steps=10, seeds=(0,)))
    calibrate(pipeline, scans["root"] / "healthy.csv", split="val", progress=False)
    return pipeline.save_pretrained(folder)


@pytest.fixture(scope="module")
def model(model_dir):
    return BrainFMPipeline.from_pretrained(model_dir)


def _outputs(folder):
    return {p.name for p in folder.iterdir() if p.name != MANIFEST_NAME}


def test_model_folder_round_trip(model_dir, model):
    config = json.loads((model_dir / "model_index.json").read_text())
    assert config["modalities"] == ["T1"] and config["calibration_info"]["n_scans"] == 4
    assert model.recipe == RECIPE
    assert model.reconstruction.t_star == (0.3,)
    assert model.calibration.n_scans == 4 and np.isfinite(model.calibration.threshold)
    assert model.vae_calibration is not None and model.vae_calibration.threshold != model.calibration.threshold
    assert {p.name for p in model_dir.iterdir()} >= {"vae", "unet", "conditioner", "noise_scheduler", "calibration",
                                                      "model_index.json"}


def test_detect_healthy_scan_writes_input_grid_outputs_with_few_false_positives(model, scans, tmp_path):
    result = detect_scan(model, scans["root"] / "healthy4.nii.gz", "T1", scans["root"] / "mask.nii.gz", tmp_path)
    names = _outputs(tmp_path)
    assert names == {f"healthy4{s}" for s in ("_pseudohealthy.nii.gz", "_zmap.nii.gz", "_mask.nii.gz",
                                              "_uncertainty.nii.gz", ".json", ".png")}
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["files"] == sorted(names)  # brainfm's own files
    for suffix in ("pseudohealthy", "zmap", "mask", "uncertainty"):
        image = nib.load(tmp_path / f"healthy4_{suffix}.nii.gz")
        assert image.shape == scans["shape"]
        np.testing.assert_allclose(image.affine, scans["affine"], atol=1e-5)
    flagged = np.asarray(nib.load(tmp_path / "healthy4_mask.nii.gz").dataobj)
    assert flagged.dtype == np.uint8 and set(np.unique(flagged)) <= {0, 1}
    report = json.loads((tmp_path / "healthy4.json").read_text())
    assert 0.0 <= report["anomalous_fraction_of_brain"] <= 0.03
    assert report["anomalous_fraction_of_brain"] == pytest.approx(result.anomalous_fraction)
    assert report["threshold"] == pytest.approx(model.calibration.threshold)
    assert np.isfinite(report["subject_score"]) and report["versions"]["brainfm"]
    assert report["settings"]["reconstruction"]["t_star"] == [0.3]
    # the pseudo-healthy scan lives inside the brain, in the model's [0, 1] intensity range
    pseudo = np.asarray(nib.load(tmp_path / "healthy4_pseudohealthy.nii.gz").dataobj)
    far_outside = ~ndimage.binary_dilation(scans["mask"] > 0, iterations=3)
    assert pseudo.max() <= 1.0 + 1e-6 and np.count_nonzero(pseudo[far_outside]) == 0
    assert pseudo[scans["mask"] > 0].mean() > 0.05
    assert (tmp_path / "healthy4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_detect_lps_anisotropic_input_keeps_its_grid(model, scans, tmp_path):
    detect_scan(model, scans["root"] / "lps.nii.gz", "T1", scans["root"] / "lps_mask.nii.gz", tmp_path,
                vae_only=True)
    zmap = nib.load(tmp_path / "lps_zmap.nii.gz")
    assert zmap.shape == scans["lps_shape"]
    np.testing.assert_allclose(zmap.affine, scans["lps_affine"], atol=1e-5)
    assert nib.aff2axcodes(zmap.affine) == ("L", "P", "S")
    # the z-map is non-zero inside the brain and zero far outside it, i.e. it was mapped back, not flipped
    values = np.asarray(zmap.dataobj)
    lps_mask = np.asarray(nib.load(scans["root"] / "lps_mask.nii.gz").dataobj) > 0
    outside = ~ndimage.binary_dilation(lps_mask, iterations=3)
    assert np.count_nonzero(values[outside]) == 0
    assert np.count_nonzero(values[lps_mask]) > 0.5 * lps_mask.sum()


def _write(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) * 2 if affine is None else affine), path)
    return path


@pytest.mark.parametrize("case", ["4d", "nan", "no_brain", "unreadable", "missing", "modality", "coarse"])
def test_bad_inputs_fail_in_one_line_and_leave_nothing(model, scans, tmp_path, case):
    src = tmp_path / "inputs"
    src.mkdir()
    out = tmp_path / "out"
    t1 = scans["t1"]
    modality = "T1"
    if case == "4d":
        path = _write(src / "scan.nii.gz", np.stack([t1, t1], axis=-1), scans["affine"])
    elif case == "nan":
        data = t1.copy()
        data[40, 50, 40] = np.nan
        path = _write(src / "scan.nii.gz", data, scans["affine"])
    elif case == "no_brain":  # a small blob: far less tissue than any brain
        data = np.zeros((40, 40, 40), np.float32)
        data[18:22, 18:22, 18:22] = 100.0
        path = _write(src / "scan.nii.gz", data)
    elif case == "unreadable":
        path = src / "scan.nii.gz"
        path.write_bytes(b"this is not a NIfTI file")
    elif case == "missing":
        path = src / "scan.nii.gz"
    elif case == "modality":
        path = scans["root"] / "healthy4.nii.gz"
        modality = "CT"
    else:  # 2 x 2 x 16 mm slices: far coarser than the 4 mm the model was trained on
        path = _write(src / "scan.nii.gz", np.ascontiguousarray(t1[:, :, ::8]),
                      scans["affine"] @ np.diag([1.0, 1.0, 8.0, 1.0]))
    with pytest.raises(BrainFMInputError) as caught:
        detect_scan(model, path, modality, None, out)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    expected = {"4d": "4D", "nan": "NaN", "no_brain": "brain", "unreadable": "unreadable", "missing": "not found",
                "modality": "CT", "coarse": "too coarse"}[case]
    assert expected in message
    assert not out.exists() or not any(out.iterdir())


def test_detect_cli_continues_past_a_bad_scan(model_dir, scans, tmp_path):
    from brainfm.cli import main

    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b truncated")
    manifest = tmp_path / "batch.csv"
    manifest.write_text(f"path,mask,subject\n{broken},,broken\n{scans['root'] / 'healthy4.nii.gz'},"
                        f"{scans['root'] / 'mask.nii.gz'},good\n")
    out = tmp_path / "out"
    code = main(["detect", "--model", str(model_dir), "--input", str(manifest), "--out", str(out), "--vae-only"])
    assert code == 1
    assert (out / "good_zmap.nii.gz").is_file() and (out / "good.json").is_file()
    assert not list(out.glob("broken*"))
    summary = json.loads((out / "detect_summary.json").read_text())
    assert [f["name"] for f in summary["failed"]] == ["broken"] and summary["succeeded"][0]["name"] == "good"


def test_calibrate_cli_writes_a_model_folder_calibrated_at_the_requested_fpr(model_dir, scans, tmp_path, capsys):
    from brainfm.cli import main

    before = BrainFMPipeline.from_pretrained(model_dir).calibration.threshold
    folder = tmp_path / "strict"
    code = main(["calibrate", "--model", str(model_dir), "--out", str(folder), "--data",
                 str(scans["root"] / "healthy.csv"), "--split", "val", "--target-fpr", "0.001"])
    assert code == 0
    after = BrainFMPipeline.from_pretrained(folder).calibration
    assert after.config.target_fpr == 0.001 and after.n_scans == 4
    assert after.threshold > before  # a stricter false-positive target needs a higher z threshold
    assert f"{after.threshold:.4f}" in capsys.readouterr().out
    assert BrainFMPipeline.from_pretrained(model_dir).calibration.threshold == before  # the source is untouched
    # recalibrating the folder brainfm wrote, in place, keeps a file the user put there
    (folder / "notes.md").write_text("mine")
    code = main(["calibrate", "--model", str(folder), "--out", str(folder), "--data",
                 str(scans["root"] / "healthy.csv"), "--split", "val", "--target-fpr", "0.001", "--t-star", "0.2"])
    assert code == 0 and (folder / "notes.md").read_text(encoding="utf-8") == "mine"
    recalibrated = BrainFMPipeline.from_pretrained(folder)
    assert recalibrated.reconstruction.t_star == (0.2,) and recalibrated.calibration.n_scans == 4
    # too few healthy scans in the asked split: one-line error, exit 2, the folder's calibration untouched
    code = main(["calibrate", "--model", str(folder), "--out", str(folder), "--data",
                 str(scans["root"] / "healthy.csv"), "--split", "test"])
    assert code == 2
    assert BrainFMPipeline.from_pretrained(folder).calibration.threshold == recalibrated.calibration.threshold


def test_calibrate_refuses_an_output_folder_it_did_not_write(model_dir, scans, tmp_path, capsys):
    """The probe's reproducer: `calibrate --out DIR` deleted everything already in DIR."""
    from brainfm.cli import main

    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    code = main(["calibrate", "--model", str(model_dir), "--out", str(folder), "--data",
                 str(scans["root"] / "healthy.csv"), "--split", "val"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not written by brainfm" in err
    assert [p.name for p in folder.iterdir()] == ["thesis.tex"]
    assert (folder / "thesis.tex").read_text() == "years of work"


def _no_inference(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("inference ran before the output was checked")

    monkeypatch.setattr(BrainFMPipeline, "prepare", refuse)


def test_detect_never_overwrites_the_users_mask(model_dir, scans, tmp_path, monkeypatch, capsys):
    """The probe's reproducer: `detect --input dl/scan.nii.gz --mask dl/scan_mask.nii.gz --out dl` replaced the
    user's brain mask with the anomaly mask. Now refused with one line, before any inference."""
    from brainfm.cli import main

    folder = tmp_path / "dl"
    folder.mkdir()
    scan, mask = folder / "scan.nii.gz", folder / "scan_mask.nii.gz"
    scan.write_bytes((scans["root"] / "healthy4.nii.gz").read_bytes())
    mask.write_bytes((scans["root"] / "mask.nii.gz").read_bytes())
    before = mask.read_bytes()
    _no_inference(monkeypatch)
    code = main(["detect", "--model", str(model_dir), "--input", str(scan), "--mask", str(mask), "--out", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "scan_mask.nii.gz: output would overwrite an input" in err
    assert mask.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["scan.nii.gz", "scan_mask.nii.gz"]


@pytest.mark.parametrize("case", ["out_is_a_file", "out_below_a_file", "output_name_taken"])
def test_detect_checks_its_output_before_inference(model_dir, scans, tmp_path, monkeypatch, capsys, case):
    from brainfm.cli import main

    out = tmp_path / "out"
    if case == "out_is_a_file":
        out.write_text("a file")
    elif case == "out_below_a_file":
        (tmp_path / "file").write_text("a file")
        out = tmp_path / "file" / "out"
    else:
        out.mkdir()
        (out / "healthy4.json").write_text("{}")  # the user's own file of that name
    _no_inference(monkeypatch)
    code = main(["detect", "--model", str(model_dir), "--input", str(scans["root"] / "healthy4.nii.gz"), "--out",
                 str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    expected = {"out_is_a_file": "exists and is not a folder", "out_below_a_file": "is a file, not a folder",
                "output_name_taken": "healthy4.json: exists and was not written by brainfm"}[case]
    assert expected in err


def test_detect_replaces_only_its_own_earlier_outputs(model, scans, tmp_path):
    mask = scans["root"] / "mask.nii.gz"
    detect_scan(model, scans["root"] / "healthy4.nii.gz", "T1", mask, tmp_path, vae_only=True)
    (tmp_path / "notes.md").write_text("mine")
    first = json.loads((tmp_path / "healthy4.json").read_text())
    detect_scan(model, scans["root"] / "healthy4.nii.gz", "T1", mask, tmp_path)
    assert first["method"] == "vae" and json.loads((tmp_path / "healthy4.json").read_text())["method"] == "ldm"
    assert (tmp_path / "notes.md").read_text(encoding="utf-8") == "mine"


def test_evaluate_reports_failed_scans_and_a_vanished_label_is_not_a_healthy_control(model_dir, scans, tmp_path,
                                                                                     capsys):
    """A label whose lesion lies outside the model's field of view used to turn its scan into a "healthy control";
    it is a failure now, listed, and `evaluate` exits non-zero."""
    from brainfm.cli import main

    root = scans["root"]
    lesion = np.zeros(scans["shape"], np.uint8)
    lesion[40:48, 50:58, 40:46] = 1  # inside the brain
    outside = np.zeros(scans["shape"], np.uint8)
    outside[0:3, 0:3, 0:3] = 1  # a corner of the 2 mm grid, cropped away by the model's field of view
    nib.save(nib.Nifti1Image(lesion, scans["affine"]), tmp_path / "lesion_label.nii.gz")
    nib.save(nib.Nifti1Image(outside, scans["affine"]), tmp_path / "outside_label.nii.gz")
    mask = root / "mask.nii.gz"
    rows = [f"{root / 'healthy4.nii.gz'},{mask},,,healthy",
            f"{root / 'healthy3.nii.gz'},{mask},{tmp_path / 'lesion_label.nii.gz'},tumour,lesion",
            f"{root / 'healthy2.nii.gz'},{mask},{tmp_path / 'outside_label.nii.gz'},tumour,cropped"]
    manifest = tmp_path / "eval.csv"
    manifest.write_text("path,mask,label,lesion_type,subject\n" + "\n".join(rows) + "\n")
    out = tmp_path / "report"
    code = main(["evaluate", "--model", str(model_dir), "--manifest", str(manifest), "--out", str(out), "--vae-only"])
    err = capsys.readouterr().err
    assert code == 1 and "outside_label.nii.gz" in err and "lesion voxel(s) fall outside the model grid" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["vae_baseline"]["healthy"]["n_scans"] == 1  # the cropped scan is not a healthy control
    assert metrics["vae_baseline"]["overall"]["n_lesion_volumes"] == 1
    failures = json.loads((out / "failures.json").read_text())
    assert [Path(f["path"]).name for f in failures] == ["healthy2.nii.gz"]


def test_manifest_rows_the_reader_rejects_are_failures_everywhere(model_dir, scans, tmp_path, capsys):
    """One manifest reader for every command: a row it rejects (here a scan file that does not exist) is printed
    and listed under ``failed`` by detect (exit 1), is a failure in evaluate's failures.json (exit 1), and stops
    calibrate (exit 2, one line) rather than calibrating on fewer scans than the manifest lists. A label file
    with no lesion voxel is a failure in evaluate, never a healthy control."""
    from brainfm.cli import main

    root = scans["root"]
    empty = np.zeros(scans["shape"], np.uint8)
    nib.save(nib.Nifti1Image(empty, scans["affine"]), tmp_path / "empty_label.nii.gz")
    manifest = tmp_path / "batch.csv"
    manifest.write_text("path,mask,label,subject,split\n"
                        f"{tmp_path / 'gone.nii.gz'},,,gone,val\n"
                        f"{root / 'healthy4.nii.gz'},{root / 'mask.nii.gz'},,good,val\n")
    out = tmp_path / "detect"
    code = main(["detect", "--model", str(model_dir), "--input", str(manifest), "--out", str(out), "--vae-only"])
    err = capsys.readouterr().err
    assert code == 1 and "gone.nii.gz: path file not found" in err
    summary = json.loads((out / "detect_summary.json").read_text())
    assert [(f["name"], Path(f["path"]).name) for f in summary["failed"]] == [("gone", "gone.nii.gz")]
    assert [s["name"] for s in summary["succeeded"]] == ["good"] and (out / "good_zmap.nii.gz").is_file()
    assert not list(out.glob("gone*"))

    code = main(["calibrate", "--model", str(model_dir), "--out", str(tmp_path / "cal"), "--data", str(manifest),
                 "--split", "val"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "gone.nii.gz: path file not found" in err
    assert not (tmp_path / "cal").exists()

    evaluation = tmp_path / "eval.csv"
    evaluation.write_text("path,mask,label,subject\n"
                          f"{tmp_path / 'gone.nii.gz'},,,gone\n"
                          f"{root / 'healthy3.nii.gz'},{root / 'mask.nii.gz'},{tmp_path / 'empty_label.nii.gz'},blank\n"
                          f"{root / 'healthy4.nii.gz'},{root / 'mask.nii.gz'},,good\n")
    code = main(["evaluate", "--model", str(model_dir), "--manifest", str(evaluation), "--out",
                 str(tmp_path / "report"), "--vae-only"])
    err = capsys.readouterr().err
    assert code == 1 and "holds no lesion voxel" in err
    failures = json.loads((tmp_path / "report" / "failures.json").read_text())
    assert [Path(f["path"]).name for f in failures] == ["gone.nii.gz", "healthy3.nii.gz"]
    assert "path file not found" in failures[0]["error"] and "empty_label.nii.gz" in failures[1]["error"]
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["vae_baseline"]["healthy"]["n_scans"] == 1


def test_calibrate_and_evaluate_with_baselines(model_dir, scans, tmp_path, capsys):
    """`calibrate --baselines` stores the intensity, atlas and prior-fit calibrations in the model folder (the
    atlas from the 'train' rows, the small-lesion setting chosen on the 'val' MS row); `evaluate --baselines`
    scores every method on the 'test' rows only, with intervals; without baselines in the model it refuses."""
    from brainfm.cli import main

    root = scans["root"]
    mask = root / "mask.nii.gz"
    dots = np.zeros(scans["shape"], np.uint8)
    dots[40:42, 50:52, 40:42] = 1
    dots[50:52, 60:62, 44:46] = 1
    blob = np.zeros(scans["shape"], np.uint8)
    blob[40:48, 50:58, 40:46] = 1
    nib.save(nib.Nifti1Image(dots, scans["affine"]), tmp_path / "dots.nii.gz")
    nib.save(nib.Nifti1Image(blob, scans["affine"]), tmp_path / "blob.nii.gz")
    rows = [("healthy0", "train", "", ""), ("healthy1", "train", "", ""), ("healthy2", "val", "", ""),
            ("healthy3", "val", "", ""), ("healthy1", "val", tmp_path / "dots.nii.gz", "ms"),
            ("healthy4", "test", "", ""), ("healthy3", "test", tmp_path / "blob.nii.gz", "tumour")]
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("path,mask,label,lesion_type,split,subject,modality\n" + "".join(
        f"{root / (name + '.nii.gz')},{mask},{label},{kind},{split},s{i},T1\n"
        for i, (name, split, label, kind) in enumerate(rows)))
    code = main(["evaluate", "--model", str(model_dir), "--manifest", str(manifest), "--out",
                 str(tmp_path / "refused"), "--baselines"])
    assert code == 2 and "calibrate --baselines" in capsys.readouterr().err
    calibrated = tmp_path / "calibrated"
    assert main(["calibrate", "--model", str(model_dir), "--out", str(calibrated), "--data", str(manifest),
                 "--split", "val", "--baselines"]) == 0
    info = json.loads((calibrated / "model_index.json").read_text())["calibration_info"]
    assert info["n_scans"] == 2 and info["baselines"]["n_atlas_scans"] == 2
    assert set(info["baselines"]["methods"]) == {"intensity_baseline", "atlas_baseline", "prior_fit_check"}
    loaded = BrainFMPipeline.from_pretrained(calibrated)
    assert loaded.baselines.entry("atlas_baseline", "T1").statistics.n_scans == 2
    assert loaded.calibration.small_lesion_selection["n_scans"] == 1
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(calibrated), "--manifest", str(manifest), "--out", str(out),
                 "--baselines"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"ldm", "vae_baseline", "intensity_baseline", "atlas_baseline", "prior_fit_check"}
    for result in metrics.values():
        assert result["overall"]["n_lesion_volumes"] == 1 and result["healthy"]["n_scans"] == 1  # test rows only
        assert set(result["postprocessing_variants"]) == {"unfiltered", "small_lesion"}
    assert metrics["ldm"]["overall"]["pseudo_healthy_ssim"] is not None
    assert metrics["intensity_baseline"]["overall"]["pseudo_healthy_mae"] is None  # it has no pseudo-healthy image
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "### atlas_baseline" in report and "Circularity check" in report


def test_a_second_evaluation_reads_back_the_reconstructions_only_when_nothing_they_depend_on_changed(
        model_dir, scans, tmp_path):
    """`evaluate(reuse_dir=...)`: a recalibrated model (same networks and settings) reads the LDM's stored
    reconstructions back and scores exactly what recomputing gives; changed weights or a changed scan under the
    same name are recomputed, never reused."""
    from brainfm.anomaly.evaluate import evaluate

    root = scans["root"]
    blob = np.zeros(scans["shape"], np.uint8)
    blob[40:48, 50:58, 40:46] = 1
    nib.save(nib.Nifti1Image(blob, scans["affine"]), tmp_path / "blob.nii.gz")
    manifest = tmp_path / "test.csv"
    rows = [("healthy4", ""), ("healthy3", tmp_path / "blob.nii.gz")]
    manifest.write_text("path,mask,label,lesion_type,split,subject,modality\n" + "".join(
        f"{root / (n + '.nii.gz')},{root / 'mask.nii.gz'},{label},{'tumour' if label else ''},test,s{i},T1\n"
        for i, (n, label) in enumerate(rows)))
    store = tmp_path / "reconstructions"
    first = evaluate(BrainFMPipeline.from_pretrained(model_dir), manifest, tmp_path / "r1", progress=False,
                     reuse_dir=store)
    assert len(first.metrics["ldm"]["per_volume"]) == 2 and len(list(store.iterdir())) == 1
    assert json.loads((tmp_path / "r1" / "metrics.json").read_text())  # written as usual

    recalibrated = BrainFMPipeline.from_pretrained(model_dir)
    calibrate(recalibrated, root / "healthy.csv", split="val", progress=False,
              config=dataclasses.replace(recalibrated.calibration.config, target_fpr=0.05))
    reused = evaluate(recalibrated, manifest, tmp_path / "r2", progress=False, reuse_dir=store)
    fresh = evaluate(recalibrated, manifest, tmp_path / "r3", progress=False)
    assert reused.metrics["ldm"]["calibrated_threshold"] != first.metrics["ldm"]["calibrated_threshold"]
    for key in ("auprc_pooled", "dice_pooled", "fp_lesions_per_scan", "pseudo_healthy_mae"):
        assert reused.metrics["ldm"]["overall"][key] == fresh.metrics["ldm"]["overall"][key]
    assert reused.metrics["ldm"]["healthy"]["fp_rate_pooled"] == fresh.metrics["ldm"]["healthy"]["fp_rate_pooled"]
    assert "- reconstructions_reused: 2" in (tmp_path / "r2" / "report.md").read_text(encoding="utf-8")
    assert "reconstructions_reused" not in (tmp_path / "r3" / "report.md").read_text(encoding="utf-8")

    changed = BrainFMPipeline.from_pretrained(model_dir)
    with torch.no_grad():
        next(changed.unet.parameters()).add_(0.01)  # other weights: another fingerprint, nothing read back
    evaluate(changed, manifest, tmp_path / "r4", progress=False, reuse_dir=store)
    assert len(list(store.iterdir())) == 2

    altered = tmp_path / "altered.csv"  # the same scan name with other content
    other = tmp_path / "other" / "healthy4.nii.gz"
    other.parent.mkdir()
    shutil.copy(root / "healthy2.nii.gz", other)
    altered.write_text(manifest.read_text().replace(str(root / "healthy4.nii.gz"), str(other)))
    from brainfm.anomaly import reuse

    calls = []
    original = reuse.ReconstructionStore.save
    reuse.ReconstructionStore.save = lambda self, name, *a: (calls.append(name), original(self, name, *a))[1]
    try:
        evaluate(BrainFMPipeline.from_pretrained(model_dir), altered, tmp_path / "r5", progress=False,
                 reuse_dir=store)
    finally:
        reuse.ReconstructionStore.save = original
    assert len(calls) == 1  # only the scan whose content changed was reconstructed again
