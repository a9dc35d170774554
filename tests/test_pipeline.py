"""BrainFMPipeline: a release loads (folder or cached Hub id) into the same outputs as the run's own models, and
loading never runs code found in the folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_hub import make_model_dir, write_evaluation, write_shards

from brainfm import hub
from brainfm.io import BrainFMInputError, save_nifti

EVIL_CODE = "from pathlib import Path\nPath({marker!r}).write_text('executed')\nclass EvilPipeline: pass\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory, mni_t1_2mm) -> dict:
    root = tmp_path_factory.mktemp("pipeline")
    model_dir, _ = make_model_dir(root)
    write_evaluation(root / "report")
    out = root / "release"
    hub.build_release(model_dir, out, metrics_path=root / "report" / "metrics.json",
                      shards_dir=write_shards(root / "shards"), repo_id="org/brainfm-tiny")
    scan = root / "mni_t1.nii.gz"
    volume = np.asarray(mni_t1_2mm.get_fdata(), dtype=np.float32)
    save_nifti(volume, mni_t1_2mm.affine, scan)
    return {"root": root, "model_dir": model_dir, "release": out, "scan": scan, "volume": volume,
            "affine": mni_t1_2mm.affine}


def _reference(model_dir: Path, scan: Path):
    """What the run's own model folder gives through the anomaly module directly."""
    from brainfm.anomaly.pipeline import analyse, load_model_dir, prepare_scan

    model = load_model_dir(model_dir, device="cpu")
    prepared = prepare_scan(model, scan, "T1")
    return analyse(model, prepared.scan.image, prepared.scan.mask, prepared.anatomy, prepared.meta), prepared


def test_release_outputs_equal_the_run_models(built):
    from brainfm import BrainFMPipeline

    pipe = BrainFMPipeline.from_pretrained(built["release"])
    assert pipe.model_dir == built["release"].resolve() and pipe.modalities == ("T1",)
    assert set(pipe.components) == {"vae", "unet", "conditioner", "scheduler"}
    out = pipe(str(built["scan"]), modality="T1")
    reference, prepared = _reference(built["model_dir"], built["scan"])
    assert np.array_equal(out.pseudo_healthy, reference.reconstruction)
    assert np.array_equal(out.z_map, reference.zmap)
    assert np.array_equal(out.mask, reference.mask)
    assert out.score == reference.subject_score and out.threshold == reference.threshold
    assert np.array_equal(out.affine, prepared.scan.affine) and out.z_map.shape == (24, 28, 24)
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


def test_array_input_needs_an_affine_and_finite_values(built):
    from brainfm import BrainFMPipeline

    pipe = BrainFMPipeline.from_pretrained(built["release"])
    volume = np.zeros((8, 8, 8), dtype=np.float32)
    with pytest.raises(BrainFMInputError, match="needs its 4x4 voxel-to-world affine"):
        pipe(volume)
    volume[0, 0, 0] = np.nan
    with pytest.raises(BrainFMInputError, match="NaN"):
        pipe(volume, affine=np.eye(4))
    with pytest.raises(BrainFMInputError, match="modality CT is not one this model was trained on"):
        pipe(str(built["scan"]), modality="CT")


def test_loading_never_executes_code_from_the_folder(built, tmp_path):
    from brainfm import BrainFMPipeline

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

    from brainfm import BrainFMPipeline

    cache = tmp_path / "hub"
    repo = cache / "models--org--brainfm-tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(built["release"], repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert hub.resolve_model_path("org/brainfm-tiny") == repo / "snapshots" / commit
    pipe = BrainFMPipeline.from_pretrained("org/brainfm-tiny")
    assert pipe.modalities == ("T1",)
    from brainfm.anomaly.pipeline import load_model_dir

    # `brainfm detect --model ORG/NAME` resolves through the same path
    assert load_model_dir("org/brainfm-tiny", device="cpu").path == repo / "snapshots" / commit
    with pytest.raises(BrainFMInputError, match="org/not-cached.*could not be fetched"):
        BrainFMPipeline.from_pretrained("org/not-cached")
