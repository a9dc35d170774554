"""The studies' building blocks on small arrays: the selection rule, the validation halves, deformable priors, the
pooling budget, the verdicts and the settings (seconds, no training)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml

from brainfm.anomaly.evaluate import EvalCase
from brainfm.io import BrainFMInputError
from brainfm.studies.ablate import FACTORS, candidates, headline_verdict, setting_name
from brainfm.studies.common import (
    choose,
    make_study_settings,
    markdown_table,
    separation_note,
    tissue_regions,
    validation_sets,
)
from brainfm.studies.pooling import POOLED, arm_context, budget, pooling_answer
from brainfm.studies.priors import deformable_priors

REPO = Path(__file__).resolve().parents[2]


def test_choose_takes_the_best_auprc_among_candidates_within_the_fpr_limit():
    rows = {"a": {"auprc": 0.9, "fpr": 0.05}, "b": {"auprc": 0.6, "fpr": 0.02}, "c": {"auprc": 0.7, "fpr": 0.03},
            "d": {"auprc": 0.5, "fpr": None}}
    chosen, rule = choose(rows, target_fpr=0.01, factor=3.0)
    assert chosen == "c"  # "a" is better but flags 5 % of healthy voxels (> 3 x 1 %)
    assert "3 x 0.01" in rule


def test_choose_falls_back_to_the_lowest_fpr_and_breaks_ties_by_order():
    rows = {"a": {"auprc": 0.9, "fpr": 0.2}, "b": {"auprc": 0.1, "fpr": 0.05}}
    assert choose(rows, 0.01, 3.0)[0] == "b"
    tied = {"x": {"auprc": 0.5, "fpr": 0.01}, "y": {"auprc": 0.5, "fpr": 0.0}}
    assert choose(tied, 0.01, 3.0)[0] == "x"


def test_without_a_qualifying_candidate_fpr_intervals_that_overlap_the_lowest_leave_the_choice_to_auprc():
    """The full-size ablation's case: conditional and unconditional at the same FPR (0.032 vs 0.032, overlapping
    intervals), a quarter of the AUPRC without conditioning; a candidate whose FPR interval lies wholly above the
    lowest one's stays out however high its AUPRC."""
    rows = {"conditional": {"auprc": 0.252, "fpr": 0.0323, "fpr_ci": [0.027, 0.038]},
            "unconditional": {"auprc": 0.067, "fpr": 0.0320, "fpr_ci": [0.025, 0.038]},
            "loose": {"auprc": 0.9, "fpr": 0.064, "fpr_ci": [0.062, 0.067]}}
    chosen, rule = choose(rows, 0.01, 3.0)
    assert chosen == "conditional" and "interval" in rule
    assert choose({k: rows[k] for k in ("unconditional", "loose")}, 0.01, 3.0)[0] == "unconditional"


def _case(subject: str, modality: str = "T1", lesion: bool = False) -> EvalCase:
    mask = np.ones((4, 4, 4), bool)
    label = np.zeros((4, 4, 4), bool) if lesion else None
    if label is not None:
        label[1, 1, 1] = True
    return EvalCase(f"{subject}-{modality}", np.zeros((4, 4, 4), np.float32), mask, np.zeros((3, 4, 4, 4)),
                    {"modality": modality}, label, "tumour" if lesion else None, 0.027, subject)


def test_validation_sets_halve_the_healthy_subjects_per_modality_and_keep_every_lesion():
    cases = [_case(f"s{i}", m) for i in range(5) for m in ("T1", "FLAIR")] + [_case("L1", lesion=True)]
    sets = validation_sets(cases)
    calibrated = {c.subject for c in sets.calibration}
    held = {c.subject for c in sets.held_out}
    assert calibrated == {"s0", "s2", "s4"} and held == {"s1", "s3"}
    assert not calibrated & held  # the false-positive rate is measured on subjects never calibrated on
    assert len(sets.calibration) == 6 and len(sets.held_out) == 4  # both contrasts of each subject
    assert [c.name for c in sets.lesion] == ["L1-T1"]
    with pytest.raises(BrainFMInputError, match=">= 4 healthy validation subjects of T1"):
        validation_sets([_case(f"s{i}") for i in range(3)] + [_case("L", lesion=True)])


def test_tissue_regions_follow_the_scan_priors():
    case = _case("s0")
    case.anatomy[1, :2] = 0.8  # grey matter in the first half, white in the second, nothing in one voxel row
    case.anatomy[2, 2:] = 0.9
    case.anatomy[2, 3, 3] = 0.0
    regions = tissue_regions(case)
    assert (regions[:2] == 2).all() and (regions[2] == 3).all() and (regions[3, 3] == 1).all()


def test_deformable_priors_move_a_shifted_prior_onto_the_structure():
    """A prior displaced by 2 voxels from the bright structure it describes ends up closer to it."""
    grid = np.mgrid[0:32, 0:32, 0:32]
    distance = np.sqrt(((grid - 16.0) ** 2).sum(axis=0))
    image = np.where(distance < 8, 1.0, 0.3).astype(np.float32)
    mask = distance < 14
    shifted = np.sqrt(((grid - np.array([18.0, 16.0, 16.0])[:, None, None, None]) ** 2).sum(axis=0))
    prior = np.clip(8.5 - shifted, 0.0, 1.0).astype(np.float32)[None]
    truth = (distance < 8) & mask
    moved = deformable_priors(image, mask, prior)

    def error(p: np.ndarray) -> float:
        return float(np.abs(p[0] - truth)[mask].mean())

    assert moved.shape == prior.shape and moved.min() >= 0 and moved.max() <= 1
    assert error(moved) < 0.7 * error(prior)


