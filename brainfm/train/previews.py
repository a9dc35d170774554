"""Preview grids: one row of images per named tensor (a task's ``preview``), saved as PNG with a JSON legend."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from torch import Tensor

from brainfm.io import atomic_path


def _slices_for_grid(t: Tensor) -> np.ndarray:
    """(B, C, X, Y[, Z]) → (B, H, W) float in [0, 1]: first channel, middle axial slice for 3D, top-up display."""
    t = t.detach().float().cpu()[:, 0]
    if t.ndim == 4:
        t = t[..., t.shape[-1] // 2]
    return np.rot90(t.numpy(), k=1, axes=(1, 2)).clip(0, 1)


def image_grid(rows: list[tuple[str, Tensor]]) -> np.ndarray:
    """Rows of images (one row per named tensor) as an (H, W, 3) uint8 array."""
    panels = [_slices_for_grid(t) for _, t in rows]
    n = min(p.shape[0] for p in panels)
    h, w = panels[0].shape[1:]
    grid = np.zeros((len(panels) * (h + 2), n * (w + 2)), dtype=np.float32)
    for r, panel in enumerate(panels):
        for c in range(n):
            grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = panel[c][:h, :w]
    return np.repeat((grid * 255).astype(np.uint8)[..., None], 3, axis=2)


def save_preview(samples_dir: Path, step: int, rows: list[tuple[str, Tensor]], keys: list[str]) -> np.ndarray:
    """``step-N.png`` (written atomically) and ``step-N.json`` (row names, sample keys per column); returns the
    grid for the tracker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = image_grid(rows)
    path = samples_dir / f"step-{step:07d}.png"
    with atomic_path(path) as tmp:
        plt.imsave(tmp, grid, format="png")
    (samples_dir / f"step-{step:07d}.json").write_text(
        json.dumps({"rows": [name for name, _ in rows], "keys": keys[:grid.shape[1]]}))
    return grid


__all__ = ["image_grid", "save_preview"]
