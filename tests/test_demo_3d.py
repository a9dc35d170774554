"""``brainfm demo --dims 3``: the settings it composes, the refusal of a 2D training config under 3D settings, and
(slow) the whole demo end to end with the tiny 3D configs on a handful of subjects."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from brainfm.cli import main
from brainfm.demo import make_settings, run_demo
from brainfm.io import BrainFMInputError

REPO = Path(__file__).resolve().parents[1]

# the cohort of tests/studies/test_studies_e2e.py (the demo_data fixture synthesises and shards it once)
TINY_3D = {
    "n_train": 3, "n_val": 4, "n_val_lesion": 2, "n_test_healthy": 2, "n_test_lesion": 2, "n_adapt": 3,
    "lesion_kinds": ["tumour", "stroke"], "dims": 3,
    "protocols": [["T1"]],  # one contrast: the demo's default scans every subject in four
    "data_config": str(REPO / "configs/data/tiny.yaml"),
    "pretrain_config": str(REPO / "configs/pretrain/tiny-3d.yaml"),
    "vae_steps": 4, "ldm_steps": 4,
    "pretrain": {"train": {"sample_every": 0, "checkpoint_every": 4}},
    "reconstruction": {"t_star": [0.3], "num_inference_steps": 4, "seeds": [0], "batch_size": 64},
}


def test_dims_3_selects_the_3d_config_under_the_quick_preset_and_a_settings_file(tmp_path: Path) -> None:
    full, quick, two = make_settings(dims=3), make_settings(quick=True, dims=3), make_settings(quick=True)
    assert full.dims == quick.dims == 3 and two.dims == 2
    assert Path(full.pretrain_config).name == Path(quick.pretrain_config).name == "demo-3d.yaml"
    assert Path(two.pretrain_config).name == "demo-2d.yaml"
    assert (full.vae_steps, full.ldm_steps, quick.vae_steps, quick.ldm_steps) == (500, 800, 40, 40)
    # the same cohort and test scans in 2D and 3D: only the models differ
    assert {k: v for k, v in vars(quick).items() if k not in ("dims", "pretrain_config")} == {
        k: v for k, v in vars(two).items() if k not in ("dims", "pretrain_config")}
    settings = tmp_path / "three.yaml"
    settings.write_text(yaml.safe_dump({"dims": 3, "n_train": 5}))
    from_file = make_settings(settings_path=settings)
    assert from_file.dims == 3 and Path(from_file.pretrain_config).name == "demo-3d.yaml" and from_file.n_train == 5
    with pytest.raises(BrainFMInputError, match=r"says dims: 3 but --dims 2 was given"):
        make_settings(settings_path=settings, dims=2)


def test_3d_settings_with_a_2d_training_config_are_refused_before_anything_is_written(tmp_path: Path,
                                                                                        capsys) -> None:
    settings = tmp_path / "mixed.yaml"
    settings.write_text(yaml.safe_dump({**TINY_3D, "pretrain_config": str(REPO / "configs/pretrain/tiny-2d.yaml")}))
    with pytest.raises(BrainFMInputError, match="trains 2D models but the demo settings say dims: 3"):
        run_demo(tmp_path / "demo", quick=True, settings_path=settings)
    assert list((tmp_path / "demo").iterdir()) == []
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quick", "--dims", "3", "--settings", str(settings)]) == 2
    assert "trains 2D models" in capsys.readouterr().err


@pytest.mark.slow
def test_the_3d_demo_runs_every_stage_with_3d_models(tmp_path: Path, monkeypatch, demo_data) -> None:
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    settings = tmp_path / "tiny3d.yaml"
    settings.write_text(yaml.safe_dump(TINY_3D))
    demo_data(tmp_path / "demo", make_settings(quick=True, settings_path=settings, dims=3))  # cohort and shards
    try:
        assert main(["demo", "--out", str(tmp_path / "demo"), "--quick", "--dims", "3", "--settings",
                     str(settings)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "demo"
    for stage in ("vae", "ldm"):
        assert yaml.safe_load((out / "runs" / stage / "config.yaml").read_text())["data"]["mode"] == "3d"
    model_index = json.loads((out / "model" / "model_index.json").read_text())
    assert model_index["reconstruction"]["batch_size"] == 64
    unet = json.loads((out / "model" / "unet" / "config.json").read_text())
    assert unet["spatial_dims"] == 3
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    for result in metrics.values():
        overall = result["overall"]
        assert overall["n_lesion_volumes"] == 2
        assert 0.0 <= overall["auprc_pooled"] <= 1.0 and math.isfinite(overall["dice_oracle"])
    report = (out / "report" / "report.md").read_text(encoding="utf-8")
    assert '"method": "ldm", "spatial_dims": 3' in report and '"method": "vae", "spatial_dims": 3' in report
    run = json.loads((out / "report" / "run.json").read_text())
    assert run["dims"] == 3 and "3D models on whole volumes" in run["description"]
    # every stage after the cohort and its shards (the demo_data fixture's, by the same stage functions) ran here
    assert set(run["timings_s"]) == {"pretrain vae", "pretrain ldm", "calibration", "evaluation", "site adaptation"}
    assert set(run["peak_rss_mb"]) == set(run["timings_s"]) and all(v > 50 for v in run["peak_rss_mb"].values())
