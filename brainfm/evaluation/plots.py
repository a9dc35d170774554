"""Figures of an evaluation report (matplotlib's object API with the Agg canvas: no pyplot global state, no
display needed): pooled precision-recall curves of every method and example slices."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brainfm.io import atomic_path


def _save_figure(figure: Any, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def plot_pr_curves(methods: dict[str, dict[str, Any]], path: Path) -> None:
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


def plot_examples(examples: Sequence[dict[str, Any]], path: Path) -> None:
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
