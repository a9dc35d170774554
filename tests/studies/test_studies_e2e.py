"""``brainfm study`` end to end at tiny size (4 mm grid, a handful of subjects, 4 training steps): the numbers mean
nothing; what must hold is the protocol — selection reads the validation anatomy only, the chosen setting is the
validation-best, the test report exists once, and the pooling arms get the same budget per contrast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from brainfm.cli import main
from brainfm.studies import common
from brainfm.studies.common import choose, make_study_settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # shards of 13 scans: 1-8 min on a loaded box
REPO = Path(__file__).resolve().parents[2]
# the cohort of tests/test_demo_3d.py with its site-adaptation subjects (the demo_data fixture synthesises and shards
# it once; no study reads them)
TINY_DEMO = {
    "n_train": 3, "n_val": 4, "n_val_lesion": 2, "n_test_healthy": 2, "n_test_lesion": 2,
    "lesion_kinds": ["tumour", "stroke"],
    "protocols": [["T1"]],  # one contrast: the demo's default scans every subject in four
    "data_config": str(REPO / "configs/data/tiny.yaml"), "pretrain_config": str(REPO / "configs/pretrain/tiny-2d.yaml"),
    "vae_steps": 4, "ldm_steps": 4, "pretrain": {"train": {"sample_every": 0, "checkpoint_every": 4}},
    "reconstruction": {"t_star": [0.3], "num_inference_steps": 4, "seeds": [0], "batch_size": 64},
}
TINY = {"demo": {**TINY_DEMO, "n_adapt": 3}, "bootstrap_resamples": 100, "t_star": [0.3, 0.6], "inference_steps": [4],
        "ensemble_sizes": [1], "guidance_scales": [0.0, 1.0], "priors": ["affine", "none"],
        "normalisations": ["voxelwise", "global"]}


@pytest.fixture(scope="module")
def studies(tmp_path_factory, demo_data):
    """ablate then priors in one folder (they share its base model), recording every split the studies read."""
    root = tmp_path_factory.mktemp("study")
    settings = root / "tiny.yaml"
    settings.write_text(yaml.safe_dump(TINY))
    demo_data(root / "out" / "base", make_study_settings(settings_path=settings)[1])  # the base's cohort and shards
    reads: list[str] = []
    original = common.cases_from_shards

    def spy(pipeline, shards, split, failures):
        reads.append(split)
        return original(pipeline, shards, split, failures)

    common.cases_from_shards = spy
    try:
        codes = {name: main(["study", name, "--out", str(root / "out"), "--settings", str(settings)])
                 for name in ("ablate", "priors")}
    finally:
        common.cases_from_shards = original
    return codes, root / "out", settings, reads


def _validation_best(rows: dict, target: float = 0.01, factor: float = 3.0) -> str:
    return choose(rows, target, factor)[0]


def test_selection_never_reads_the_test_split(studies):
    codes, _, _, reads = studies
    assert codes == {"ablate": 0, "priors": 0}
    assert reads and set(reads) <= {"train", "val"}


def test_ablation_chooses_the_validation_best_and_reports_test_once(studies):
    _, out, _, _ = studies
    validation = json.loads((out / "ablate" / "validation.json").read_text())
    assert validation["split"] == "val"
    for step in validation["path"]:  # each factor's choice is the best of its own candidates
        assert step["chosen"] == _validation_best({n: validation["rows"][n] for n in step["candidates"]})
    assert validation["chosen"] == validation["path"][-1]["chosen"]
    test = json.loads((out / "ablate" / "test.json").read_text())
    assert test["chosen_setting"] == validation["chosen_setting"]
    assert set(test["rows"]) == {"ldm", "vae_baseline", "intensity_baseline", "atlas_baseline"}
    assert isinstance(test["verdict"]["healthy_fpr"]["answer"], bool)
    stored = json.loads((out / "ablate" / "model" / "model_index.json").read_text())["reconstruction"]
    assert stored["t_star"] == validation["chosen_setting"]["t_star"]  # the frozen setting is the model's
    markdown = (out / "ablate" / "test.md").read_text(encoding="utf-8")
    assert "SIMULATED" in markdown and "tumour: the LDM" in markdown


def test_priors_compares_every_source_and_normalisation_on_validation_only(studies):
    _, out, _, _ = studies
    table = json.loads((out / "priors" / "priors.json").read_text())
    assert set(table["rows"]) == {f"{s} / {n}" for s in TINY["priors"] for n in TINY["normalisations"]}
    assert table["chosen"] == _validation_best(table["rows"])
    assert set(table["baselines"]) == {"intensity_baseline", "atlas_baseline"}
    for source in ("none",):
        index = json.loads((out / "priors" / source / "shards" / "index.json").read_text())
        assert set(index["splits"]) == {"train", "val"}  # the test anatomy is not even copied
        assert not list((out / "priors" / source / "shards").glob("test-*"))
    rows = table["rows"]
    assert rows["none / voxelwise"]["auprc"] is not None and rows["affine / global"]["fpr"] is not None


def test_a_study_folder_refuses_other_settings(studies, tmp_path):
    _, out, _, _ = studies
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**TINY, "t_star": [0.5]}))
    assert main(["study", "ablate", "--out", str(out), "--settings", str(other)]) == 2


def test_pooling_gives_both_arms_the_same_budget_per_contrast(tmp_path):
    settings = tmp_path / "pool.yaml"
    settings.write_text(yaml.safe_dump({"demo": {**TINY_DEMO, "n_train": 2, "n_val_lesion": 0},
                                        "bootstrap_resamples": 100, "pooling_modalities": ["T1", "FLAIR"]}))
    assert main(["study", "pooling", "--out", str(tmp_path / "out"), "--settings", str(settings)]) == 0
    folder = tmp_path / "out" / "pooling"
    table = json.loads((folder / "pooling.json").read_text())
    pooled, t1, flair = (table["budgets"][k] for k in ("pooled", "T1", "FLAIR"))
    assert pooled["ldm_steps"] == 2 * t1["ldm_steps"] == 2 * flair["ldm_steps"] == 8
    assert pooled["ldm_slices_per_contrast"] == t1["ldm_slices_per_contrast"] == flair["ldm_slices_per_contrast"]
    for modality in ("T1", "FLAIR"):
        index = json.loads((folder / modality / "shards" / "index.json").read_text())
        assert all(found == [modality] for found in index["modalities"].values())  # its own contrast only
        ran = yaml.safe_load((folder / modality / "runs" / "ldm" / "config.yaml").read_text())
        assert ran["optim"]["max_steps"] == 4
    rows = table["rows"]
    for scope in ("T1", "FLAIR", "all contrasts"):
        assert {f"{scope}: pooled LDM", f"{scope}: per-contrast LDM", f"{scope}: atlas_baseline"} <= set(rows)
        assert rows[f"{scope}: pooled LDM"]["n_lesion_subjects"] == rows[f"{scope}: per-contrast LDM"][
            "n_lesion_subjects"]  # the same test scans
    assert table["answer"].startswith("Pooling")
