"""The site adaptation's before/after numbers: pooled and per lesion kind, from two evaluations of the same
test scans, and the README table ``brainfm report tables`` writes from them."""

from __future__ import annotations

import copy
import json
import shutil

from brainfm.cli import main
from brainfm.evaluation.adaptation import before_after, before_after_line, evaluation_summary

RECORD = {"split": {"n_adapt_scans": 12, "n_check_scans": 4, "adapt_subjects": ["a0", "a1", "a2"],
                    "check_subjects": ["a3"]},
          "healthy_fp_rate": {"before": 0.0412, "after": 0.0066}, "steps": 0, "target_fpr": 0.01}


def _after(metrics: dict) -> dict:
    """The same evaluation with other per-kind and pooled numbers (what a recalibration changes)."""
    after = copy.deepcopy(metrics)
    after["overall"]["lesion_sensitivity"] = 0.25
    for section in after["by_lesion_type"].values():
        section["lesion_sensitivity"] = 0.75
        section["ci"]["lesion_sensitivity"] = [0.5, 1.0]
    return after


def test_before_after_compares_every_lesion_kind_beside_the_pooled_numbers(tiny_model_folder) -> None:
    before = tiny_model_folder["metrics"]
    after = _after(before)
    compared = before_after(before, after)
    kinds = sorted(before["by_lesion_type"])
    assert kinds == ["simulated-tumour"]
    entry = compared["by_lesion_type/simulated-tumour/lesion_sensitivity"]
    assert entry["before"] == before["by_lesion_type"]["simulated-tumour"]["lesion_sensitivity"]
    assert entry["after"] == 0.75 and entry["after_ci"] == [0.5, 1.0]
    assert entry["label"] == "lesion-wise sensitivity, simulated-tumour"
    assert compared["overall/fp_lesions_per_scan"]["before"] == before["overall"]["fp_lesions_per_scan"]
    summary = evaluation_summary({"ldm": after})  # what `brainfm adapt --eval` records
    assert summary["by_lesion_type/simulated-tumour/lesion_sensitivity"] == 0.75
    assert summary["overall/lesion_sensitivity"] == 0.25
    line = before_after_line({"record": RECORD, "test": compared, "seconds": 77})
    assert "lesion-wise sensitivity" in line and "simulated-tumour" not in line  # one line: pooled numbers only
    assert "its chance level" in line and "overall/" not in line  # every number named in words


def test_report_tables_appends_the_adaptation_table_from_adaptation_json(tiny_model_folder, tmp_path,
                                                                           capsys) -> None:
    report = tmp_path / "report"
    report.mkdir()
    shutil.copy(tiny_model_folder["metrics_path"], report / "metrics.json")
    before = tiny_model_folder["metrics"]
    summary = {"record": RECORD, "model": "model-adapted", "seconds": 77,
               "test": before_after(before, _after(before))}
    (report / "adaptation.json").write_text(json.dumps(summary))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- brainfm:results:begin -->\nOLD-TABLES\n<!-- brainfm:results:end -->\nafter\n")
    assert main(["report", "tables", "--metrics", str(report / "metrics.json"), "--readme", str(readme)]) == 0
    text = readme.read_text(encoding="utf-8")
    assert "OLD-TABLES" not in text and text.startswith("intro\n") and text.endswith("after\n")
    assert "### Site adaptation to the held-out anatomy" in text
    tumour = before["by_lesion_type"]["simulated-tumour"]["lesion_sensitivity"]
    assert f"| test scans | lesion-wise sensitivity, simulated-tumour | {tumour:.3f}" in text
    assert "| 0.750 [0.500, 1.000] |" in text and "| 0.0412 | 0.0066 |" in text
    assert "adaptation.json" in capsys.readouterr().out

    (report / "adaptation.json").write_text(json.dumps({"test": {}}))  # not an adaptation summary
    assert main(["report", "tables", "--metrics", str(report / "metrics.json")]) == 2
    assert "adaptation.json: not a demo's adaptation.json" in capsys.readouterr().err
