"""`brainfm finetune semi|cross` end to end on the cached tiny feature set: the curve and the matrix contain the
numbers they claim (JSON re-read against Markdown), and --resume auto reuses finished runs."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from brainfm.cli import main
from brainfm.config import to_dict
from brainfm.evaluation.report import format_number, interval_text
from brainfm.finetune.reports import CURVE_COLUMNS, DIGITS, MATRIX_TABLES, matrix_markdown
from brainfm.finetune.run import run_cross, run_semi


def _table_rows(markdown: str) -> list[list[str]]:
    rows = []
    for line in markdown.splitlines():
        if line.startswith("|") and not re.match(r"^\|[-:|]+\|$", line.replace(" ", "")):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.fixture(scope="module")
def semi_run(feature_set, finetune_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("semi")
    feature_set.save(out / "features")
    config = finetune_config(out, semi={"labelled_counts": (0, 1, 10, "all")},
                                  optim={"max_steps": 2})
    return config, out, run_semi(config, output_dir=out, progress=False)


def test_curve_reports_the_numbers_it_claims(semi_run):
    config, out, payload = semi_run
    stored = json.loads((out / "curve.json").read_text())
    assert stored["points"] == json.loads(json.dumps(payload["points"]))
    pool = stored["labelled_pool_size"]
    assert pool == 4  # 2 training scans per kind after holding out the test scans
    assert [(p["n_labelled"], p["method"]) for p in stored["points"]] == [
        (0, "unsupervised"), (1, "head"), (1, "scratch"), (pool, "head"), (pool, "scratch")]
    # "10" is capped to the 4 labelled scans there are, the same run as "all": trained once, not refused
    assert [p.get("also_requested") for p in stored["points"][3:]] == [["all"], ["all"]]
    assert stored["points"][0]["dice"] == stored["unsupervised_reference"]["dice"]
    rows = _table_rows((out / "curve.md").read_text(encoding="utf-8"))
    assert rows[0] == ["labelled scans", "method", "Dice", "AUPRC", "lesion sensitivity", "FP lesions / scan",
                       "healthy FP rate", "threshold"]
    assert rows[1:] == [[str(p["n_labelled"]), p["method"],
                         *(interval_text(p[m], p[f"{m}_ci"], DIGITS) for m in CURVE_COLUMNS),
                         format_number(p["threshold"], DIGITS)] for p in stored["points"]]
    # every point: 2 lesion and 2 healthy test subjects, the healthy false-positive rate measured on the latter
    assert all((p["n_test_subjects"], p["n_healthy_test_subjects"]) == (2, 2) for p in stored["points"])
    assert all(0.0 <= p["fp_rate"] < 1.0 and p["fp_rate_ci"] is not None for p in stored["points"])
    assert "[" in rows[1][2]  # shown with its interval
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    # every trained head was calibrated on the healthy calibration scans only, never on test or training scans
    split = json.loads((out / "split.json").read_text())
    # calibration and test subjects: none the foundation model has seen, none shared with head training
    held_out = split["calibration"] + split["healthy_test"] + stored["test_scans"]
    assert set(stored["healthy_test_scans"]) == set(split["healthy_test"]) <= set(stored["test_scans"])
    assert not {split["subjects"][n] for n in held_out} & set(split["seen"]["cohort_subjects_seen"])
    assert split["seen"]["cohort_subjects_seen"] == ["healthy-0", "healthy-1", "healthy-2", "tumour-0", "tumour-1"]
    for point in stored["points"][1:]:
        info = json.loads((out / "runs" / f"{point['method']}-n{point['n_labelled']}" / "head_config.json").read_text())
        assert info["calibration_scans"] == split["calibration"] and info["threshold"] == point["threshold"]
        assert not set(info["labelled_subjects"] + info["unlabelled_subjects"]) & {
            split["subjects"][n] for n in held_out}
        assert len(info["labelled_scans"]) == point["n_labelled"]
        assert info["inputs"] == (["scan"] if point["method"] == "scratch" else ["scan", "pseudo_healthy", "zmap"])


def test_cli_resume_reuses_finished_runs(semi_run, tmp_path):
    config, out, payload = semi_run
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("head/*.safetensors")}
    config_path = tmp_path / "semi.yaml"
    config_path.write_text(yaml.safe_dump(to_dict(config)))
    assert main(["finetune", "semi", "--config", str(config_path), "--output-dir", str(out), "--resume", "auto"]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing retrained
    assert json.loads((out / "curve.json").read_text())["points"] == json.loads(json.dumps(payload["points"]))
    bad = tmp_path / "bad.yaml"
    bad.write_text("semi: {labelled_count: [1]}\n")
    assert main(["finetune", "semi", "--config", str(bad)]) == 2  # unknown key: one-line error, no traceback


def test_cross_matrix_reports_the_numbers_it_claims(feature_set, finetune_config, tmp_path):
    feature_set.save(tmp_path / "features")
    config = finetune_config(tmp_path, cross={"train_groups": (("tumour",), ("stroke",)),
                                              "test_kinds": ("tumour", "stroke"), "min_test_scans": 1},
                             head={"network": {"channels": [4, 8, 16], "disease_mode": "film"}},
                             optim={"max_steps": 2})
    payload = run_cross(config, output_dir=tmp_path, progress=False)
    stored = json.loads((tmp_path / "matrix.json").read_text())
    assert [r["train"] for r in stored["rows"]] == ["unsupervised", "tumour", "stroke"]
    assert stored["rows"] == json.loads(json.dumps(payload["rows"]))
    assert stored["n_test"] == {"tumour": 1, "stroke": 1}
    markdown = (tmp_path / "matrix.md").read_text(encoding="utf-8")
    tables = markdown.split("## ")[1:]
    assert [t.splitlines()[0] for t in tables] == ["Dice", "AUPRC", "Lesion sensitivity",
                                                   "Healthy false-positive rate"]
    for table, metric in zip(tables, MATRIX_TABLES, strict=True):
        rows = _table_rows(table)
        assert rows[0] == ["train \\ test", "tumour", "stroke"]
        assert rows[1:] == [[r["train"], *(interval_text(r["cells"][k][metric], r["cells"][k][f"{metric}_ci"], DIGITS)
                                           for k in ("tumour", "stroke"))] for r in stored["rows"]]
    for row in stored["rows"][1:]:
        info = json.loads((tmp_path / "runs" / f"head-{row['train']}" / "head_config.json").read_text())
        assert info["diseases"] == [row["train"]] and info["disease_mode"] == "film"
        assert all(0.0 <= row["cells"][k]["auprc"] <= 1.0 for k in ("tumour", "stroke"))
        # every cell's healthy false-positive rate is over the same unseen healthy test scans
        assert all(row["cells"][k]["n_healthy_test_subjects"] == 2 for k in ("tumour", "stroke"))
    assert (tmp_path / "matrix.png").stat().st_size > 1000


def test_cross_matrix_says_too_few_where_a_kind_has_too_few_test_subjects(feature_set, finetune_config, tmp_path):
    """At the default minimum (5 test subjects per kind) the tiny cohort's 1 per kind gives no lesion number."""
    feature_set.save(tmp_path / "features")
    config = finetune_config(tmp_path, cross={"train_groups": (("tumour",),), "test_kinds": ("tumour", "stroke")},
                             optim={"max_steps": 1})
    assert config.cross.min_test_scans == 5
    payload = run_cross(config, output_dir=tmp_path, progress=False)
    for row in payload["rows"]:
        for cell in row["cells"].values():
            assert cell["status"] == "too few scans (1)"
            assert cell["dice"] is None and cell["auprc"] is None and cell["lesion_sensitivity"] is None
            assert cell["fp_rate"] is not None  # the healthy test scans are enough for their own rate
    markdown = matrix_markdown(payload)
    dice_table = _table_rows(markdown.split("## ")[1])
    assert dice_table[1:] == [[r["train"], "too few scans (1)", "too few scans (1)"] for r in payload["rows"]]
    assert "a kind with fewer than 5 gets no number" in markdown
