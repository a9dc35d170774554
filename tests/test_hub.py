"""Release folders: layout, safetensors only, card values equal metrics.json, validation, push failure paths."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from brainfm import hub, safety
from brainfm.io import BrainFMInputError
from brainfm.pipeline import BrainFMPipeline


@pytest.fixture(scope="module")
def release(tiny_model_folder, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("hub") / "release"
    pipeline = BrainFMPipeline.from_pretrained(tiny_model_folder["model_dir"])
    summary = hub.build_release(pipeline, out, metrics_path=tiny_model_folder["metrics_path"],
                                shards_dir=tiny_model_folder["shards"], repo_id="org/brainfm-tiny")
    return {**tiny_model_folder, "out": out, "summary": summary}


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_release_layout_is_diffusers_and_safetensors_only(release):
    out = release["out"]
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "BrainFMPipeline"
    assert index["vae"] == ["brainfm.models.vae", "BrainVAE"]
    assert index["unet"] == ["brainfm.models.unet", "LatentUNet"]
    assert index["conditioner"] == ["brainfm.models.conditioning", "Conditioner"]
    assert index["noise_scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["head"] == [None, None]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in safety.PICKLE_SUFFIXES + safety.CODE_SUFFIXES]
    assert {p.suffix for p in files} <= set(safety.ALLOWED_SUFFIXES)
    for name in ("vae", "unet", "conditioner"):
        assert (out / name / "diffusion_pytorch_model.safetensors").is_file()
        assert (out / name / "config.json").is_file()
    assert (out / "calibration" / "calibration.safetensors").is_file()
    # weights in the release are bit-identical to the run's own models
    for name in ("vae", "unet", "conditioner"):
        loaded = safety.load_component(out / name)
        original = release["components"][name].state_dict()
        assert set(loaded.state_dict()) == set(original)
        assert all(torch.equal(loaded.state_dict()[k], original[k]) for k in original)
    assert safety.load_component(out / "noise_scheduler").config.num_train_timesteps == 100
    assert release["summary"].parameters["unet"] == sum(p.numel() for p in release["components"]["unet"].parameters())
    assert not list(out.parent.glob(".release.*"))  # the temporary build folder was renamed, not left behind


def test_model_index_carries_recipe_vocabulary_calibration_version(release):
    config = json.loads((release["out"] / "model_index.json").read_text())
    from brainfm.version import __version__

    assert config["brainfm_version"] == __version__
    source = json.loads((release["model_dir"] / "model_index.json").read_text())
    assert config["recipe"] == source["recipe"]  # the model's own recipe and settings, verbatim
    assert config["recipe"]["params"]["spacing"] == [8.0, 8.0, 8.0]
    assert config["reconstruction"] == source["reconstruction"] and config["reconstruction"]["t_star"] == [0.3]
    assert config["modalities"] == ["T1"]
    assert config["conditioning_vocabulary"]["sites"] == ["siteA", "siteB"]
    assert config["conditioning_vocabulary"]["modalities"] == ["T1", "T2", "FLAIR", "PD", "CT"]
    stored = json.loads((release["model_dir"] / "calibration" / "calibration.json").read_text())
    assert config["calibration_info"]["threshold"] == stored["threshold"] > 0
    assert config["calibration_info"]["config"]["target_fpr"] == 0.05
    assert config["calibration_info"]["arrays"] == ["calibration/calibration.safetensors"]
    # the calibration is shipped with its checksum intact
    from brainfm.anomaly.normative import NormativeCalibration

    assert NormativeCalibration.load(release["out"] / "calibration").threshold == stored["threshold"]
    assert json.loads((release["out"] / "training_data.json").read_text())["splits"]["train"]["n_samples"] == 3


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
    # a short list of headline metrics, not every sub-metric (those are in the tables and metrics.json)
    # (subject AUROC is not computed from 2 lesion vs 2 healthy scans: fewer than 10 per class)
    assert set(card_values) == {"overall/auprc_pooled", "overall/auroc_pooled", "overall/dice_mean",
                                "healthy/fp_rate_pooled"}
    assert metrics["overall"]["subject_auroc"] is None
    assert card_values["overall/auprc_pooled"] == metrics["overall"]["auprc_pooled"]
    assert card_values["healthy/fp_rate_pooled"] == metrics["healthy"]["fp_rate_pooled"]
    for name, value in card_values.items():
        *path, key = name.split("/")
        node = metrics
        for part in path:
            node = node[part]
        assert node[key] == value, name
    assert ModelCard.load(card_path).data.eval_results[0].metric_value == metrics["overall"]["auprc_pooled"]
    assert hub.card_metrics(card_path) == card_values

    text = card_path.read_text(encoding="utf-8")
    # real values, not invented: counts from index.json, parameters counted from the models, compute unrecorded
    total = sum(sum(p.numel() for p in c.parameters()) for k, c in release["components"].items()
                if k != "noise_scheduler")
    assert f"Total parameters: {total:,}" in text
    # training data counted in the shards' index.json: 4 subjects, 2 datasets, 2 modalities
    assert "| train | 3 | 3 | 1 |" in text and "| val | 1 | 1 | 1 |" in text and "| subjects | 4 |" in text
    assert "brainfm-synth-lesion (1 samples), brainfm-synth-healthy (3 samples)" in text
    assert "| modalities | T1: 3, CT: 1 |" in text
    assert "| training |" + " not recorded |" * 6 in text
    assert "Not a medical device" in text and "**simulated** lesions" in text
    auprc = metrics["overall"]["auprc_pooled"]
    low, high = metrics["overall"]["ci"]["auprc_pooled"]
    assert f"| brainfm | overall | 4 | {auprc:.4f} [{low:.4f}, {high:.4f}] |" in text  # with its 95 % interval
    fp = metrics["healthy"]
    assert f"| brainfm | 2 | {fp['fp_rate_pooled']:.4f} | {fp['fp_rate_per_scan_mean']:.4f} |" in text
    assert "- Post-processing: median filter 3 vox; brain mask eroded by 1 vox" in text  # protocol from report.md
    assert f"z > {metrics['calibrated_threshold']:.4f}" in text
    assert 'BrainFMPipeline.from_pretrained("org/brainfm-tiny")' in text
    assert "{{" not in text and "{%" not in text and "\n# brainfm-tiny\n" in text


def test_card_counts_come_from_index_json_not_the_shards(release, tmp_path):
    """The card's data facts come from index.json alone (this shard folder has no tar to open); an index of an
    older shard format is refused in one line that says to rebuild, never summarised from its tar files."""
    assert not list(release["shards"].glob("*.tar"))
    pipeline = BrainFMPipeline.from_pretrained(release["model_dir"])
    old = release["write_index"](tmp_path / "shards")
    index = json.loads((old / "index.json").read_text())
    (old / "index.json").write_text(json.dumps({**index, "format": "brainfm-shards/1"}))
    with pytest.raises(BrainFMInputError) as caught:
        hub.build_release(pipeline, tmp_path / "rel", metrics_path=release["metrics_path"], shards_dir=old)
    message = str(caught.value)
    assert "index.json" in message and "rebuild the shards" in message and "\n" not in message
    assert not (tmp_path / "rel").exists()


def test_training_compute_is_read_from_the_run_loss_logs(release, tmp_path):
    run = tmp_path / "run"  # the pretraining run's own loss logs: the VAE's with wall clock, the LDM's without
    for stage, records in (("vae", [{"step": 1, "time": 100.0}, {"step": 120, "time": 135.5}]),
                           ("ldm", [{"step": s, "losses": {"mse": 0.5}} for s in (1, 2, 300)])):
        (run / stage / "logs").mkdir(parents=True)
        (run / stage / "logs" / "losses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pipeline = BrainFMPipeline.from_pretrained(release["model_dir"])
    pipeline.register_to_config(provenance={"source_run": str(run)})
    hub.build_release(pipeline, tmp_path / "rel", metrics_path=release["metrics_path"])
    text = (tmp_path / "rel" / "README.md").read_text(encoding="utf-8")
    assert "| vae | 120 | 35.5 s |" + " not recorded |" * 4 in text
    assert "| ldm | 300 |" + " not recorded |" * 5 in text
    assert "Split counts: not recorded" in text  # no shard folder given: said so, nothing invented
    assert "| modalities | T1 (trained modalities; counts not recorded) |" in text


def test_training_compute_from_compute_json_and_from_the_model_folder(release, tmp_path):
    """The trainer's compute.json gives steps, wall time, throughput, setup and hardware; a record carried in the
    model folder's provenance wins over the run folder (which a released model may no longer have)."""
    hardware = {"machines": 4, "processes": 32, "gpus": 32, "gpu_models": ["NVIDIA H100 80GB HBM3"],
                "cpu_models": ["AMD EPYC 9654"], "cpu_cores_per_machine": [192], "hosts": ["a", "b", "c", "d"]}
    record = {"task": "pretrain-ldm", "world_size": 32, "precision": "bf16", "distributed_type": "DEEPSPEED",
              "global_batch": 128, "hardware": hardware, "steps": 3000, "samples": 384000, "wall_time_s": 7300.0,
              "train_time_s": 7000.0, "steps_per_s": 3000 / 7000, "samples_per_s": 384000 / 7000,
              "sessions": [{}, {}]}
    run = tmp_path / "run"
    (run / "ldm").mkdir(parents=True)
    (run / "ldm" / "compute.json").write_text(json.dumps(record))
    pipeline = BrainFMPipeline.from_pretrained(release["model_dir"])
    pipeline.register_to_config(provenance={"source_run": str(run)})
    hub.build_release(pipeline, tmp_path / "rel", metrics_path=release["metrics_path"])
    text = (tmp_path / "rel" / "README.md").read_text(encoding="utf-8")
    row = ("| ldm | 3000 (2 sessions) | 7300 s (2.03 h) | 0.429 | 54.9 | 32 process(es), DEEPSPEED, precision bf16, "
           "global batch 128 | 4 machines; 32 x NVIDIA H100 80GB HBM3; CPU AMD EPYC 9654 (192 cores per machine) |")
    compute_section = text.split("## Training compute", 1)[1].split("\n## ", 1)[0]
    assert row in compute_section
    assert "| vae |" not in compute_section  # the VAE stage left nothing: no row is invented for it

    carried = {**record, "steps": 10, "sessions": 1}
    pipeline.register_to_config(provenance={"source_run": str(run), "training_compute": {"ldm": carried}})
    hub.build_release(pipeline, tmp_path / "rel2", metrics_path=release["metrics_path"])
    assert "| ldm | 10 | 7300 s (2.03 h) |" in (tmp_path / "rel2" / "README.md").read_text(encoding="utf-8")


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
    shutil.rmtree(folder / "noise_scheduler")
    with pytest.raises(BrainFMInputError, match="scheduler: component folder missing"):
        hub.validate_release(folder)


