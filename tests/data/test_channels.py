"""Multi-channel input (issue 13 item 8): a subject's co-registered contrasts (here T1 + FLAIR of SIMULATED subjects
on a real anatomy) as the channels of one sample, chosen in the data config; a subject without one of them is
refused with one line naming it; the VAE and the LDM train on the channels (``in_channels``)."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from brainfm.config import DataConfig, PretrainConfig, load_config
from brainfm.io import BrainFMInputError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from brainfm.data.synthetic import SplitPlan, synthesize_cohort

    return synthesize_cohort(tmp_path_factory.mktemp("channels") / "cohort",
                             {"train": SplitPlan(n_healthy=2, anatomies=("icbm152",)),
                              "test": SplitPlan(n_lesion=1, anatomies=("icbm152",))},
                             protocols=(("T1", "FLAIR"),), lesion_kinds=("tumour",), seed=3, resolution=3)


def _config(channels: tuple[str, ...]) -> DataConfig:
    config = load_config(REPO / "configs/data/tiny.yaml", DataConfig)
    config.preprocess = dataclasses.replace(config.preprocess, channels=channels)
    config.shards.workers = 1
    return config


@pytest.fixture(scope="module")
def shards(cohort: Path, tmp_path_factory) -> Path:
    from brainfm.data.writer import build_shards

    out = tmp_path_factory.mktemp("channels") / "shards"
    report = build_shards(cohort, out, _config(("T1", "FLAIR")))
    assert report.n_rejected == 0 and report.counts == {"train": 2, "test": 1}  # one sample per subject
    return out


def test_channels_are_the_subjects_contrasts_on_one_grid(cohort: Path, shards: Path) -> None:
    from brainfm.data.preprocess import preprocess_scan
    from brainfm.data.reader import make_dataloader

    config = _config(("T1", "FLAIR"))
    batch = next(iter(make_dataloader(shards, "train", mode="3d", batch_size=1, drop_last=False)))
    image, meta = batch["image"][0], batch["meta"][0]
    assert tuple(image.shape) == (2, *config.preprocess.shape) and tuple(batch["mask"].shape[1:2]) == (1,)
    assert meta["channels"] == ["T1", "FLAIR"] and meta["modality"] == "T1"
    folder = cohort.parent
    subject = meta["subject"]
    mask = folder / "masks" / f"{subject}_mask.nii.gz"
    reference = preprocess_scan(folder / "images" / f"{subject}_T1.nii.gz", "T1", config.preprocess, mask_path=mask)
    flair = preprocess_scan(folder / "images" / f"{subject}_FLAIR.nii.gz", "FLAIR", config.preprocess,
                            mask_path=mask, grid=reference.affine)
    np.testing.assert_allclose(np.asarray(meta["grid_affine"]), reference.affine, atol=1e-6)
    # channel 0 is the T1 as a one-channel build stores it; channel 1 the FLAIR resampled onto the T1's grid
    np.testing.assert_allclose(image[0].numpy(), reference.image, atol=1e-3)
    np.testing.assert_allclose(image[1].numpy(), flair.image, atol=1e-3)
    brain = batch["mask"][0, 0].numpy() > 0
    correlation = np.corrcoef(image[0].numpy()[brain], image[1].numpy()[brain])[0, 1]
    assert correlation < 0.9  # two contrasts, not one scan twice (FLAIR: CSF dark, WM darker than GM)


def test_a_subject_without_one_of_the_channels_is_refused(cohort: Path, tmp_path: Path) -> None:
    from brainfm.data.writer import build_shards

    with cohort.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    dropped = next(r for r in rows if r["modality"] == "FLAIR")
    kept = [r for r in rows if r is not dropped]
    for row in kept:  # absolute paths: the manifest moves to another folder
        for key in ("path", "mask"):
            row[key] = str(cohort.parent / row[key])
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    with pytest.raises(BrainFMInputError) as caught:
        build_shards(manifest, tmp_path / "shards", _config(("T1", "FLAIR")))
    message = str(caught.value)
    assert "\n" not in message and str(manifest) in message
    assert f"subject {dropped['subject']!r} has no FLAIR scan (has T1)" in message
    assert not (tmp_path / "shards" / "index.json").exists()
    with pytest.raises(ValueError, match="distinct modalities"):
        _config(("T1", "T1"))


def test_vae_and_ldm_train_calibrate_and_evaluate_on_the_channels(shards: Path, tmp_path: Path) -> None:
    """Through the whole shard path: the VAE and LDM read both channels, calibration and evaluation reconstruct
    both and score their mean residual; a single file is refused (it cannot hold both contrasts)."""
    from brainfm.pipeline import BrainFMPipeline
    from brainfm.train.pretrain import pretrain

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = load_config(REPO / "configs/pretrain/tiny-2d.yaml", PretrainConfig, overrides={
            "data": {"shard_dir": str(shards)}, "train": {"output_dir": str(tmp_path), "sample_every": 0,
                                                          "checkpoint_every": 2},
            "optim": {"max_steps": 2}})
        pretrain("vae", config)
        run = pretrain("ldm", config)
    finally:
        torch.set_num_threads(threads)
    from brainfm.anomaly.calibrate import calibrate
    from brainfm.anomaly.evaluate import cases_from_shards, evaluate
    from brainfm.config import ReconstructionConfig

    pipeline = BrainFMPipeline.from_pretrained(run / "model")
    assert pipeline.vae.config.in_channels == 2 and pipeline.vae.config.out_channels == 2
    assert pipeline.recipe.channels == ("T1", "FLAIR")
    losses = [json.loads(line) for line in (run / "logs" / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(v) for entry in losses for k, v in entry.items()
                                    if isinstance(v, float))
    pipeline.set_reconstruction(ReconstructionConfig(t_star=(0.3,), num_inference_steps=4, seeds=(0,), batch_size=64))
    calibration = calibrate(pipeline, shards, split="train", progress=False)
    assert calibration.n_scans == 2 and np.isfinite(calibration.threshold)
    (case,) = cases_from_shards(pipeline, shards, "test", [])
    analysis = pipeline.analyse(case.image, case.mask, case.anatomy, case.meta)
    assert case.image.shape == analysis.reconstruction.shape == (2, *pipeline.recipe.shape)
    assert analysis.zmap.shape == pipeline.recipe.shape  # one deviation map for both contrasts
    result = evaluate(pipeline, shards, tmp_path / "report", split="test", progress=False)
    ldm = result.metrics["ldm"]["overall"]
    assert ldm["n_lesion_volumes"] == 1 and 0.0 < ldm["auprc_pooled"] <= 1.0
    assert set(result.metrics["ldm"]["by_modality"]) == {"T1"}  # the reference contrast names the sample
    with pytest.raises(BrainFMInputError, match="reads T1\\+FLAIR as channels: use shards"):
        pipeline.prepare(shards / "index.json", "T1")
