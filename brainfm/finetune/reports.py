"""Label-efficiency curve and cross-disease matrix reports: JSON (the numbers), Markdown and PNG (views of them).

The Markdown tables and the figures are rendered FROM the JSON payload, so every number a reader sees is one the
JSON holds (the tests re-read both and compare).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from brainfm.evaluation.report import format_number
from brainfm.io import atomic_path, write_json, write_text

METRICS = ("dice", "auprc")
DIGITS = (3, "—")  # format_number(value, *DIGITS): three decimals, an em dash for an undefined metric


def _save(figure: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=90)


# ------------------------------------------------------------------------------------------------ curve
def curve_markdown(payload: dict[str, Any]) -> str:
    lines = [
        "# Label-efficiency curve",
        "",
        f"- Dice: {payload['metrics']['dice']}",
        f"- AUPRC: {payload['metrics']['auprc']}",
        f"- test scans: {len(payload['test_scans'])}; healthy calibration scans: {len(payload['calibration_scans'])}; "
        f"labelled pool: {payload['labelled_pool_size']}",
        f"- {payload['simulated_data_note']}",
        "",
        "| labelled scans | method | Dice | AUPRC | threshold |",
        "|---:|---|---:|---:|---:|",
    ]
    for point in payload["points"]:
        lines.append(f"| {point['n_labelled']} | {point['method']} | {format_number(point['dice'], *DIGITS)} | {format_number(point['auprc'], *DIGITS)} | "
                     f"{format_number(point['threshold'], *DIGITS)} |")
    return "\n".join(lines) + "\n"


def write_curve(payload: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    paths = {"json": out_dir / "curve.json", "md": out_dir / "curve.md", "png": out_dir / "curve.png"}
    write_json(paths["json"], payload)
    write_text(paths["md"], curve_markdown(payload))
    figure = Figure(figsize=(9, 3.6))
    FigureCanvasAgg(figure)
    reference = payload["unsupervised_reference"]
    for column, metric in enumerate(METRICS):
        axes = figure.add_subplot(1, 2, column + 1)
        for method, style in (("head", "o-"), ("scratch", "s--")):
            points = [p for p in payload["points"] if p["method"] == method and p[metric] is not None]
            if points:
                axes.plot([p["n_labelled"] for p in points], [p[metric] for p in points], style, label=method)
        if reference[metric] is not None:
            axes.axhline(reference[metric], color="grey", linestyle=":", label="unsupervised map")
        axes.set_xscale("symlog", linthresh=1)
        axes.set_xlabel("labelled scans")
        axes.set_ylabel(metric)
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
        f"- Dice: {payload['metrics']['dice']}; AUPRC: {payload['metrics']['auprc']}",
        f"- {payload['simulated_data_note']}",
    ]
    for metric in METRICS:
        lines += ["", f"## {metric.upper() if metric == 'auprc' else metric.capitalize()}", "",
                  "| train \\ test | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
        for row in payload["rows"]:
            lines.append(f"| {row['train']} | " + " | ".join(format_number(row["cells"][k][metric], *DIGITS) for k in kinds) + " |")
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
                axes.text(j, i, format_number(None if np.isnan(values[i, j]) else values[i, j], *DIGITS), ha="center", va="center",
                          fontsize=7, color="white" if not values[i, j] > 0.6 else "black")
        axes.set_xticks(range(len(kinds)), kinds, fontsize=7)
        axes.set_yticks(range(len(rows)), [r["train"] for r in rows], fontsize=7)
        axes.set_xlabel("test kind")
        axes.set_title(metric, fontsize=9)
    figure.suptitle("cross-disease transfer (SIMULATED lesions)", fontsize=9)
    figure.tight_layout()
    _save(figure, paths["png"])
    return paths


__all__ = ["DIGITS", "curve_markdown", "matrix_markdown", "write_curve", "write_matrix"]
