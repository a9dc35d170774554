"""BrainFMPipeline: the model folder's one owner. A release loads (folder or cached Hub id) into the same outputs as
the model folder it came from, a fine-tuned head travels with its threshold and LoRA adapters, and loading never
runs code found in the folder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from brainfm import hub, safety
from brainfm.io import BrainFMInputError, save_nifti
from brainfm.pipeline import BrainFMPipeline

EVIL_CODE = "from pathlib import Path\nPath({marker!r}).write_text('executed')\nclass EvilPipeline: pass\n"


@pytest.fixture(scope="module")
def built(tiny_model_folder, tmp_path_factory, mni_t1_2mm) -> dict:
    root = tmp_path_factory.mktemp("pipeline")
    out = root / "release"
    hub.build_release(BrainFMPipeline.from_pretrained(tiny_model_folder["model_dir"]), out,
                      metrics_path=tiny_model_folder["metrics_path"], shards_dir=tiny_model_folder["shards"],
                      repo_id="org/brainfm-tiny")
    scan = root / "mni_t1.nii.gz"
    volume = np.asarray(mni_t1_2mm.get_fdata(), dtype=np.float32)
    save_nifti(volume, mni_t1_2mm.affine, scan)
    return {"root": root, "model_dir": tiny_model_folder["model_dir"], "components": tiny_model_folder["components"],
            "release": out, "scan": scan, "volume": volume, "affine": mni_t1_2mm.affine}


def _reference(model_dir, scan):
    """What the model folder itself gives through the per-scan core."""
    model = BrainFMPipeline.from_pretrained(model_dir)
    prepared = model.prepare(scan, "T1")
    return model.analyse(prepared.scan.image, prepared.scan.mask, prepared.anatomy, prepared.meta), prepared


def test_release_outputs_equal_the_model_folder(built):
    pipe = BrainFMPipeline.from_pretrained(built["release"])
    assert pipe.model_dir == built["release"].resolve() and pipe.modalities == ("T1",)
    assert set(pipe.components) == {"vae", "unet", "conditioner", "noise_scheduler", "head"}
    assert pipe.head is None and pipe.head_predictor() is None
    out = pipe(str(built["scan"]), modality="T1")
    reference, prepared = _reference(built["model_dir"], built["scan"])
    assert np.array_equal(out.pseudo_healthy, reference.reconstruction)
    assert np.array_equal(out.z_map, reference.zmap)
    assert np.array_equal(out.mask, reference.mask)
    assert out.score == reference.subject_score and out.threshold == reference.threshold
    assert np.array_equal(out.affine, prepared.scan.affine) and out.z_map.shape == (24, 28, 24)
    assert out.head_probability is None and out.head_mask is None
    # the maps are real: a reconstruction inside the brain that differs from the input, finite z, a calibrated cut
    brain = prepared.scan.mask > 0
    assert np.isfinite(out.z_map).all() and out.pseudo_healthy[brain].std() > 0
    assert not np.allclose(out.pseudo_healthy[brain], prepared.scan.image[brain])
    assert out.mask.dtype == np.uint8 and set(np.unique(out.mask)) <= {0, 1}
    stored = json.loads((built["model_dir"] / "calibration" / "calibration.json").read_text())
    assert out.threshold == stored["threshold"]
    # an in-memory volume with its affine gives the same answer as the file
    from_array = pipe(built["volume"], modality="T1", affine=built["affine"])
    assert np.array_equal(from_array.z_map, out.z_map) and from_array.score == out.score


def test_save_and_load_round_trip_bitwise(built, tmp_path):
    pipe = BrainFMPipeline.from_pretrained(built["model_dir"])
    again = BrainFMPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "copy"))
    for name in ("vae", "unet", "conditioner"):
        original, loaded = built["components"][name].state_dict(), getattr(again, name).state_dict()
        assert set(original) == set(loaded) and all(torch.equal(original[k], loaded[k]) for k in original)
    assert dict(again.noise_scheduler.config) == dict(pipe.noise_scheduler.config)
    assert again.recipe == pipe.recipe and again.reconstruction == pipe.reconstruction
    assert again.calibration.threshold == pipe.calibration.threshold
    assert np.array_equal(again.calibration.std_map, pipe.calibration.std_map)
    keys = {k: v for k, v in again.config.items() if not k.startswith("_")}
    assert keys == {k: v for k, v in pipe.config.items() if not k.startswith("_")}


def test_mixed_or_tampered_calibration_is_refused(built, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(built["model_dir"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["calibration_info"]["threshold"] = 0.1
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(BrainFMInputError, match="calibration files do not match model_index.json"):
        BrainFMPipeline.from_pretrained(folder)
    index["calibration_info"] = None
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(BrainFMInputError, match="calibration files present but model_index.json records none"):
        BrainFMPipeline.from_pretrained(folder)


def test_array_input_needs_an_affine_and_finite_values(built):
    pipe = BrainFMPipeline.from_pretrained(built["release"])
    volume = np.zeros((8, 8, 8), dtype=np.float32)
    with pytest.raises(BrainFMInputError, match="needs its 4x4 voxel-to-world affine"):
        pipe(volume)
    volume[0, 0, 0] = np.nan
    with pytest.raises(BrainFMInputError, match="NaN"):
        pipe(volume, affine=np.eye(4))
    with pytest.raises(BrainFMInputError, match="modality CT is not one this model was trained on"):
        pipe(str(built["scan"]), modality="CT")


def _head_run(built, folder, lora_scale: float):
    """A head training run folder: a head on UNet features, its settings (threshold) and moved LoRA adapters."""
    import copy

    from brainfm.config import DeviationConfig, to_dict
    from brainfm.models.heads import LesionHead, add_lora, save_lora

    torch.manual_seed(3)
    head = LesionHead(spatial_dims=2, channels=(4, 8), feature_channels=8, disease_mode="none")
    head.save_pretrained(folder / "head")
    adapted = add_lora(copy.deepcopy(built["components"]["unet"]), rank=2, alpha=4.0)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(std=lora_scale, generator=torch.Generator().manual_seed(len(name)))
    save_lora(adapted, folder / "lora")
    settings = {"threshold": 0.52, "target_fpr": 0.01, "feature_timestep": 5, "lora": True,
                "deviation": to_dict(DeviationConfig(mask_erosion_vox=1, min_component_vox=2))}
    (folder / "head_config.json").write_text(json.dumps(settings))
    return folder


def test_release_with_a_head_runs_it_with_its_threshold_and_lora(built, tmp_path):
    """`release --head` ships the head with its calibrated threshold and LoRA adapters (it used to drop both),
    and the released pipeline computes exactly what the training run's head computes."""
    run = _head_run(built, tmp_path / "run", lora_scale=0.5)
    with_run = BrainFMPipeline.from_pretrained(built["model_dir"]).load_head(run)
    expected = with_run(str(built["scan"]), modality="T1")
    hub.build_release(with_run, tmp_path / "rel", metrics_path=built["model_dir"].parent / "report" / "metrics.json")
    assert (tmp_path / "rel" / "head_lora" / "adapter_model.safetensors").is_file()
    released = BrainFMPipeline.from_pretrained(tmp_path / "rel")
    predictor = released.head_predictor()
    assert predictor.threshold == 0.52 and predictor.features is not None
    out = released(str(built["scan"]), modality="T1")
    assert np.array_equal(out.head_probability, expected.head_probability)
    assert np.array_equal(out.head_mask, expected.head_mask)
    brain = _reference(built["model_dir"], built["scan"])[1].scan.mask > 0
    assert out.head_probability[~brain].max() == 0 and 0 < out.head_probability[brain].min()
    assert not (out.head_mask.astype(bool) & (out.head_probability <= 0.52)).any()  # masked only above threshold
    # the head's adapters live on a copy: the pipeline's own UNet (and so the z-map) is untouched
    assert not any("lora" in k for k in released.unet.state_dict())
    plain = BrainFMPipeline.from_pretrained(built["model_dir"])(str(built["scan"]), modality="T1")
    assert np.array_equal(out.z_map, plain.z_map)
    # and the adapters matter: the same head without them predicts something else
    without = _head_run(built, tmp_path / "run0", lora_scale=0.0)
    baseline = BrainFMPipeline.from_pretrained(built["model_dir"]).load_head(without)
    assert not np.allclose(baseline(str(built["scan"]), modality="T1").head_probability, out.head_probability)


