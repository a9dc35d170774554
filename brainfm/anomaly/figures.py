"""The figure ``brainfm detect`` writes beside its maps: scan, pseudo-healthy and deviation on axial slices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from brainfm.io import atomic_path


def figure_slices(mask: np.ndarray, anomaly: np.ndarray, count: int = 5) -> list[int]:
    """Evenly spaced axial slices through the brain, always including the slice with the most anomaly."""
    occupied = np.flatnonzero(mask.sum(axis=(0, 1)))
    if occupied.size == 0:
        return [mask.shape[2] // 2]
    low, high = occupied.min(), occupied.max()
    picks = {int(round(v)) for v in np.linspace(low + 0.15 * (high - low), high - 0.15 * (high - low), count)}
    if anomaly.any():
        worst = int(np.argmax(anomaly.sum(axis=(0, 1))))
        if worst not in picks:
            picks.remove(min(picks, key=lambda z: abs(z - worst)))
            picks.add(worst)
    return sorted(picks)


def write_detection_figure(path: Path, image: np.ndarray, analysis: Any, brain: np.ndarray, title: str) -> None:
    """3 rows x a few axial slices: scan | pseudo-healthy | deviation overlay with the mask contour."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    slices = figure_slices(brain, analysis.mask)
    figure = Figure(figsize=(2.2 * len(slices), 7.0))
    FigureCanvasAgg(figure)
    high = max(float(analysis.zmap.max()), analysis.threshold * 1.5, 1e-6)
    rows = ("scan", "pseudo-healthy", f"z > 0, mask at z > {analysis.threshold:.2f}")
    for column, z in enumerate(slices):
        for row in range(3):
            axes = figure.add_subplot(3, len(slices), row * len(slices) + column + 1)
            base = image if row != 1 else analysis.reconstruction
            axes.imshow(np.rot90(base[:, :, z]), cmap="gray", vmin=0.0, vmax=1.0)
            if row == 2:
                z_slice = np.rot90(analysis.zmap[:, :, z])
                axes.imshow(np.ma.masked_less_equal(z_slice, 0.0), cmap="hot", vmin=0.0, vmax=high, alpha=0.7)
                mask_slice = np.rot90(analysis.mask[:, :, z]).astype(float)
                if mask_slice.any():
                    axes.contour(mask_slice, levels=[0.5], colors="cyan", linewidths=0.8)
            axes.set_xticks([])
            axes.set_yticks([])
            if column == 0:
                axes.set_ylabel(rows[row], fontsize=8)
            if row == 0:
                axes.set_title(f"z={z}", fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
