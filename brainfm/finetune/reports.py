"""Label-efficiency curve and cross-disease matrix reports: JSON (the numbers), Markdown and PNG (views of them).

The Markdown tables and the figures are rendered FROM the JSON payload, so every number a reader sees is one the
JSON holds (the tests re-read both and compare). A value is shown with its 95 % interval over test subjects where
there is one; a matrix cell with too few test subjects shows "too few scans (n)" instead of a number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from brainfm.evaluation.report import format_number, interval_text
from brainfm.io import atomic_path, write_json, write_text

METRICS = ("dice", "auprc")  # the figures' panels (the curve adds the healthy false-positive rate)
DIGITS = 3  # decimals of every number shown (``brainfm.evaluation.report``'s formatter, as every report)
TITLES = {"dice": "Dice", "auprc": "AUPRC", "lesion_sensitivity": "Lesion sensitivity",
          "fp_lesions_per_scan": "False-positive lesions per lesion scan", "fp_rate": "Healthy false-positive rate"}
CURVE_COLUMNS = ("dice", "auprc", "lesion_sensitivity", "fp_lesions_per_scan", "fp_rate")
CURVE_HEADERS = {"dice": "Dice", "auprc": "AUPRC", "lesion_sensitivity": "lesion sensitivity",
                 "fp_lesions_per_scan": "FP lesions / scan", "fp_rate": "healthy FP rate"}
MATRIX_TABLES = ("dice", "auprc", "lesion_sensitivity", "fp_rate")


def value_text(scores: dict[str, Any], metric: str) -> str:
    """``0.512 [0.401, 0.623]`` (the value and its 95 % interval), the value alone without one, or the cell's
    status (e.g. "too few scans (3)") when its number is withheld."""
    if scores.get("status") and scores.get(metric) is None:
        return str(scores["status"])
    return interval_text(scores.get(metric), scores.get(f"{metric}_ci"), DIGITS)


def _save(figure: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=90)


# ------------------------------------------------------------------------------------------------ curve
def curve_markdown(payload: dict[str, Any]) -> str:
    lines = [
        "# Label-efficiency curve",
        "",
        *_notes(payload),
        f"- test scans: {len(payload['test_scans'])} (healthy: {len(payload['healthy_test_scans'])}); healthy "
        f"calibration scans: {len(payload['calibration_scans'])}; labelled pool: {payload['labelled_pool_size']}",
        "",
        "| labelled scans | method | " + " | ".join(CURVE_HEADERS[m] for m in CURVE_COLUMNS) + " | threshold |",
        "|---:|---|" + "---:|" * (len(CURVE_COLUMNS) + 1),
    ]
    for point in payload["points"]:
        lines.append(f"| {point['n_labelled']} | {point['method']} | "
                     + " | ".join(value_text(point, m) for m in CURVE_COLUMNS)
                     + f" | {format_number(point['threshold'], DIGITS)} |")
    return "\n".join(lines) + "\n"


def _notes(payload: dict[str, Any]) -> list[str]:
    seen = payload["seen_subjects"]
    roles = "; ".join(f"{role}: {n}" for role, n in seen["roles"].items()) or "stated disjoint from this cohort"
    return [
        *(f"- {TITLES[k]}: {v}" for k, v in payload["metrics"].items() if k in TITLES),
        f"- {payload['metrics']['intervals']}",
        f"- lesion-wise detection: {payload['metrics']['lesion_detection_rule']}",
        f"- subjects the foundation model has seen ({seen['policy']}; {roles}): "
        f"{len(seen['cohort_subjects_seen'])} of them in this cohort, none in head calibration or test",
        f"- {payload['simulated_data_note']}",
    ]


def write_curve(payload: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    paths = {"json": out_dir / "curve.json", "md": out_dir / "curve.md", "png": out_dir / "curve.png"}
    write_json(paths["json"], payload)
    write_text(paths["md"], curve_markdown(payload))
    figure = Figure(figsize=(13, 3.6))
    FigureCanvasAgg(figure)
    reference = payload["unsupervised_reference"]
    for column, metric in enumerate((*METRICS, "fp_rate")):
        axes = figure.add_subplot(1, 3, column + 1)
        for method, style in (("head", "o-"), ("scratch", "s--")):
            points = [p for p in payload["points"] if p["method"] == method and p[metric] is not None]
            if points:
                axes.plot([p["n_labelled"] for p in points], [p[metric] for p in points], style, label=method)
        if reference[metric] is not None:
            axes.axhline(reference[metric], color="grey", linestyle=":", label="unsupervised map")
        axes.set_xscale("symlog", linthresh=1)
        axes.set_xlabel("labelled scans")
        axes.set_ylabel(metric)
        if metric != "fp_rate":
            axes.set_ylim(0, 1)
        axes.legend(fontsize=7)
    figure.suptitle("label efficiency (SIMULATED lesions)", fontsize=9)
    figure.tight_layout()
    _save(figure, paths["png"])
    return paths


# ------------------------------------------------------------------------------------------------ matrix
def matrix_markdown(payload: dict[str, Any]) -> str:
    kinds = payload["test_kinds"]
    lines = [
        "# Cross-disease matrix",
        "",
        f"- rows: training lesion kinds (`{payload['disease_mode']}` disease conditioning); columns: test kinds",
        *_notes(payload),
        "- test subjects per kind: " + ", ".join(f"{k} {payload['n_test'][k]}" for k in kinds)
        + f"; a kind with fewer than {payload['min_test_scans']} gets no number; healthy test scans: "
        f"{len(payload['healthy_test_scans'])}",
    ]
    for metric in MATRIX_TABLES:
        lines += ["", f"## {TITLES[metric]}", "",
                  "| train \\ test | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
        for row in payload["rows"]:
            lines.append(f"| {row['train']} | " + " | ".join(value_text(row["cells"][k], metric) for k in kinds) + " |")
    return "\n".join(lines) + "\n"


def write_matrix(payload: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    paths = {"json": out_dir / "matrix.json", "md": out_dir / "matrix.md", "png": out_dir / "matrix.png"}
    write_json(paths["json"], payload)
    write_text(paths["md"], matrix_markdown(payload))
    kinds, rows = payload["test_kinds"], payload["rows"]
    figure = Figure(figsize=(4.5 * len(METRICS), 0.6 * len(rows) + 1.8))
    FigureCanvasAgg(figure)
    for column, metric in enumerate(METRICS):
        values = np.array([[np.nan if r["cells"][k][metric] is None else r["cells"][k][metric] for k in kinds]
                           for r in rows], dtype=float)
        axes = figure.add_subplot(1, len(METRICS), column + 1)
        axes.imshow(values, vmin=0, vmax=1, cmap="viridis")
        for i in range(len(rows)):
            for j in range(len(kinds)):
                text = value_text(rows[i]["cells"][kinds[j]], metric).replace(" [", "\n[")
                axes.text(j, i, text, ha="center", va="center", fontsize=6,
                          color="white" if not values[i, j] > 0.6 else "black")
        axes.set_xticks(range(len(kinds)), kinds, fontsize=7)
        axes.set_yticks(range(len(rows)), [r["train"] for r in rows], fontsize=7)
        axes.set_xlabel("test kind")
        axes.set_title(metric, fontsize=9)
    figure.suptitle("cross-disease transfer (SIMULATED lesions)", fontsize=9)
    figure.tight_layout()
    _save(figure, paths["png"])
    return paths


__all__ = ["CURVE_COLUMNS", "DIGITS", "MATRIX_TABLES", "TITLES", "curve_markdown", "matrix_markdown", "value_text",
           "write_curve", "write_matrix"]