def test_ablation_varies_one_factor_at_a_time():
    study, demo = make_study_settings(quick=True)
    current = demo.reconstruction
    for factor in FACTORS:
        options = candidates(study, factor, current)
        for option in options:
            changed = [f.name for f in dataclasses.fields(option) if getattr(option, f.name) != getattr(current,
                                                                                                   f.name)]
            assert changed in ([], [factor])
    assert [c.seeds for c in candidates(study, "seeds", current)] == [(0,), (0, 1)]
    assert setting_name(current) == "t* 0.4, 10 steps, 1 seed(s), guidance 1"


def test_pooled_and_per_contrast_arms_get_the_same_steps_times_batch_per_contrast(tmp_path):
    from brainfm.demo import make_context

    study, demo = make_study_settings(quick=True)
    base = make_context(tmp_path / "base", demo)
    pooled = arm_context(base, tmp_path / POOLED, base.shards, 2)
    single = arm_context(base, tmp_path / "T1", tmp_path / "T1" / "shards", 1)
    assert pooled.settings.ldm_steps == 2 * single.settings.ldm_steps == 2 * demo.ldm_steps
    assert pooled.settings.vae_steps == 2 * single.settings.vae_steps
    assert pooled.pretrain.data.batch_size == single.pretrain.data.batch_size
    assert single.pretrain.data.shard_dir == str(tmp_path / "T1" / "shards")
    assert budget(pooled, 2)["ldm_slices_per_contrast"] == budget(single, 1)["ldm_slices_per_contrast"]


def _metrics(auprc: float, ci: list[float] | None, fpr: float = 0.01) -> dict:
    group = {"auprc_pooled": auprc, "ci": {"auprc_pooled": ci}}
    return {"by_lesion_type": {"tumour": group, "stroke": group}, "healthy": {"fp_rate_pooled": fpr},
            "overall": group}


def test_headline_verdict_needs_non_overlapping_intervals_against_the_strongest_baseline():
    metrics = {"ldm": _metrics(0.6, [0.5, 0.7], fpr=0.02), "vae_baseline": _metrics(0.2, [0.1, 0.3]),
               "intensity_baseline": _metrics(0.4, [0.3, 0.49]), "atlas_baseline": _metrics(0.3, [0.2, 0.55])}
    verdict = headline_verdict(metrics, target_fpr=0.01, factor=3.0)
    assert verdict["tumour"]["strongest_baseline"] == "intensity_baseline"
    assert verdict["tumour"]["answer"] is True and verdict["healthy_fpr"]["answer"] is True
    metrics["intensity_baseline"] = _metrics(0.4, [0.3, 0.51])
    assert headline_verdict(metrics, 0.01, 3.0)["stroke"]["answer"] is False
    metrics["ldm"] = _metrics(0.6, [0.5, 0.7], fpr=0.04)
    assert headline_verdict(metrics, 0.01, 3.0)["healthy_fpr"]["answer"] is False


def test_pooling_answer_is_plain_about_overlap():
    def row(auprc, ci):
        return {"auprc": auprc, "auprc_ci": ci}

    rows = {"all contrasts: pooled LDM": row(0.5, [0.45, 0.55]), "all contrasts: per-contrast LDM": row(0.3, [0.2, 0.4]),
            "T1: pooled LDM": row(0.5, None), "T1: per-contrast LDM": row(0.3, None)}
    assert pooling_answer(rows, ("T1",)).startswith("Pooling helps")
    rows["all contrasts: per-contrast LDM"] = row(0.45, [0.35, 0.5])
    assert pooling_answer(rows, ("T1",)).startswith("Pooling makes no measurable difference")


def test_markdown_table_marks_the_chosen_row_and_prints_intervals():
    text = markdown_table({"a": {"auprc": 0.5, "auprc_ci": [0.4, 0.6]}, "b": {"auprc": None}},
                          [("AUPRC", "auprc")], "setting", chosen="a")
    assert "| **a** (chosen) | 0.500 [0.400, 0.600] |" in text and "| b | n/a |" in text


def test_study_settings_file_overrides_demo_and_refuses_too_few_validation_subjects(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"demo": {"n_val": 8}, "t_star": [0.2]}))
    study, demo = make_study_settings(quick=True, settings_path=path)
    assert demo.n_val == 8 and demo.vae_steps == 40 and study.t_star == (0.2,)
    path.write_text(yaml.safe_dump({"demo": {"n_val": 3}}))
    with pytest.raises(BrainFMInputError, match="n_val >= 4"):
        make_study_settings(settings_path=path)
    path.write_text(yaml.safe_dump({"pooling_modalities": ["T1"]}))
    with pytest.raises(Exception, match="pooling_modalities"):
        make_study_settings(settings_path=path)


def test_separation_note_says_when_the_choice_is_within_noise():
    rows = {"a": {"auprc_ci": [0.5, 0.7]}, "b": {"auprc_ci": [0.2, 0.4]}, "c": {"auprc_ci": [0.3, 0.55]}}
    assert "overlaps 1 of the 2 other" in separation_note(rows, "a")
    rows["c"]["auprc_ci"] = [0.3, 0.45]
    assert separation_note(rows, "a") == "Its pooled-AUPRC interval lies above every other candidate's."
