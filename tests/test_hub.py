"""Release folders: layout, safetensors only, card values equal metrics.json, validation, push failure paths."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from brainfm import hub
from brainfm.io import BrainFMInputError

RECIPE_PARAMS = {"spacing": (8.0, 8.0, 8.0), "shape": (24, 28, 24)}  # the MNI brain fits; tiny nets stay fast
SPLITS = {"train": ["sub-01", "sub-02", "sub-03"], "val": ["sub-04"]}


def tiny_components() -> dict:
    """Tiny real brainfm networks (seeded) and a diffusers DDIM scheduler."""
    from diffusers import DDIMScheduler

    from brainfm.models.conditioning import ConditionEncoder
    from brainfm.models.unet import LatentUNet
    from brainfm.models.vae import BrainVAE

    torch.manual_seed(0)
    vae = BrainVAE(spatial_dims=2, channels=(8, 8), latent_channels=2, attention_levels=(False, False),
                   norm_num_groups=4, scaling_factor=0.8)
    conditioner = ConditionEncoder(sites=("siteA", "siteB"), hidden_size=16, num_layers=1, num_heads=2,
                                   cross_attention_dim=16)
    unet = LatentUNet(spatial_dims=2, latent_channels=2, anatomy_channels=3, channels=(8, 8),
                      attention_levels=(False, True), num_head_channels=8, cross_attention_dim=16, norm_num_groups=4)
    scheduler = DDIMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear", clip_sample=False)
    return {"vae": vae.eval(), "unet": unet.eval(), "conditioner": conditioner.eval(), "scheduler": scheduler}


def make_model_dir(root: Path) -> tuple[Path, dict]:
    """A model folder assembled by the anomaly module from a pretraining run's exports, then calibrated."""
    from brainfm.anomaly.pipeline import assemble_model_dir
    from brainfm.config import PreprocessConfig, ReconstructionConfig
    from brainfm.data.preprocess import recipe_dict

    components = tiny_components()
    run = root / "run"
    for name, component in components.items():
        component.save_pretrained(run / name)
    (run / "data_recipe.json").write_text(json.dumps({"recipe": recipe_dict(PreprocessConfig(**RECIPE_PARAMS))}))
    model_dir = assemble_model_dir(
        run, root / "model", modalities=["T1"],
        reconstruction=ReconstructionConfig(t_star=(0.3,), num_inference_steps=5, batch_size=64),
    )
    healthy_calibration().save(model_dir / "calibration")
    return model_dir, components


def write_shards(folder: Path) -> Path:
    """A shard folder's index.json in the format of brainfm.data.writer (the card reads nothing else)."""
    from brainfm.config import PreprocessConfig
    from brainfm.data.preprocess import recipe_dict
    from brainfm.data.writer import FORMAT

    folder.mkdir(parents=True)
    splits, counts = {}, {}
    for split, subjects in SPLITS.items():
        splits[split] = [{"name": f"{split}-000000.tar", "n_samples": len(subjects), "sha256": "-", "bytes": 0,
                          "keys": [f"{s}_0" for s in subjects], "slice_brain_voxels": [[1]] * len(subjects)}]
        datasets: dict[str, int] = {}
        modalities: dict[str, int] = {}
        for i, _ in enumerate(subjects):
            dataset = "brainfm-synth-lesion" if i == 0 and split == "train" else "brainfm-synth-healthy"
            modality = "T1" if i < 2 else "CT"
            datasets[dataset] = datasets.get(dataset, 0) + 1
            modalities[modality] = modalities.get(modality, 0) + 1
        counts[split] = {"n_samples": len(subjects), "n_shards": 1, "n_subjects": len(subjects),
                         "modalities": modalities, "datasets": datasets, "sites": {"unknown": len(subjects)}}
    (folder / "index.json").write_text(json.dumps({
        "format": FORMAT, "recipe": recipe_dict(PreprocessConfig(**RECIPE_PARAMS)), "grid_shape": [24, 28, 24],
        "modalities": {split: sorted(c["modalities"]) for split, c in counts.items()}, "counts": counts,
        "splits": splits, "n_rejected": 0,
    }))
    return folder


