"""``brainfm demo --quick`` end to end with an even tinier override (4 mm grid, a handful of subjects, 4 steps).

The numbers of such a run mean nothing; what must hold is that every stage runs, ONE pooled model (here MRI and
CT: every subject scanned with T1 and CT) is trained, calibrated and evaluated on every modality, the report and
metrics exist with finite values for every method, pooled and per modality, and a second run finds every stage
complete and changes nothing.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import pytest
import yaml

from brainfm.cli import main

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "n_train": 3, "n_val": 2, "n_val_lesion": 1, "n_test_healthy": 1, "n_test_lesion": 2,
    "n_adapt": 3,  # site adaptation to the held-out anatomy: 2 scans to recalibrate on, 1 held-out check subject
    "adapt_steps": 2,  # LoRA steps before the recalibration, as the default demo (which runs 300)
    "lesion_kinds": ["ms", "tumour"],  # the one validation lesion is MS: it chooses the small-lesion setting
    "protocols": [["T1", "CT"]],  # one pooled model of an MRI and a CT contrast (the default has four)
    "data_config": str(REPO / "configs/data/tiny.yaml"),  # paths in a settings file: relative to its folder
    "pretrain_config": str(REPO / "configs/pretrain/tiny-2d.yaml"),
    "vae_steps": 4, "ldm_steps": 4,
    "pretrain": {"train": {"sample_every": 0, "checkpoint_every": 4}},
    "reconstruction": {"t_star": [0.3], "num_inference_steps": 4, "seeds": [0], "batch_size": 64},
}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    import os

    import torch

    # tiny networks on shared cores: one intra-op thread; the env var tells the demo to leave threads alone
    previous, threads = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("demo")
    settings = root / "tiny.yaml"
    settings.write_text(yaml.safe_dump(TINY))
    out = root / "demo"
    try:
        code = main(["demo", "--out", str(out), "--quick", "--settings", str(settings)])
    finally:
        torch.set_num_threads(threads)
        if previous is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = previous
    return code, out, settings


def test_demo_writes_report_and_finite_metrics_for_every_method(demo_run):
    code, out, _ = demo_run
    assert code == 0
    report = (out / "report" / "report.md").read_text(encoding="utf-8")
    assert "## Protocol" in report and "ldm" in report and "vae_baseline" in report
    assert "Circularity check" in report and "normative atlas" in report and "[95% CI]" in report
    assert (out / "report" / "pr_curves.png").stat().st_size > 1000
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    methods = {"ldm", "vae_baseline", "intensity_baseline", "atlas_baseline", "prior_fit_check"}
    assert set(metrics) == methods | {"ldm_site_adapted"}  # the adaptation stage's result joins them
    for name, result in ((name, metrics[name]) for name in methods):
        overall = result["overall"]
        assert overall["n_lesion_volumes"] == 4 and overall["n_subjects"] == 2  # 2 subjects x (T1, CT)
        assert {r["modality"] for r in result["per_volume"]} == {"T1", "CT"}
        assert set(result["by_modality"]) == {"T1", "CT"}
        for entry in result["by_modality"].values():  # each modality's own scans, metrics and intervals
            assert entry["overall"]["n_lesion_volumes"] == 2 and entry["healthy"]["n_scans"] == 1
            auprc = entry["overall"]["auprc_pooled"]
            assert 0.0 < auprc <= 1.0 and entry["overall"]["ci"]["auprc_pooled"][0] <= auprc
            assert set(entry["by_lesion_type"]) == {"tumour", "ms"}
            assert 0.0 <= entry["healthy"]["fp_rate_pooled"] <= 1.0
        for key in ("auprc_pooled", "auroc_pooled", "dice_oracle"):
            assert overall[key] is not None and math.isfinite(overall[key]) and 0.0 <= overall[key] <= 1.0
        low, high = overall["ci"]["auprc_pooled"]
        assert low <= overall["auprc_pooled"] <= high
        assert set(result["by_lesion_type"]) == {"tumour", "ms"}
        healthy = result["healthy"]
        assert healthy["n_scans"] == 2 and 0.0 <= healthy["fp_rate_pooled"] <= 1.0
        assert overall["subject_auroc"] is None and "not computed" in overall["subject_auroc_note"]
        # unfiltered beside filtered, and the small-lesion setting chosen on the one MS validation scan
        variants = result["postprocessing_variants"]
        assert variants["unfiltered"]["settings"]["median_filter_size"] == 1
        chosen = variants["small_lesion"]["settings"]["chosen_on"]
        # the one MS validation subject: both contrasts for the pooled models, one per modality for the baselines
        assert chosen["lesion_types"] == ["ms"] and chosen["n_scans"] == (2 if name in ("ldm", "vae_baseline") else 1)
    assert json.loads((out / "model" / "metrics.json").read_text()) == {k: metrics[k] for k in methods}
    calibration = json.loads((out / "model" / "model_index.json").read_text())["calibration_info"]
    assert calibration["n_scans"] == 4 and math.isfinite(calibration["threshold"])  # 2 healthy x (T1, CT)
    assert calibration["baselines"]["methods"]["atlas_baseline"] == ["CT", "T1"]
    assert calibration["baselines"]["n_atlas_scans"] == 6  # the training scans
    report = (out / "report" / "report.md").read_text(encoding="utf-8")
    assert "Per modality" in report and "| CT | LDM |" in report and "| T1 | LDM |" in report
    index = json.loads((out / "model" / "model_index.json").read_text())
    assert sorted(index["modalities"]) == ["CT", "T1"]  # one model serves both
    for stage in ("vae", "ldm"):  # each run's saved config records the steps it ran (tiny-2d.yaml says 6)
        run_dir = out / "runs" / stage
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["max_steps"] == 4
        assert len((run_dir / "logs" / "losses.jsonl").read_text().splitlines()) == 4
    run = json.loads((out / "report" / "run.json").read_text())
    assert set(run["timings_s"]) == {"cohort", "shards", "pretrain vae", "pretrain ldm", "calibration", "evaluation",
                                     "site adaptation"}
    assert run["dims"] == 2 and set(run["peak_rss_mb"]) == set(run["timings_s"])
    assert all(100 < mb < 8000 for mb in run["peak_rss_mb"].values())  # MB of the demo process, per stage


def test_demo_splits_are_disjoint_by_subject_and_the_test_anatomy_is_held_out(demo_run):
    """Training, calibration/validation and test sets share no subject, in the cohort's manifest and in the shards
    the stages read; the test anatomy appears in no other split."""
    from brainfm.data.writer import load_index

    _, out, _ = demo_run
    with (out / "cohort" / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    splits = ("train", "val", "test", "adapt")
    subjects = {split: {r["subject"] for r in rows if r["split"] == split} for split in splits}
    anatomies = {split: {r["anatomy"] for r in rows if r["split"] == split} for split in splits}
    assert all(subjects.values()) and sum(len(v) for v in subjects.values()) == len({r["subject"] for r in rows})
    assert all(not subjects[a] & subjects[b] for i, a in enumerate(splits) for b in splits[i + 1:])
    assert anatomies["test"] == anatomies["adapt"] == {"pydeface"}  # the site adaptation's scans: held-out anatomy
    assert not anatomies["test"] & (anatomies["train"] | anatomies["val"])
    index = load_index(out / "shards")
    keys = {split: {k for shard in index["splits"][split] for k in shard["keys"]} for split in ("train", "val", "test")}
    owner = {r["subject"]: r["split"] for r in rows}
    for split, split_keys in keys.items():
        assert split_keys and all(owner[next(s for s in owner if key.startswith(s))] == split for key in split_keys)
    assert len({r["subject"] for r in json.loads((out / "report" / "metrics.json").read_text())["ldm"]["per_volume"]}
               ) == len(subjects["test"])


def test_demo_adapts_to_the_held_out_anatomy_and_reports_before_and_after(demo_run):
    """The site-adaptation stage recalibrates on the 'adapt' split's healthy scans of the test anatomy (checked on
    another of its subjects), evaluates the same test scans again, and reports both: the adapted model's own
    threshold, the before/after numbers taken from the two evaluations, a report section and the adapted folder."""
    from brainfm.pipeline import BrainFMPipeline

    _, out, _ = demo_run
    with (out / "cohort" / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    adapt_rows: dict[str, list[dict[str, str]]] = {}  # subject -> its scans (T1 and CT)
    for r in rows:
        if r["split"] == "adapt":
            adapt_rows.setdefault(r["subject"], []).append(r)
    test_subjects = {r["subject"] for r in rows if r["split"] == "test"}
    summary = json.loads((out / "report" / "adaptation.json").read_text())
    record = summary["record"]
    assert record["split"]["n_adapt_scans"] == 4 and record["split"]["n_check_scans"] == 2  # subjects x (T1, CT)
    used = record["split"]["adapt_subjects"] + record["split"]["check_subjects"]
    assert sorted(used) == sorted(adapt_rows) and not set(used) & test_subjects
    for scan in record["scans"]["adapt"] + record["scans"]["check"]:
        assert scan["sha256"] in {hashlib.sha256((out / "cohort" / r["path"]).read_bytes()).hexdigest()
                                  for r in adapt_rows[scan["subject"]]}
    assert record["steps"] == 2 and record["lora"] is True and record["lora_rank"] == 4  # LoRA, then recalibration

    before, adapted = BrainFMPipeline.from_pretrained(out / "model"), BrainFMPipeline.from_pretrained(
        out / "model-adapted")
    assert adapted.calibration.n_scans == 4 and adapted.config.adaptation == record
    assert before.unet_lora is None and adapted.unet_lora is not None  # the adapters travel with the adapted model
    assert adapted.calibration.threshold != before.calibration.threshold
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    after = metrics["ldm_site_adapted"]
    assert after["calibrated_threshold"] == pytest.approx(adapted.calibration.threshold)
    assert metrics["ldm"]["calibrated_threshold"] == pytest.approx(before.calibration.threshold)
    assert {r["subject"] for r in after["per_volume"]} == {r["subject"] for r in metrics["ldm"]["per_volume"]}
    assert json.loads((out / "model-adapted" / "metrics.json").read_text()) == {"ldm": after}
    # the small-lesion post-processing chosen on the validation MS scan carries over, its threshold recalibrated
    chosen, kept = (m["postprocessing_variants"]["small_lesion"]["settings"] for m in (metrics["ldm"], after))
    assert kept["variant"] == chosen["variant"] and "carried_over" in kept["chosen_on"]
    assert kept["chosen_on"]["lesion_types"] == ["ms"] and kept["threshold"] != chosen["threshold"]
    compared = summary["test"]
    kinds = set(metrics["ldm"]["by_lesion_type"])
    assert kinds and set(compared) == {"overall/dice_pooled", "overall/dice_mean", "overall/lesion_sensitivity",
                                       "overall/lesion_sensitivity_chance", "overall/lesion_sensitivity_at_fp_0.01",
                                       "overall/lesion_sensitivity_at_fp_0.05", "overall/fp_lesions_per_scan",
                                       "overall/auprc_pooled", "healthy/fp_rate_pooled"} | {
        f"by_lesion_type/{kind}/{name}" for kind in kinds
        for name in ("lesion_sensitivity", "lesion_sensitivity_chance", "lesion_sensitivity_at_fp_0.01",
                     "dice_pooled")}
    assert all(0.0 <= compared["overall/lesion_sensitivity_chance"][when] <= 1.0 for when in ("before", "after"))
    # matched operating points: both models' thresholds flag the same share of the test healthy scans
    matched = [m["matched_fp"] for m in (metrics["ldm"], after)]
    assert matched[0]["rates"] == matched[1]["rates"] == [0.01, 0.05]
    for points in matched:
        assert all(0.0 < f <= r for f, r in zip(points["healthy_fp_rate"], points["rates"], strict=True))
    assert all(0.0 <= compared[f"overall/lesion_sensitivity_at_fp_{r}"][when] <= 1.0
               for r in ("0.01", "0.05") for when in ("before", "after"))
    for key, entry in compared.items():
        *path, name = key.split("/")
        section_before, section_after = metrics["ldm"], after
        for part in path:
            section_before, section_after = section_before[part], section_after[part]
        assert entry["before"] == section_before[name] and entry["after"] == section_after[name]
        assert entry["before_ci"] == section_before["ci"].get(name)
    low, high = compared["overall/auprc_pooled"]["after_ci"]
    assert low <= compared["overall/auprc_pooled"]["after"] <= high
    fp = record["healthy_fp_rate"]
    assert set(fp["after_per_scan"]) == {s["name"] for s in record["scans"]["check"]}
    report = (out / "report" / "report.md").read_text(encoding="utf-8")
    assert report.count("## Site adaptation to the held-out anatomy") == 1 and "## Protocol" in report
    assert f"| {fp['before']:.4f} | {fp['after']:.4f} |" in report


def test_demo_rerun_skips_complete_stages_and_refuses_other_settings(demo_run, capsys, tmp_path):
    code, out, settings = demo_run
    metrics_before = (out / "report" / "metrics.json").read_bytes()
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--quick", "--settings", str(settings)]) == 0
    printed = capsys.readouterr().out
    for stage in ("cohort", "shards", "pretrain vae", "pretrain ldm", "calibration", "evaluation", "site adaptation"):
        assert f"[demo] {stage}: complete, skipped" in printed
    assert (out / "report" / "metrics.json").read_bytes() == metrics_before
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**TINY, "seed": 1}))
    assert main(["demo", "--out", str(out), "--quick", "--settings", str(other)]) == 2
    assert "other settings" in capsys.readouterr().err


def test_default_demo_pools_mri_and_ct_and_every_modality_can_be_calibrated():
    from brainfm.config import DemoSettings
    from brainfm.demo import make_settings

    for quick in (False, True):
        settings = make_settings(quick=quick)
        assert {"T1", "T2", "FLAIR", "CT"} <= {m for p in settings.protocols for m in p}
    # protocols cycle over subjects: 3 validation subjects give T1 two healthy scans and CT one, too few to calibrate
    with pytest.raises(ValueError, match=r"at least 2 healthy validation scans of every modality.*\['CT'\]"):
        DemoSettings(n_val=3, protocols=(("T1",), ("CT",)))
    assert DemoSettings(n_val=4, protocols=(("T1",), ("CT",))).n_val == 4
    with pytest.raises(ValueError, match="distinct modalities"):
        DemoSettings(protocols=(("T1", "T1"),))


def test_pooled_model_guidance_on_off_changes_the_reconstruction_of_each_modality(demo_run):
    """The demo's one model, on a test scan of each modality: classifier-free guidance off (scale 0, the
    unconditional path) and on (3) give reconstructions that differ from the conditional one (scale 1)."""
    import torch

    from brainfm.anomaly.evaluate import cases_from_shards
    from brainfm.pipeline import BrainFMPipeline

    _, out, _ = demo_run
    pipeline = BrainFMPipeline.from_pretrained(out / "model")
    cases = {}
    for case in cases_from_shards(pipeline, out / "shards", "test", []):
        cases.setdefault(case.meta["modality"], case)
    assert set(cases) == {"T1", "CT"}
    for modality, case in cases.items():
        image, anatomy = torch.from_numpy(case.image)[None], torch.from_numpy(case.anatomy)
        recon = {scale: pipeline.reconstructor(guidance_scale=scale).reconstruct(image, anatomy, case.meta)[0]
                 for scale in (0.0, 1.0, 3.0)}
        brain = torch.from_numpy(case.mask)[None]
        for scale in (0.0, 3.0):
            assert float(((recon[scale] - recon[1.0]).abs() * brain).max()) > 1e-3, (modality, scale)


def test_training_stages_leave_a_core_to_their_loader_workers_and_the_others_take_every_core(monkeypatch):
    from types import SimpleNamespace

    from brainfm import demo

    ctx = SimpleNamespace(pretrain=SimpleNamespace(data=SimpleNamespace(num_workers=1)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    assert [demo.stage_threads(ctx, s) for s in ("pretrain vae", "pretrain ldm")] == [1, 1]
    assert [demo.stage_threads(ctx, s) for s in ("cohort", "calibration", "evaluation", "site adaptation")] == [2] * 4
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's setting wins
    assert demo.stage_threads(ctx, "evaluation") is None
