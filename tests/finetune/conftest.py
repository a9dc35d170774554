"""A tiny cohort cut from SIMULATED subjects on the real ICBM152 template, a tiny random foundation model
"pretrained" on some of its subjects (its model folder records a shard index naming them, as a training export
does) and calibrated on two others, and the fine-tuning features of every scan (computed once per session).

The foundation networks are untrained, so the unsupervised z-map is weak: that is the point of the comparison
(a head trained on a few labels must beat the map it starts from). Only tumour and stroke lesions are used: at
the 4 mm test grid the millimetre-sized MS and small-vessel lesions would vanish.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from brainfm.config import FinetuneConfig, from_dict
from brainfm.finetune.features import FeatureSet, ScanVolume, build_features

GRID = (40, 48, 40)
N_HEALTHY = 7
# what the tiny model has seen, as its shard index spells it: pretraining on healthy-0 and two tumour subjects (and
# one subject outside this cohort), calibration on the validation split; healthy-3..6 and the rest are unseen
PRETRAINING = {"train": ("pretrain-elsewhere", "healthy-0", "tumour-0", "tumour-1"), "val": ("healthy-1", "healthy-2")}
UNSEEN_HEALTHY = ("healthy-3", "healthy-4", "healthy-5", "healthy-6")
LESION_KINDS = ("tumour", "stroke")
N_PER_KIND = 3
META = {"modality": "T1", "age": 60.0, "sex": "F", "site": "unknown",
        "scalars": {"brain_volume_ml": 1200.0, "gm_fraction": 0.45, "wm_fraction": 0.35}}


def _shrink(volume: np.ndarray) -> np.ndarray:
    tensor = torch.from_numpy(np.asarray(volume, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=GRID, mode="area")[0, 0].numpy()


def _scan(name: str, seed: tuple[int, ...], kind: str | None) -> ScanVolume:
    from brainfm.data.synthetic import synthesize_subject

    subject = synthesize_subject(name, seed, ("T1",), resolution=2, lesion_kind=kind)
    mask = _shrink(subject.mask) > 0.5
    image = _shrink(subject.images["T1"]) * mask
    image = np.clip(image / np.percentile(image[mask], 99.5), 0, 1).astype(np.float32)
    anatomy = np.stack([mask.astype(np.float32), _shrink(subject.gm) * mask, _shrink(subject.wm) * mask])
    label = None if subject.label is None else ((_shrink(subject.label) > 0.3) & mask).astype(np.uint8)
    return ScanVolume(name=name, image=image, mask=mask, anatomy=anatomy.astype(np.float32), meta=dict(META),
                      label=label, lesion_type=kind or "healthy", voxel_volume_ml=0.064)  # healthy: no label


@pytest.fixture(scope="session")
def cohort() -> list[ScanVolume]:
    scans = [_scan(f"healthy-{i}", (7, 0, i), None) for i in range(N_HEALTHY)]
    for k, kind in enumerate(LESION_KINDS):
        scans += [_scan(f"{kind}-{i}", (7, 1 + k, i), kind) for i in range(N_PER_KIND)]
    return scans


def tiny_networks():
    from brainfm.diffusion import make_scheduler
    from brainfm.models import BrainVAE, Conditioner, LatentUNet

    torch.manual_seed(0)
    vae = BrainVAE(spatial_dims=2, channels=(8, 16), latent_channels=2, attention_levels=(False, False),
                   norm_num_groups=8)
    unet = LatentUNet(spatial_dims=2, latent_channels=2, anatomy_channels=3, channels=(16, 16),
                      attention_levels=(False, True), num_head_channels=8, cross_attention_dim=16, norm_num_groups=8)
    conditioner = Conditioner(hidden_size=16, num_heads=2, cross_attention_dim=16)
    return vae.eval(), unet.eval(), conditioner.eval(), make_scheduler("ddpm", 100)


def write_shard_index(folder: Path, splits: dict[str, tuple[str, ...]]) -> Path:
    """A shard ``index.json`` naming ``splits``' subjects in sample keys (``brainfm.data.writer.sample_key``: the
    sanitised subject and its CSV line), the part of a real index that records who a model was trained on."""
    from brainfm.data.manifest import sanitize_key
    from brainfm.data.writer import FORMAT
    from brainfm.io import write_json

    row = iter(range(2, 10_000))
    write_json(folder / "index.json", {"format": FORMAT, "splits": {
        split: [{"name": f"{split}-000000.tar", "keys": [f"{sanitize_key(s)}_{next(row):05d}" for s in subjects]}]
        for split, subjects in splits.items()}})
    return folder


NIFTI_AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])  # the tiny cohort's 4 mm voxels, as NIfTI inputs


def write_nifti_manifest(scans: list[ScanVolume], root: Path) -> Path:
    """Write ``scans`` as NIfTI (image, brain mask, lesion label) into ``root`` with a manifest CSV naming them
    (T1), the inputs detect, evaluate and fine-tuning read; returns the manifest's path."""
    from brainfm.io import save_nifti

    rows = ["path,mask,label,lesion_type,modality"]
    for scan in scans:
        save_nifti(scan.image, NIFTI_AFFINE, root / f"{scan.name}.nii.gz", dtype=np.float32)
        save_nifti(scan.mask.astype(np.uint8), NIFTI_AFFINE, root / f"{scan.name}_mask.nii.gz", dtype=np.uint8)
        label = ""
        if scan.lesion_type != "healthy":
            save_nifti(scan.label, NIFTI_AFFINE, root / f"{scan.name}_label.nii.gz", dtype=np.uint8)
            label = f"{scan.name}_label.nii.gz"
        rows.append(f"{scan.name}.nii.gz,{scan.name}_mask.nii.gz,{label},{scan.lesion_type},T1")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


