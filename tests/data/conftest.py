"""One shard set per session, built from a small real-anatomy cohort with one row per kind of bad input
(preprocessing with registration dominates the data tests' runtime: the writer and reader tests share it)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainfm.config import DataConfig, load_config

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "data" / "tiny.yaml"
BAD_INPUTS = {  # file -> the reason rejected.jsonl must give
    "missing.nii.gz": "missing_file",
    "fourd.nii.gz": "not_3d",
    "nan.nii.gz": "non_finite",
    "garbage.nii.gz": "unreadable",
    "zeros.nii.gz": "empty_brain",
}


def _tiny_config() -> DataConfig:
    config = load_config(CONFIG, DataConfig)
    config.shards.max_samples_per_shard = 1  # one scan per shard: several shards from a handful of scans
    config.shards.workers = 2
    return config


@pytest.fixture
def tiny_config() -> DataConfig:
    """configs/data/tiny.yaml with one scan per shard (a fresh copy per test)."""
    return _tiny_config()


def write_cohort(root: Path) -> Path:
    """Four good scans from the real ICBM152 template (shifted grid, smooth bias, one with a simulated
    hypointense lesion and its label) and one row per kind of bad input."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    root.mkdir(parents=True, exist_ok=True)
    template = load_mni152_template(resolution=2)
    data = template.get_fdata().astype(np.float32)
    brain = load_mni152_brain_mask(resolution=2).get_fdata() > 0.5
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in data.shape], indexing="ij"))
    rows = ["path,subject,modality,age,sex,site,split,mask,label,lesion_type"]
    good = [("a1", "sub-a", ""), ("a2", "sub-a", ""), ("b", "sub-b", "train"), ("c", "sub/c", "train")]
    for i, (name, subject, split) in enumerate(good):
        rng = np.random.default_rng(i)
        affine = template.affine.copy()
        affine[:3, 3] += (2.0 * i, -2.0 * i, 2.0)
        image = data * (1.0 + 0.1 * grid[i % 3]) + rng.normal(0, 0.005, data.shape).astype(np.float32) * brain
        label_cell, lesion = "", "none"
        if name == "b":
            centre = np.array([62, 70, 52])
            lesion_mask = (
                np.linalg.norm(np.indices(data.shape) - centre[:, None, None, None], axis=0) < 5
            ) & brain
            image[lesion_mask] *= 0.4
            nib.save(nib.Nifti1Image(lesion_mask.astype(np.uint8), affine), root / "b_label.nii.gz")
            label_cell, lesion = "b_label.nii.gz", "sphere"
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), root / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), root / f"{name}_mask.nii.gz")
        rows.append(
            f"{name}.nii.gz,{subject},T1,{30 + i},F,site1,{split},{name}_mask.nii.gz,{label_cell},{lesion}"
        )
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), template.affine), root / "fourd.nii.gz")
    nan = data.copy()
    nan[40, 50, 40] = np.nan
    nib.save(nib.Nifti1Image(nan, template.affine), root / "nan.nii.gz")
    (root / "garbage.nii.gz").write_bytes(b"\x1f\x8b this is not a gzip stream" * 10)
    nib.save(nib.Nifti1Image(np.zeros_like(data), template.affine), root / "zeros.nii.gz")
    for name in BAD_INPUTS:
        rows.append(f"{name},bad-{name.split('.')[0]},T1,,,,test,,,")
    rows.append("b.nii.gz,bad-modality,XR,,,,test,,,")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


@pytest.fixture(scope="session")
def shard_set(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The cohort above built with 2 workers: {root, manifest, out, config, report, bad_inputs}."""
    from brainfm.data.writer import build_shards

    root = tmp_path_factory.mktemp("cohort")
    manifest = write_cohort(root)
    config = _tiny_config()
    report = build_shards(manifest, root / "shards", config, workers=2)
    return {
        "root": root,
        "manifest": manifest,
        "out": root / "shards",
        "config": config,
        "report": report,
        "bad_inputs": dict(BAD_INPUTS),
    }