def test_loading_never_executes_code_from_the_folder(built, tmp_path):
    marker = tmp_path / "marker.txt"
    folder = tmp_path / "evil"
    shutil.copytree(built["release"], folder)
    code = EVIL_CODE.format(marker=str(marker))
    for name in ("pipeline.py", "__init__.py", "unet/evil.py"):
        (folder / name).write_text(code)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "EvilPipeline"
    index["unet"] = ["evil", "EvilPipeline"]  # diffusers would import unet/evil.py for this
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(BrainFMInputError, match=r"code file in a model folder"):
        BrainFMPipeline.from_pretrained(folder)
    with pytest.raises(BrainFMInputError):
        BrainFMPipeline.from_pretrained(folder, trust_remote_code=True)
    for name in ("pipeline.py", "__init__.py", "unet/evil.py"):
        (folder / name).unlink()
    with pytest.raises(BrainFMInputError, match="custom pipelines are refused"):
        BrainFMPipeline.from_pretrained(folder)
    index["_class_name"] = "BrainFMPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(BrainFMInputError, match="evil.EvilPipeline is not a brainfm or diffusers class"):
        BrainFMPipeline.from_pretrained(folder)
    index["unet"] = ["os", "system"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(BrainFMInputError, match="os.system is not a brainfm or diffusers class"):
        BrainFMPipeline.from_pretrained(folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    index["unet"] = ["brainfm.models.unet", "LatentUNet"]
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "_class_name": "Evil"}))
    with pytest.raises(BrainFMInputError, match="unknown component class 'Evil'"):
        BrainFMPipeline.from_pretrained(folder)
    assert not marker.exists()


def test_repo_id_loads_from_the_offline_cache_only(built, tmp_path, monkeypatch):
    import huggingface_hub

    cache = tmp_path / "hub"
    repo = cache / "models--org--brainfm-tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(built["release"], repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert safety.resolve_model_path("org/brainfm-tiny") == repo / "snapshots" / commit
    pipe = BrainFMPipeline.from_pretrained("org/brainfm-tiny")
    assert pipe.modalities == ("T1",)
    # `brainfm detect --model ORG/NAME` resolves through the same path
    assert pipe.model_dir == repo / "snapshots" / commit
    with pytest.raises(BrainFMInputError, match="org/not-cached.*could not be fetched"):
        BrainFMPipeline.from_pretrained("org/not-cached")
