"""``brainfm demo --quick`` end to end with an even tinier override (4 mm grid, a handful of subjects, 4 steps).

The numbers of such a run mean nothing; what must hold is that every stage runs, the report and metrics exist with
finite values for both methods, and a second run finds every stage complete and changes nothing.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from brainfm.cli import main

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "n_train": 3, "n_val": 2, "n_val_lesion": 1, "n_test_healthy": 1, "n_test_lesion": 2,
    "lesion_kinds": ["ms", "tumour"],  # the one validation lesion is MS: it chooses the small-lesion setting
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
    report = (out / "report" / "report.md").read_text()
    assert "## Protocol" in report and "ldm" in report and "vae_baseline" in report
    assert "Circularity check" in report and "normative atlas" in report and "[95% CI]" in report
    assert (out / "report" / "pr_curves.png").stat().st_size > 1000
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert set(metrics) == {"ldm", "vae_baseline", "intensity_baseline", "atlas_baseline", "prior_fit_check"}
    for result in metrics.values():
        overall = result["overall"]
        assert overall["n_lesion_volumes"] == 2
        for key in ("auprc_pooled", "auroc_pooled", "dice_oracle"):
            assert overall[key] is not None and math.isfinite(overall[key]) and 0.0 <= overall[key] <= 1.0
        low, high = overall["ci"]["auprc_pooled"]
        assert low <= overall["auprc_pooled"] <= high
        assert set(result["by_lesion_type"]) == {"tumour", "ms"}
        healthy = result["healthy"]
        assert healthy["n_scans"] == 1 and 0.0 <= healthy["fp_rate_pooled"] <= 1.0
        assert overall["subject_auroc"] is None and "not computed" in overall["subject_auroc_note"]
        # unfiltered beside filtered, and the small-lesion setting chosen on the one MS validation scan
        variants = result["postprocessing_variants"]
        assert variants["unfiltered"]["settings"]["median_filter_size"] == 1
        chosen = variants["small_lesion"]["settings"]["chosen_on"]
        assert chosen["lesion_types"] == ["ms"] and chosen["n_scans"] == 1
    assert json.loads((out / "model" / "metrics.json").read_text()) == metrics
    calibration = json.loads((out / "model" / "model_index.json").read_text())["calibration_info"]
    assert calibration["n_scans"] == 2 and math.isfinite(calibration["threshold"])
    assert calibration["baselines"]["methods"]["atlas_baseline"] == ["T1"]
    assert calibration["baselines"]["n_atlas_scans"] == 3  # the training scans
    for stage in ("vae", "ldm"):  # each run's saved config records the steps it ran (tiny-2d.yaml says 6)
        run_dir = out / "runs" / stage
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["max_steps"] == 4
        assert len((run_dir / "logs" / "losses.jsonl").read_text().splitlines()) == 4
    run = json.loads((out / "report" / "run.json").read_text())
    assert set(run["timings_s"]) == {"cohort", "shards", "pretrain vae", "pretrain ldm", "calibration", "evaluation"}
    assert run["dims"] == 2 and set(run["peak_rss_mb"]) == set(run["timings_s"])
    assert all(100 < mb < 8000 for mb in run["peak_rss_mb"].values())  # MB of the demo process, per stage


def test_demo_splits_are_disjoint_by_subject_and_the_test_anatomy_is_held_out(demo_run):
    """Training, calibration/validation and test sets share no subject, in the cohort's manifest and in the shards
    the stages read; the test anatomy appears in no other split."""
    from brainfm.data.writer import load_index

    _, out, _ = demo_run
    with (out / "cohort" / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    subjects = {split: {r["subject"] for r in rows if r["split"] == split} for split in ("train", "val", "test")}
    anatomies = {split: {r["anatomy"] for r in rows if r["split"] == split} for split in ("train", "val", "test")}
    assert all(subjects.values()) and sum(len(v) for v in subjects.values()) == len({r["subject"] for r in rows})
    assert not (subjects["train"] & subjects["val"] or subjects["train"] & subjects["test"]
                or subjects["val"] & subjects["test"])
    assert anatomies["test"] == {"pydeface"} and not anatomies["test"] & (anatomies["train"] | anatomies["val"])
    index = load_index(out / "shards")
    keys = {split: {k for shard in index["splits"][split] for k in shard["keys"]} for split in ("train", "val", "test")}
    owner = {r["subject"]: r["split"] for r in rows}
    for split, split_keys in keys.items():
        assert split_keys and all(owner[next(s for s in owner if key.startswith(s))] == split for key in split_keys)
    assert len({r["subject"] for r in json.loads((out / "report" / "metrics.json").read_text())["ldm"]["per_volume"]}
               ) == len(subjects["test"])


def test_demo_rerun_skips_complete_stages_and_refuses_other_settings(demo_run, capsys, tmp_path):
    code, out, settings = demo_run
    metrics_before = (out / "report" / "metrics.json").read_bytes()
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--quick", "--settings", str(settings)]) == 0
    printed = capsys.readouterr().out
    for stage in ("cohort", "shards", "pretrain vae", "pretrain ldm", "calibration", "evaluation"):
        assert f"[demo] {stage}: complete, skipped" in printed
    assert (out / "report" / "metrics.json").read_bytes() == metrics_before
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**TINY, "seed": 1}))
    assert main(["demo", "--out", str(out), "--quick", "--settings", str(other)]) == 2
    assert "other settings" in capsys.readouterr().err