def _healthy_residuals(n: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.zeros(RECIPE_PARAMS["shape"], dtype=bool)
    mask[4:20, 4:24, 4:20] = True
    return [np.abs(rng.normal(0.0, 0.1, mask.shape)).astype(np.float32) * mask for _ in range(n)], mask


def healthy_calibration():
    """A real NormativeCalibration fitted on small healthy residual maps."""
    from brainfm.anomaly.deviation import NormativeCalibration
    from brainfm.config import DeviationConfig

    residuals, mask = _healthy_residuals(4, seed=1)
    config = DeviationConfig(median_filter_size=3, mask_erosion_vox=1, min_component_vox=2, target_fpr=0.05)
    return NormativeCalibration.fit(residuals, [mask] * len(residuals), config)


def write_evaluation(report_dir: Path) -> dict:
    """metrics.json + report.md written by the evaluation module for a calibrated healthy/lesion test set."""
    from brainfm.evaluation.metrics import MetricAccumulator
    from brainfm.evaluation.report import write_report

    calibration = healthy_calibration()
    accumulator = MetricAccumulator(threshold=calibration.threshold, size_bins_ml=(0.01,), pr_curve_points=20)
    residuals, mask = _healthy_residuals(4, seed=2)
    for i, residual in enumerate(residuals):
        label = None
        if i >= 2:  # two scans with a simulated hyperintense cube
            label = np.zeros(mask.shape, dtype=np.uint8)
            label[8:12, 8:12, 6 + i : 10 + i] = 1
            residual = residual + 0.6 * label
        result = calibration.analyse(residual, mask)
        accumulator.add(result.zmap, label if label is not None else np.zeros(mask.shape, np.uint8), mask,
                        pred_mask=result.mask, subject_score=result.subject_score,
                        lesion_type="simulated-tumour" if label is not None else None, voxel_volume_ml=0.008,
                        scan_id=f"scan-{i}")
    protocol = {**calibration.protocol(), "dataset": "demo-simulated", "spacing_mm": [2.0, 2.0, 2.0]}
    write_report(accumulator.compute(), protocol, report_dir)
    return json.loads((report_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hub")
    model_dir, components = make_model_dir(root)
    write_evaluation(root / "report")
    metrics_path = root / "report" / "metrics.json"
    shards = write_shards(root / "shards")
    out = root / "release"
    summary = hub.build_release(model_dir, out, metrics_path=metrics_path, shards_dir=shards, repo_id="org/brainfm-tiny")
    return {"root": root, "model_dir": model_dir, "components": components, "out": out, "summary": summary,
            "metrics_path": metrics_path, "shards": shards}


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_release_layout_is_diffusers_and_safetensors_only(release):
    out = release["out"]
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "BrainFMPipeline"
    assert index["vae"] == ["brainfm.models.vae", "BrainVAE"]
    assert index["unet"] == ["brainfm.models.unet", "LatentUNet"]
    assert index["conditioner"] == ["brainfm.models.conditioning", "ConditionEncoder"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in hub.PICKLE_SUFFIXES + hub.CODE_SUFFIXES]
    for name in ("vae", "unet", "conditioner"):
        assert (out / name / "diffusion_pytorch_model.safetensors").is_file()
        assert (out / name / "config.json").is_file()
    assert (out / "calibration" / "calibration.safetensors").is_file()
    # weights in the release are bit-identical to the run's own models
    for name in ("vae", "unet", "conditioner"):
        loaded = hub.load_component(out, name)
        original = release["components"][name].state_dict()
        assert set(loaded.state_dict()) == set(original)
        assert all(torch.equal(loaded.state_dict()[k], original[k]) for k in original)
    assert hub.load_component(out, "scheduler").config.num_train_timesteps == 100
    assert release["summary"].parameters["unet"] == sum(p.numel() for p in release["components"]["unet"].parameters())
    assert not list(out.parent.glob(".release.*"))  # the temporary build folder was renamed, not left behind


def test_brainfm_config_carries_recipe_vocabulary_calibration_version(release):
    config = json.loads((release["out"] / "brainfm_config.json").read_text())
    from brainfm import __version__

    assert config["package_version"] == __version__
    source = json.loads((release["model_dir"] / "brainfm_config.json").read_text())
    assert config["preprocess"] == source["preprocess"]  # the model's own recipe and settings, verbatim
    assert config["preprocess"]["params"]["spacing"] == [8.0, 8.0, 8.0]
    assert config["reconstruction"] == source["reconstruction"] and config["reconstruction"]["t_star"] == [0.3]
    assert config["modalities"] == ["T1"]
    assert (release["out"] / "recipe.json").read_text() == (release["model_dir"] / "recipe.json").read_text()
    assert config["conditioning_vocabulary"]["sites"] == ["siteA", "siteB"]
    assert config["conditioning_vocabulary"]["modalities"] == ["T1", "T2", "FLAIR", "PD", "CT"]
    stored = json.loads((release["model_dir"] / "calibration" / "calibration.json").read_text())
    assert config["calibration"]["threshold"] == stored["threshold"] > 0
    assert config["calibration"]["config"]["target_fpr"] == 0.05
    assert config["calibration"]["arrays"] == ["calibration/calibration.safetensors"]
    # the calibration folder is shipped verbatim, so the anomaly module's checksum still matches
    from brainfm.anomaly.deviation import NormativeCalibration

    assert NormativeCalibration.load(release["out"] / "calibration").threshold == stored["threshold"]


def test_card_metadata_parses_and_equals_metrics(release):
    from huggingface_hub import ModelCard, metadata_load

    card_path = release["out"] / "README.md"
    metadata = metadata_load(card_path)
    assert metadata["library_name"] == "brainfm"
    assert metadata["license"] == "apache-2.0"
    assert metadata["pipeline_tag"] == "image-segmentation"
    assert "simulated-data" in metadata["tags"]
    results = metadata["model-index"][0]["results"]
    assert metadata["model-index"][0]["name"] == "brainfm-tiny"
    assert results[0]["dataset"]["name"] == "demo-simulated"  # from the evaluation protocol
    card_values = {m["type"]: m["value"] for r in results for m in r["metrics"]}
    metrics = json.loads(release["metrics_path"].read_text())
    # every published value is the one in metrics.json, found by its path there
    assert card_values["overall/auprc_pooled"] == metrics["overall"]["auprc_pooled"]
    assert card_values["overall/dice_mean"] == metrics["overall"]["dice_mean"]
    assert card_values["overall/subject_auroc"] == metrics["overall"]["subject_auroc"]
    assert card_values["healthy/fp_rate_pooled"] == metrics["healthy"]["fp_rate_pooled"]
    assert card_values["calibrated_threshold"] == metrics["calibrated_threshold"]
    for name, value in card_values.items():
        *path, key = name.split("/")
        node = metrics
        for part in path:
            node = node[part]
        assert node[key] == value, name
    assert len(card_values) == 28  # 8 table metrics x 3 groups + 3 healthy FP rates + threshold
    assert ModelCard.load(card_path).data.eval_results[0].metric_value == metrics["overall"]["auprc_pooled"]
    assert hub.card_metrics(card_path) == card_values

    text = card_path.read_text()
    # real values, not invented: counts from index.json, parameters counted from the models, compute unrecorded
    total = sum(sum(p.numel() for p in c.parameters()) for k, c in release["components"].items() if k != "scheduler")
    assert f"Total parameters: {total:,}" in text
    # training data counted in the shards' index.json: 4 subjects, 2 datasets, 2 modalities
    assert "| train | 3 | 3 | 1 |" in text and "| val | 1 | 1 | 1 |" in text and "| subjects | 4 |" in text
    assert "brainfm-synth-lesion (1 samples), brainfm-synth-healthy (3 samples)" in text
    assert "| modalities | T1: 3, CT: 1 |" in text
    assert "| training | not recorded | not recorded | not recorded |" in text
    assert "Not a medical device" in text and "**simulated** lesions" in text
    auprc = metrics["overall"]["auprc_pooled"]
    assert f"| brainfm | overall | 4 | {auprc:.4f} |" in text
    fp = metrics["healthy"]
    assert f"| brainfm | 2 | {fp['fp_rate_pooled']:.4f} | {fp['fp_rate_per_scan_mean']:.4f} |" in text
    assert "- Post-processing: median filter 3 vox; brain mask eroded by 1 vox" in text  # protocol from report.md
    assert f"z > {metrics['calibrated_threshold']:.4f}" in text
    assert 'BrainFMPipeline.from_pretrained("org/brainfm-tiny")' in text
    assert "{{" not in text and "{%" not in text and "\n# brainfm-tiny\n" in text


def test_training_compute_is_read_from_run_log(release, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(release["model_dir"], model_dir)
    (model_dir / "training.json").write_text(json.dumps(
        {"vae": {"steps": 120, "wall_time_s": 35.5, "hardware": "cpu x2"}}
    ))
    run = tmp_path / "run"  # the pretraining run's own loss log gives the LDM's steps (no wall time recorded)
    (run / "ldm" / "logs").mkdir(parents=True)
    (run / "ldm" / "logs" / "losses.jsonl").write_text(
        "".join(json.dumps({"step": s, "losses": {"mse": 0.5}}) + "\n" for s in (1, 2, 300))
    )
    config = json.loads((model_dir / "brainfm_config.json").read_text())
    (model_dir / "brainfm_config.json").write_text(json.dumps({**config, "source_run": str(run)}))
    hub.build_release(model_dir, tmp_path / "rel", metrics_path=release["metrics_path"])
    text = (tmp_path / "rel" / "README.md").read_text()
    assert "| vae | 120 | 35.5 s | cpu x2 |" in text
    assert "| ldm | 300 | not recorded | not recorded |" in text
    assert "Split counts: not recorded" in text  # no shard folder given: said so, nothing invented
    assert "| modalities | T1 (trained modalities; counts not recorded) |" in text


def _copy_release(release, tmp_path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(release["out"], folder)
    hub.validate_release(folder)
    return folder


def test_validation_refuses_missing_weights(release, tmp_path):
    folder = _copy_release(release, tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(BrainFMInputError, match=r"unet.*no \.safetensors"):
        hub.validate_release(folder)


def test_validation_refuses_missing_component(release, tmp_path):
    folder = _copy_release(release, tmp_path)
    shutil.rmtree(folder / "scheduler")
    with pytest.raises(BrainFMInputError, match="scheduler: component folder missing"):
        hub.validate_release(folder)


def test_validation_refuses_pickle_weights(release, tmp_path):
    folder = _copy_release(release, tmp_path)
    torch.save({"w": torch.ones(2)}, folder / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(BrainFMInputError, match=r"diffusion_pytorch_model\.bin.*pickle"):
        hub.validate_release(folder)


def test_validation_refuses_card_without_metrics(release, tmp_path):
    folder = _copy_release(release, tmp_path)
    text = (folder / "README.md").read_text()
    body = text.split("\n---\n", 1)[1]
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: brainfm\n---\n" + body)
    with pytest.raises(BrainFMInputError, match="no evaluation metrics"):
        hub.validate_release(folder)
    hub.validate_release(folder, require_card=False)  # loading does not need a card


def test_validation_refuses_config_that_does_not_load(release, tmp_path):
    folder = _copy_release(release, tmp_path)
    config = json.loads((folder / "vae" / "config.json").read_text())
    config["spatial_dims"] = 5
    (folder / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(BrainFMInputError, match="config does not load into BrainVAE"):
        hub.validate_release(folder)


def test_failed_build_leaves_no_output(release, tmp_path):
    bad_metrics = tmp_path / "metrics.json"
    bad_metrics.write_text(json.dumps({"overall": {"auprc_pooled": None}, "healthy": {}, "note": "no numbers"}))
    out = tmp_path / "rel"
    with pytest.raises(BrainFMInputError, match="no numeric metrics"):
        hub.build_release(release["model_dir"], out, metrics_path=bad_metrics)
    assert not out.exists() and not list(tmp_path.glob(".rel.*"))


def test_build_refuses_pickle_in_model_dir(release, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(release["model_dir"], model_dir)
    torch.save({"w": torch.ones(1)}, model_dir / "calibration" / "stats.pt")
    with pytest.raises(BrainFMInputError, match=r"stats\.pt.*pickle"):
        hub.build_release(model_dir, tmp_path / "rel", metrics_path=release["metrics_path"])
    assert not (tmp_path / "rel").exists()


def test_push_without_network_fails_cleanly_folder_intact(release, monkeypatch):
    import huggingface_hub

    before = _digest(release["out"])
    monkeypatch.setattr(huggingface_hub.ModelCard, "validate", lambda self, repo_type=None: None)

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    with pytest.raises(BrainFMInputError) as info:
        hub.push_release(release["out"], "org/brainfm-tiny")
    message = str(info.value)
    assert "\n" not in message and "push failed" in message and "ConnectionError" in message
    assert str(release["out"]) in message
    assert _digest(release["out"]) == before


def test_push_creates_repo_and_uploads_one_commit(release, monkeypatch):
    import huggingface_hub

    calls: list[tuple[str, dict]] = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", {"token": token}))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            return type("Commit", (), {"commit_url": "https://huggingface.co/org/brainfm-tiny/commit/abc"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub.ModelCard, "validate", lambda self, repo_type=None: None)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    url = hub.push_release(release["out"], "org/brainfm-tiny", private=True)
    assert url.endswith("/commit/abc")
    assert [c[0] for c in calls] == ["init", "create_repo", "upload_folder"]
    assert calls[0][1]["token"] == "hf_test_token"
    assert calls[1][1]["exist_ok"] is True and calls[1][1]["private"] is True
    assert Path(calls[2][1]["folder_path"]) == release["out"]
    assert "*.bin" not in calls[2][1]["allow_patterns"] and "*.safetensors" in calls[2][1]["allow_patterns"]


def test_resolve_model_path(release, tmp_path):
    assert hub.resolve_model_path(str(release["out"])) == release["out"].resolve()
    with pytest.raises(BrainFMInputError, match="no such model folder"):
        hub.resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(BrainFMInputError, match="org-that-does-not-exist/model.*could not be fetched"):
        hub.resolve_model_path("org-that-does-not-exist/model")  # HF_HUB_OFFLINE=1: fails at once, one line


def test_cli_release_and_failed_push(release, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from brainfm.cli import main

    out = tmp_path / "rel"
    rc = main(["release", "--model", str(release["model_dir"]), "--out", str(out), "--metrics",
               str(release["metrics_path"]), "--shards", str(release["shards"]), "--repo-id", "org/tiny"])
    assert rc == 0 and (out / "model_index.json").is_file()
    assert "org/tiny" in (out / "README.md").read_text()
    before = _digest(out)

    def no_token(*args, **kwargs):
        raise OSError("Invalid user token")

    monkeypatch.setattr(huggingface_hub.ModelCard, "validate", lambda self, repo_type=None: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_token)
    capsys.readouterr()
    rc = main(["release", "--model", str(release["model_dir"]), "--out", str(out), "--metrics",
               str(release["metrics_path"]), "--shards", str(release["shards"]), "--repo-id", "org/tiny",
               "--push", "--private"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "push failed" in err and "intact" in err
    assert (out / "model_index.json").is_file()
    assert _digest(out) == before  # the rebuild is byte-identical, and the refused push touched nothing


def test_generic_metrics_json_is_flattened_without_curves_or_protocol():
    metrics = {"protocol": {"fpr": 0.01}, "a": {"b": 1, "ok": True, "curve": [0.5, 0.25], "nan": float("nan")},
               "d": "x"}
    assert hub.card_metric_values(metrics) == {"a/b": 1.0}


def test_release_with_fine_tuned_head(release, tmp_path):
    from huggingface_hub import metadata_load

    from brainfm.models.heads import LesionHead

    head = LesionHead(spatial_dims=2, channels=(4, 8), diseases=("ms",))
    head_dir = tmp_path / "head"
    head.save_pretrained(head_dir)
    (head_dir / "metrics.json").write_text(json.dumps({"dice": {"ms": 0.31, "any": 0.42}, "n_subjects": 6}))
    out = tmp_path / "rel"
    summary = hub.build_release(release["model_dir"], out, metrics_path=release["metrics_path"], head_dir=head_dir)
    index = json.loads((out / "model_index.json").read_text())
    assert index["heads"] == ["brainfm.models.heads", "LesionHead"]
    assert summary.parameters["heads"] == sum(p.numel() for p in head.parameters())
    loaded = hub.load_heads(out)["heads"]
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in head.state_dict().items())
    card = metadata_load(out / "heads" / "README.md")
    values = {m["type"]: m["value"] for m in card["model-index"][0]["results"][0]["metrics"]}
    assert values == {"dice/ms": 0.31, "dice/any": 0.42, "n_subjects": 6.0}
    assert "fine-tuned head" in (out / "heads" / "README.md").read_text()
    hub.validate_release(out)
