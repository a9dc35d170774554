"""Evaluation report: ``metrics.json`` + ``report.md`` (protocol written out, tables) + PNG figures.

Numbers without their protocol mislead (see FIELD.md: resolution, post-processing and threshold choice all move
Dice and AUPRC), so the Markdown report always starts with the protocol: grid, post-processing, how the threshold
was calibrated and the healthy false-positive target. Every file is written atomically.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brainfm.io import atomic_path, write_json, write_text

DEFAULT_METHOD = "brainfm"

TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("volumes", "n_volumes"),
    ("AUPRC pooled", "auprc_pooled"),
    ("AUPRC per-volume", "auprc_per_volume_mean"),
    ("AUROC pooled", "auroc_pooled"),
    ("AUROC per-volume", "auroc_per_volume_mean"),
    ("Dice @thr (mean)", "dice_mean"),
    ("Dice @thr (pooled)", "dice_pooled"),
    ("Dice oracle (thr)", "dice_oracle"),
    ("subject AUROC", "subject_auroc"),
)


def methods_of(metrics: dict[str, Any], default_name: str = DEFAULT_METHOD) -> dict[str, dict[str, Any]]:
    """``{method: result}``: a single :meth:`MetricAccumulator.compute` result or a mapping of several."""
    if "overall" in metrics:
        return {default_name: metrics}
    if metrics and all(isinstance(v, dict) and "overall" in v for v in metrics.values()):
        return dict(metrics)
    raise ValueError("metrics must be one MetricAccumulator.compute() result or a {method: result} mapping")


def write_report(
    metrics: dict[str, Any],
    protocol: dict[str, Any],
    out_dir: str | Path,
    examples: Sequence[dict[str, Any]] = (),
    title: str = "brainfm anomaly-detection evaluation",
) -> dict[str, Path | None]:
    """Write the report files into ``out_dir`` and return their paths.

    ``metrics``: one result of ``MetricAccumulator.compute()`` or several side by side, e.g.
    ``{"ldm": ..., "vae_baseline": ...}``. ``protocol``: flat dict (e.g. ``NormativeCalibration.protocol()`` plus
    ``spacing_mm``, ``dataset``), or ``{method: dict}`` when methods were calibrated separately.
    ``examples``: dicts with 2D/3D ``image``, ``reconstruction``, ``zmap``, ``pred_mask`` and optional ``label``,
    ``title``, ``threshold``.
    """
    methods = methods_of(metrics, str(protocol.get("method", DEFAULT_METHOD)))
    json.dumps(
        metrics, allow_nan=False
    )  # fail before writing anything if the metrics cannot be stored exactly
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path | None] = {
        "metrics_json": out / "metrics.json",
        "report_md": out / "report.md",
        "pr_curves_png": out / "pr_curves.png",
        "examples_png": out / "examples.png" if examples else None,
    }
    _plot_pr_curves(methods, paths["pr_curves_png"])
    if examples:
        _plot_examples(examples, paths["examples_png"])
    write_json(paths["metrics_json"], metrics)
    write_text(paths["report_md"], render_markdown(methods, protocol, title, has_examples=bool(examples)))
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------


def format_number(value: Any, digits: int = 4, missing: str = "n/a") -> str:
    """The one number formatter of reports, model cards and console tables: ``digits`` decimals for floats,
    integers as they are, yes/no for booleans, ``missing`` for None, sequences joined with " x "."""
    if value is None:
        return missing
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        value = float(value)
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple):
        return " x ".join(format_number(v, digits, missing) for v in value)
    return str(value)


def protocol_lines(protocol: dict[str, Any]) -> list[str]:
    """The evaluation protocol as Markdown bullet lines: known keys as sentences, the rest verbatim."""
    p = dict(protocol)
    lines: list[str] = []
    used: set[str] = set()

    def take(*keys: str) -> list[Any]:
        used.update(keys)
        return [p.get(k) for k in keys]

    shape, spacing, resolution = take("grid_shape", "spacing_mm", "resolution")
    if shape is not None or spacing is not None or resolution is not None:
        grid = f"{' x '.join(str(int(n)) for n in shape)} voxels" if shape is not None else "native grid"
        if isinstance(spacing, list | tuple):
            grid += f" at {' x '.join(f'{float(s):g}' for s in spacing)} mm"
        elif spacing is not None:
            grid += f" at {float(spacing):g} mm"
        lines.append(f"- Evaluation grid: {grid}" + (f" ({resolution})" if resolution else ""))
    median, erosion, min_component = take("median_filter_size", "mask_erosion_vox", "min_component_vox")
    if median is not None or erosion is not None or min_component is not None:
        median_text = f"median filter {median} vox" if median and median > 1 else "no median filter"
        lines.append(
            f"- Post-processing: {median_text}; brain mask eroded by {erosion} vox; connected components "
            f"(26-connectivity) smaller than {min_component} vox removed"
        )
    normalisation, residual, sigma, floor = take(
        "normalisation", "residual", "smoothing_sigma_vox", "std_floor"
    )
    if normalisation is not None:
        details = [f"residual {residual}"] if residual else []
        if normalisation == "voxelwise" and sigma is not None:
            details.append(f"healthy mean/variance maps smoothed with Gaussian sigma {sigma} vox")
        if floor is not None:
            details.append(f"std floor {floor} x pooled healthy std")
        lines.append(f"- Normalisation: {normalisation} z-scores ({'; '.join(details)})")
    threshold, how, achieved = take("threshold", "threshold_calibration", "achieved_fpr_calibration")
    if threshold is not None:
        how_text = f", calibrated on healthy validation scans only: {how}" if how else ""
        achieved_text = (
            f" (achieved on the calibration scans: {achieved:.2%})" if achieved is not None else ""
        )
        lines.append(f"- Threshold: z > {threshold:.4f}{how_text}{achieved_text}")
    (target,) = take("target_fpr")
    if target is not None:
        lines.append(f"- Healthy false-positive target: {target:.2%} of healthy brain voxels")
    score, score_mean, score_std, n_scans = take(
        "subject_score", "healthy_subject_score_mean", "healthy_subject_score_std", "n_calibration_scans"
    )
    if score is not None:
        spread = (
            f" (healthy calibration: {format_number(score_mean)} +/- {format_number(score_std)})"
            if score_mean is not None
            else ""
        )
        lines.append(f"- Subject score: {score}{spread}")
    if n_scans is not None:
        lines.append(f"- Healthy calibration scans: {n_scans}")
    lines.extend(f"- {key}: {format_number(value)}" for key, value in p.items() if key not in used)
    return lines


def _table(rows: list[tuple[str, dict[str, Any]]], first: str) -> list[str]:
    header = [first] + [name for name, _ in TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row_name, result in rows:
        cells = [row_name]
        for _, key in TABLE_COLUMNS:
            cell = format_number(result.get(key))
            if key == "dice_oracle" and result.get("dice_oracle_threshold") is not None:
                cell += f" ({result['dice_oracle_threshold']:.3g})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(
    methods: dict[str, dict[str, Any]], protocol: dict[str, Any], title: str, has_examples: bool = False
) -> str:
    """The report text; methods appear side by side in every table."""
    lines = [f"# {title}", "", "## Protocol", ""]
    if protocol and set(protocol) <= set(methods) and all(isinstance(v, dict) for v in protocol.values()):
        for name, method_protocol in protocol.items():
            lines += [f"### {name}", "", *protocol_lines(method_protocol), ""]
    else:
        lines += [*protocol_lines(protocol), ""]
    lines += [
        "Dice @thr uses the healthy-calibrated threshold; Dice oracle picks the threshold on the test labels "
        "(shown in brackets) and is an upper bound, not a result. Pooled metrics rank all brain voxels of all "
        "labelled volumes together; per-volume metrics average over volumes with lesion and healthy voxels.",
        "",
    ]
    for name, result in methods.items():
        lines.append(f"- {name}: {result.get('sampling', {}).get('note', 'sampling not recorded')}")
    lines += ["", "## Overall", "", *_table([(n, r["overall"]) for n, r in methods.items()], "method"), ""]
    for section, key, first in (
        ("By lesion type", "by_lesion_type", "lesion type"),
        ("By lesion size", "by_size", "size"),
    ):
        groups = sorted({g for r in methods.values() for g in r.get(key, {})}, key=_group_order)
        if not groups:
            continue
        rows = [
            (f"{group} / {name}", r[key][group])
            for group in groups
            for name, r in methods.items()
            if group in r[key]
        ]
        lines += [f"## {section}", "", *_table(rows, f"{first} / method"), ""]
    lines += [
        "## False positives on healthy scans",
        "",
        "| method | scans | FP rate pooled | per-scan mean | max |",
    ]
    lines.append("|---|---|---|---|---|")
    for name, result in methods.items():
        h = result.get("healthy", {})
        lines.append(
            f"| {name} | {format_number(h.get('n_scans'))} | {format_number(h.get('fp_rate_pooled'))} | "
            f"{format_number(h.get('fp_rate_per_scan_mean'))} | {format_number(h.get('fp_rate_per_scan_max'))} |"
        )
    lines += ["", "## Figures", "", "![precision-recall curves](pr_curves.png)"]
    if has_examples:
        lines.append("![examples: scan | reconstruction | z-map | mask vs label](examples.png)")
    return "\n".join(lines) + "\n"


def _group_order(name: str) -> tuple[int, str]:
    for rank, word in enumerate(("small", "medium", "large")):
        if name.startswith(word):
            return rank, name
    return 3, name


# ----------------------------------------------------------------------------------------------------------------
# Figures (matplotlib's object API with the Agg canvas: no pyplot global state, no display needed)
# ----------------------------------------------------------------------------------------------------------------


def _save_figure(figure: Any, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def _plot_pr_curves(methods: dict[str, dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 4.5))
    axes = figure.add_subplot(1, 1, 1)
    plotted = False
    for name, result in methods.items():
        overall = result["overall"]
        curve = overall.get("pr_curve")
        if not curve:
            continue
        label = f"{name} (AUPRC pooled {overall['auprc_pooled']:.3f})"
        axes.step(curve["recall"], curve["precision"], where="post", label=label)
        if overall.get("lesion_fraction") is not None:
            axes.axhline(overall["lesion_fraction"], color="grey", linestyle=":", linewidth=1)
        plotted = True
    if not plotted:
        axes.text(0.5, 0.5, "no labelled lesion volumes", ha="center", va="center")
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="Pooled voxel PR curves")
    if plotted:
        axes.legend(loc="lower left", fontsize=8)
    _save_figure(figure, path)


def _display_slice(volume: np.ndarray, index: int | None) -> np.ndarray:
    volume = np.asarray(volume, dtype=np.float64)
    if volume.ndim == 3:
        volume = volume[:, :, index]
    return np.rot90(volume)  # RAS arrays: anterior up, as radiologists view axial slices


def _plot_examples(examples: Sequence[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 3 * len(examples)))
    columns = ("scan", "reconstruction", "z-map", "mask (red) vs label (green)")
    for row, example in enumerate(examples):
        image = np.asarray(example["image"])
        label = example.get("label")
        index = None
        if image.ndim == 3:  # the axial slice with most lesion, else with the highest total deviation
            has_lesion = label is not None and np.asarray(label).any()
            source = np.asarray(label) if has_lesion else np.clip(example["zmap"], 0, None)
            index = int(np.argmax(np.asarray(source, dtype=np.float64).sum(axis=(0, 1))))
        scan = _display_slice(image, index)
        recon = _display_slice(example["reconstruction"], index)
        zmap = _display_slice(example["zmap"], index)
        pred = _display_slice(example["pred_mask"], index) > 0.5
        truth = _display_slice(label, index) > 0.5 if label is not None else np.zeros_like(pred)
        low, high = np.percentile(scan, [1, 99])
        panels = [figure.add_subplot(len(examples), 4, row * 4 + c + 1) for c in range(4)]
        panels[0].imshow(scan, cmap="gray", vmin=low, vmax=high)
        panels[1].imshow(recon, cmap="gray", vmin=low, vmax=high)
        panels[2].imshow(scan, cmap="gray", vmin=low, vmax=high)
        threshold = example.get("threshold")
        shown = np.ma.masked_less_equal(zmap, threshold if threshold is not None else 0.0)
        overlay = panels[2].imshow(shown, cmap="hot", alpha=0.8)
        figure.colorbar(overlay, ax=panels[2], fraction=0.046, pad=0.02)
        colour = np.zeros(pred.shape + (4,))
        colour[..., 0] = pred
        colour[..., 1] = truth  # overlap shows yellow
        colour[..., 3] = 0.8 * (pred | truth)
        panels[3].imshow(scan, cmap="gray", vmin=low, vmax=high)
        panels[3].imshow(colour)
        for column, axes in enumerate(panels):
            axes.set_xticks([])
            axes.set_yticks([])
            if row == 0:
                axes.set_title(columns[column], fontsize=9)
        if example.get("title"):
            panels[0].set_ylabel(str(example["title"]), fontsize=9)
    figure.tight_layout()
    _save_figure(figure, path)
