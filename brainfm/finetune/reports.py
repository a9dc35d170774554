"""Label-efficiency curve and cross-disease matrix reports: JSON (the numbers), Markdown and PNG (views of them).

The Markdown tables and the figures are rendered FROM the JSON payload, so every number a reader sees is one the
JSON holds (the tests re-read both and compare). A value is shown with its 95 % interval over test subjects where
there is one; a matrix cell with too few test subjects shows "too few scans (n)" instead of a number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from brainfm.evaluation.report import format_number
from brainfm.io import atomic_path, write_json, write_text

METRICS = ("dice", "auprc")
DIGITS = (3, "—")  # format_number(value, *DIGITS): three decimals, an em dash for an undefined metric
TITLES = {"dice": "Dice", "auprc": "AUPRC", "fp_rate": "Healthy false-positive rate"}


def value_text(scores: dict[str, Any], metric: str) -> str:
    """``0.512 [0.401, 0.623]`` (the value and its interval), the value alone without one, or the cell's status
    (e.g. "too few scans (3)") when its number is withheld."""
    if scores.get("status") and scores.get(metric) is None:
        return str(scores["status"])
    text = format_number(scores.get(metric), *DIGITS)
    interval = scores.get(f"{metric}_ci")
    if scores.get(metric) is not None and interval:
        text += f" [{format_number(interval[0], *DIGITS)}, {format_number(interval[1], *DIGITS)}]"
    return text


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
        "| labelled scans | method | Dice | AUPRC | healthy FP rate | threshold |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for point in payload["points"]:
        lines.append(f"| {point['n_labelled']} | {point['method']} | {value_text(point, 'dice')} | "
                     f"{value_text(point, 'auprc')} | {value_text(point, 'fp_rate')} | "
                     f"{format_number(point['threshold'], *DIGITS)} |")
    return "\n".join(lines) + "\n"


def _notes(payload: dict[str, Any]) -> list[str]:
    seen = payload["seen_subjects"]
    roles = "; ".join(f"{role}: {n}" for role, n in seen["roles"].items()) or "stated disjoint from this cohort"
    return [
        *(f"- {TITLES.get(k, k)}: {v}" for k, v in payload["metrics"].items() if k in TITLES),
        f"- {payload['metrics']['intervals']}",
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
    for metric in (*METRICS, "fp_rate"):
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


__all__ = ["DIGITS", "curve_markdown", "matrix_markdown", "value_text", "write_curve", "write_matrix"]
