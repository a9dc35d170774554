"""``brainfm demo --quick`` end to end with an even tinier override (4 mm grid, a handful of subjects, 4 steps).

The numbers of such a run mean nothing; what must hold is that every stage runs, the report and metrics exist with
finite values for both methods, and a second run finds every stage complete and changes nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from brainfm.cli import main

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "n_healthy": 6, "n_lesion": 2, "n_val": 2, "n_test_healthy": 1,
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


def test_demo_writes_report_and_finite_metrics_for_both_methods(demo_run):
    code, out, _ = demo_run
    assert code == 0
    report = (out / "report" / "report.md").read_text()
    assert "## Protocol" in report and "ldm" in report and "vae_baseline" in report
    assert (out / "report" / "pr_curves.png").stat().st_size > 1000
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert set(metrics) == {"ldm", "vae_baseline"}
    for result in metrics.values():
        overall = result["overall"]
        assert overall["n_lesion_volumes"] == 2
        for key in ("auprc_pooled", "auroc_pooled", "dice_oracle"):
            assert overall[key] is not None and math.isfinite(overall[key]) and 0.0 <= overall[key] <= 1.0
        assert set(result["by_lesion_type"]) == {"tumour", "ms"}
        healthy = result["healthy"]
        assert healthy["n_scans"] == 1 and 0.0 <= healthy["fp_rate_pooled"] <= 1.0
    assert json.loads((out / "model" / "metrics.json").read_text()) == metrics
    calibration = json.loads((out / "model" / "model_index.json").read_text())["calibration_info"]
    assert calibration["n_scans"] == 2 and math.isfinite(calibration["threshold"])
    for stage in ("vae", "ldm"):  # each run's saved config records the steps it ran (tiny-2d.yaml says 6)
        run_dir = out / "runs" / stage
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["max_steps"] == 4
        assert len((run_dir / "logs" / "losses.jsonl").read_text().splitlines()) == 4


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