def test_validation_refuses_pickle_weights(release, tmp_path):
    folder = _copy_release(release, tmp_path)
    torch.save({"w": torch.ones(2)}, folder / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(BrainFMInputError, match=r"diffusion_pytorch_model\.bin.*pickle"):
        hub.validate_release(folder)


@pytest.mark.parametrize("shard", ["notes.txt", "../unet/diffusion_pytorch_model.safetensors", "missing.safetensors"])
def test_weight_index_may_only_name_safetensors_files_of_its_own_folder(release, tmp_path, shard):
    """The probe's reproducer: a weight index whose weight_map points at a pickle (named notes.txt) loaded the
    pickle. Such a folder is refused by validation and by the loader, and nothing is unpickled."""
    folder = _copy_release(release, tmp_path)
    vae = folder / "vae"
    state = safety.load_component(vae).state_dict()
    (vae / "diffusion_pytorch_model.safetensors").unlink()
    if shard == "notes.txt":
        torch.save(state, vae / shard)
    index = {"metadata": {"total_size": 0}, "weight_map": dict.fromkeys(state, shard)}
    (vae / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    expected = r"notes\.txt: unexpected file type \.txt" if shard == "notes.txt" else "weight_map entry"
    with pytest.raises(BrainFMInputError, match=expected):
        hub.validate_release(folder)
    with pytest.raises(BrainFMInputError, match=expected):
        BrainFMPipeline.from_pretrained(folder)


def test_weight_index_of_a_pickle_format_is_refused(release, tmp_path):
    folder = _copy_release(release, tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(BrainFMInputError, match="non-safetensors format"):
        BrainFMPipeline.from_pretrained(folder)


def test_hub_download_allow_list_holds_only_the_folder_format():
    assert set(safety.HUB_ALLOW_PATTERNS) == {"*.json", "*.safetensors", "*.md"}
    assert ".brainfm-files.json" in safety.HUB_IGNORE_PATTERNS


def test_validation_refuses_card_without_metrics(release, tmp_path):
    folder = _copy_release(release, tmp_path)
    text = (folder / "README.md").read_text(encoding="utf-8")
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
    pipeline = BrainFMPipeline.from_pretrained(release["model_dir"])
    with pytest.raises(BrainFMInputError, match="no numeric metrics"):
        hub.build_release(pipeline, out, metrics_path=bad_metrics)
    assert not out.exists() and not list(tmp_path.glob(".rel.*"))


def test_release_refuses_pickle_in_model_dir(release, tmp_path, capsys):
    from brainfm.cli import main

    model_dir = tmp_path / "model"
    shutil.copytree(release["model_dir"], model_dir)
    torch.save({"w": torch.ones(1)}, model_dir / "calibration" / "stats.pt")
    code = main(["release", "--model", str(model_dir), "--out", str(tmp_path / "rel"), "--metrics",
                 str(release["metrics_path"])])
    err = capsys.readouterr().err
    assert code == 2 and "stats.pt" in err and "pickle" in err and err.count("\n") == 1
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
    # the pipeline's own push_to_hub builds, validates and uploads a release the same way
    calls.clear()
    pipeline = BrainFMPipeline.from_pretrained(release["model_dir"])
    url = pipeline.push_to_hub("org/brainfm-tiny", metrics_path=release["metrics_path"])
    assert url.endswith("/commit/abc") and [c[0] for c in calls] == ["init", "create_repo", "upload_folder"]


def test_resolve_model_path(release, tmp_path):
    assert safety.resolve_model_path(str(release["out"])) == release["out"].resolve()
    with pytest.raises(BrainFMInputError, match="no such model folder"):
        safety.resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(BrainFMInputError, match="org-that-does-not-exist/model.*could not be fetched"):
        safety.resolve_model_path("org-that-does-not-exist/model")  # HF_HUB_OFFLINE=1: fails at once, one line


def test_cli_release_and_failed_push(release, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from brainfm.cli import main

    out = tmp_path / "rel"
    rc = main(["release", "--model", str(release["model_dir"]), "--out", str(out), "--metrics",
               str(release["metrics_path"]), "--shards", str(release["shards"]), "--repo-id", "org/tiny"])
    assert rc == 0 and (out / "model_index.json").is_file()
    assert "org/tiny" in (out / "README.md").read_text(encoding="utf-8")
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


def test_release_never_deletes_the_model_or_a_users_files(release, tmp_path, capsys):
    """The probe's reproducers: `release --out DIR` deleted everything in DIR, and `--out` the model's parent
    deleted the source model. Both are refused with one line, nothing touched."""
    from brainfm.cli import main

    parent = tmp_path / "work"
    shutil.copytree(release["model_dir"], parent / "model")
    (parent / "notes.md").write_text("mine")
    before = _digest(parent)
    for out in (parent, parent / "model"):
        code = main(["release", "--model", str(parent / "model"), "--out", str(out), "--metrics",
                     str(release["metrics_path"])])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
    assert _digest(parent) == before


def test_generic_metrics_json_is_flattened_without_curves_or_protocol():
    metrics = {"protocol": {"fpr": 0.01}, "a": {"b": 1, "ok": True, "curve": [0.5, 0.25], "nan": float("nan")},
               "d": "x"}
    assert hub.card_metric_values(metrics) == {"a/b": 1.0}


def test_release_with_fine_tuned_head(release, tmp_path):
    from huggingface_hub import metadata_load

    from brainfm.models.heads import LesionHead

    head = LesionHead(spatial_dims=2, channels=(4, 8), diseases=("ms",))
    run = tmp_path / "head-run"
    head.save_pretrained(run / "head")
    (run / "head_config.json").write_text(json.dumps({"threshold": 0.7, "target_fpr": 0.01, "lora": False}))
    (run / "metrics.json").write_text(json.dumps({"dice": {"ms": 0.31, "any": 0.42}, "n_subjects": 6}))
    out = tmp_path / "rel"
    pipeline = BrainFMPipeline.from_pretrained(release["model_dir"]).load_head(run)
    summary = hub.build_release(pipeline, out, metrics_path=release["metrics_path"],
                                head_metrics_path=run / "metrics.json")
    index = json.loads((out / "model_index.json").read_text())
    assert index["head"] == ["brainfm.models.heads", "LesionHead"]
    assert index["head_settings"]["threshold"] == 0.7  # the calibrated threshold ships with the head
    assert summary.parameters["head"] == sum(p.numel() for p in head.parameters())
    loaded = safety.load_component(out / "head")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in head.state_dict().items())
    card = metadata_load(out / "head" / "README.md")
    values = {m["type"]: m["value"] for m in card["model-index"][0]["results"][0]["metrics"]}
    assert values == {"dice/ms": 0.31, "dice/any": 0.42, "n_subjects": 6.0}
    assert "fine-tuned head" in (out / "head" / "README.md").read_text(encoding="utf-8")
    hub.validate_release(out)
    assert BrainFMPipeline.from_pretrained(out).head_predictor().threshold == 0.7


def test_card_templates_are_package_data(tmp_path):
    """A wheel carries the card templates inside the package (brainfm/model_cards), so an installed copy
    renders cards as an editable one does: build the wheel and read the templates out of it."""
    import subprocess
    import sys
    import zipfile

    repo = Path(__file__).resolve().parents[1]
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "brainfm", "model_cards"):
        copy = shutil.copytree if (repo / name).is_dir() else shutil.copy2
        copy(repo / name, source / name, **({"symlinks": True} if copy is shutil.copytree else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("brainfm-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for template in ("foundation", "head"):
            member = f"brainfm/model_cards/{template}.md"
            assert member in names
            assert archive.read(member).decode() == (repo / "model_cards" / f"{template}.md").read_text(encoding="utf-8")
    assert hub.template_text("foundation") == (repo / "model_cards" / "foundation.md").read_text(encoding="utf-8")
