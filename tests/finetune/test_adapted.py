"""`brainfm finetune semi` starting from a model adapted to a site (`brainfm adapt` with LoRA adapters): the
features come from the adapted model (its UNet with the site's adapters merged, its recalibrated threshold), a
head with UNet features and its own LoRA trains on top, and the head ships in a release beside the site's
adapters."""

from __future__ import annotations

import json

import numpy as np
import torch

from brainfm.anomaly.adapt import adapt
from brainfm.cli import main
from brainfm.config import AdaptConfig, from_dict
from brainfm.finetune.run import run_semi
from brainfm.pipeline import BrainFMPipeline


def _write_cohort(cohort, root, nifti_manifest):
    manifest = nifti_manifest(cohort, root)
    rows = manifest.read_text().splitlines()
    # the site's healthy scans the model is adapted on: subjects it has already seen (conftest's PRETRAINING), so
    # the unseen healthy subjects stay for head calibration and the healthy test set
    site = [r for r in rows[1:] if r.split(".", 1)[0] in ("healthy-0", "healthy-1", "healthy-2")]
    (root / "healthy.csv").write_text("\n".join([rows[0], *site]) + "\n")
    return root / "manifest.csv", root / "healthy.csv"


def test_semi_curve_and_release_start_from_an_adapted_model(cohort, model_dir, finetune_config, nifti_manifest,
                                                           tmp_path):
    manifest, healthy = _write_cohort(cohort, tmp_path, nifti_manifest)
    foundation = BrainFMPipeline.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(1)
    for name, parameter in foundation.unet.named_parameters():  # MONAI zero-initialises the UNet's output layer:
        if name.startswith("unet.out."):  # untrained and zero, it would give the adapters no gradient
            parameter.data = 0.1 * torch.randn(parameter.shape, generator=generator)
    config = from_dict(AdaptConfig, {"lora": {"enabled": True, "rank": 2}, "data": {"batch_size": 4},
                                     "optim": {"lr": 0.01, "max_steps": 2, "warmup_steps": 0},
                                     "train": {"ema_decay": None, "sample_every": 0}})
    result = adapt(foundation, healthy, tmp_path / "adapted", config=config, progress=False)
    adapted = BrainFMPipeline.from_pretrained(result.model_dir)
    assert adapted.unet_lora is not None

    out = tmp_path / "semi"
    finetune = finetune_config(out, data={"model": str(result.model_dir), "manifest": str(manifest)},
                               semi={"labelled_counts": (1,), "baseline": False}, head={"unet_features": True},
                               lora={"enabled": True, "rank": 2}, optim={"max_steps": 2})
    payload = run_semi(finetune, output_dir=out, progress=False)
    assert [(p["n_labelled"], p["method"]) for p in payload["points"]] == [(1, "head")]
    # the adaptation part is seen by the adapted model: kept out of head calibration and test with the rest
    split = json.loads((out / "split.json").read_text())
    assert split["seen"]["roles"][f"site adaptation 1 on {healthy}"] == len(result.record["split"]["adapt_subjects"])
    held_out = split["calibration"] + split["healthy_test"] + [n for v in split["test"].values() for n in v]
    assert not {split["subjects"][n] for n in held_out} & set(result.record["split"]["adapt_subjects"])
    from brainfm.finetune.features import FeatureSet

    features = FeatureSet.load(out / "features")
    assert features.z_threshold == adapted.calibration.threshold  # the site's threshold, not the foundation's
    scan = features.records[0]
    analysis = adapted.analyse(scan.image, scan.mask, scan.anatomy, scan.meta)
    np.testing.assert_allclose(scan.pseudo_healthy, analysis.reconstruction, atol=1e-5)  # the adapted UNet's

    from brainfm.anomaly.evaluate import evaluate

    evaluate(adapted, manifest, tmp_path / "report", progress=False)
    release = tmp_path / "release"
    assert main(["release", "--model", str(result.model_dir), "--out", str(release), "--head",
                 str(out / "runs" / "head-n1"), "--metrics", str(tmp_path / "report" / "metrics.json")]) == 0
    shipped = BrainFMPipeline.from_pretrained(release)  # the head, its adapters and the site's adapters, together
    assert shipped.head is not None and shipped.unet_lora is not None and shipped.head_lora is not None
    name = cohort[0].name
    output = shipped(str(tmp_path / f"{name}.nii.gz"), modality="T1", mask=str(tmp_path / f"{name}_mask.nii.gz"))
    assert output.head_probability is not None and output.head_probability.shape == output.z_map.shape
    np.testing.assert_allclose(output.pseudo_healthy, adapted(str(tmp_path / f"{name}.nii.gz"), modality="T1",
                               mask=str(tmp_path / f"{name}_mask.nii.gz")).pseudo_healthy, atol=1e-5)