@pytest.fixture(scope="session")
def nifti_manifest():
    """``nifti_manifest(scans, root)``: :func:`write_nifti_manifest` for tests."""
    return write_nifti_manifest


@pytest.fixture(scope="session")
def shard_index():
    """``shard_index(folder, {split: subjects})``: :func:`write_shard_index` for tests."""
    return write_shard_index


@pytest.fixture(scope="session")
def tiny_model(cohort, tmp_path_factory):
    """An in-memory ``BrainFMPipeline`` (random tiny 2D networks) whose provenance names its pretraining shards,
    calibrated on the healthy scans of their validation split."""
    from brainfm.anomaly.deviation import residual_map
    from brainfm.anomaly.normative import NormativeCalibration
    from brainfm.config import DeviationConfig, PreprocessConfig, ReconstructionConfig
    from brainfm.pipeline import BrainFMPipeline

    shards = write_shard_index(tmp_path_factory.mktemp("shards"), PRETRAINING)
    vae, unet, conditioner, noise_scheduler = tiny_networks()
    model = BrainFMPipeline(
        vae, unet, conditioner, noise_scheduler, recipe=PreprocessConfig(spacing=(4.0, 4.0, 4.0), shape=GRID),
        reconstruction=ReconstructionConfig(t_star=(0.3,), num_inference_steps=5, batch_size=40), modalities=("T1",),
        provenance={"pretrain_config": {"data": {"shard_dir": str(shards), "train_split": "train",
                                                 "val_split": "val"}}},
    )
    reconstructor = model.reconstructor()
    healthy = [s for s in cohort if s.name in PRETRAINING["val"]]
    residuals = []
    for scan in healthy:
        recon, _ = reconstructor.reconstruct(torch.from_numpy(scan.image)[None], torch.from_numpy(scan.anatomy),
                                             scan.meta)
        residuals.append(residual_map(scan.image, recon[0].numpy() * scan.mask, scan.mask))
    model.set_calibration(NormativeCalibration.fit(residuals, [s.mask for s in healthy],
                                                   DeviationConfig(target_fpr=0.02, min_component_vox=2)),
                          source=str(shards), split="val")
    return model


@pytest.fixture(scope="session")
def feature_set(model_dir, cohort) -> FeatureSet:
    """Features computed by the model folder (as `brainfm finetune` does), so every head knows its model."""
    from brainfm.pipeline import BrainFMPipeline

    return build_features(BrainFMPipeline.from_pretrained(model_dir), cohort,
                          source={"manifest": "in-memory test cohort"})


@pytest.fixture(scope="session")
def finetune_config():
    """``finetune_config(out, **sections)``: a tiny ``FinetuneConfig`` writing under ``out``; ``sections`` maps a
    section name to the fields replaced in it."""

    def make(out: Path, **sections: dict) -> FinetuneConfig:
        config = from_dict(FinetuneConfig, {
            "data": {"model": "unused", "manifest": "unused", "batch_size": 4, "unlabelled_batch_size": 2,
                     "n_calibration_healthy": 2, "test_fraction": 0.34},
            "head": {"network": {"channels": [4, 8, 16]}},
            "optim": {"lr": 3.0e-3, "warmup_steps": 2, "max_steps": 40, "lr_scheduler": "constant"},
            "train": {"seed": 0, "ema_decay": None, "checkpoint_every": 20, "log_every": 10, "sample_every": 0,
                      "output_dir": str(out)},
        })
        for section, values in sections.items():
            setattr(config, section, dataclasses.replace(getattr(config, section), **values))
        return config

    return make


@pytest.fixture(scope="session")
def model_dir(tiny_model, tmp_path_factory) -> Path:
    """The tiny foundation model written as a calibrated model folder (what ``BrainFMPipeline`` loads)."""
    return tiny_model.save_pretrained(tmp_path_factory.mktemp("model-folder") / "model")
