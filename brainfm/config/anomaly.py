"""Anomaly configs: pseudo-healthy reconstruction, and how residuals become z-maps, masks and subject scores
(both stored in a model folder and recorded in every report, since each changes the published numbers)."""

from __future__ import annotations

from typing import Literal

from pydantic.dataclasses import dataclass

from brainfm.config.loader import SCHEMA


@dataclass(config=SCHEMA)
class DeviationConfig:
    """How residuals become z-maps, binary masks and subject scores; every report records these values
    because each of them changes the published numbers."""

    normalisation: Literal["voxelwise", "regional", "global"] = "voxelwise"
    smoothing_sigma_vox: float = 1.0  # Gaussian smoothing of the voxelwise mean/variance maps (0 = off)
    std_floor: float = 1e-3  # relative to the pooled healthy std: no division by a near-zero local std
    median_filter_size: int = 3  # median filter of the z-map (0 or 1 = off)
    mask_erosion_vox: int = 1  # brain-mask erosion: skull-stripping edges are the commonest false positives
    min_component_vox: int = 5  # connected components (26-connectivity) smaller than this are dropped
    target_fpr: float = 0.01  # fraction of healthy brain voxels above the calibrated threshold
    subject_score: Literal["p99", "mean_top1pct", "lesion_load"] = "mean_top1pct"
    residual: Literal["abs", "signed_pos", "signed_neg"] = "abs"

    def __post_init__(self) -> None:
        if self.smoothing_sigma_vox < 0:
            raise ValueError(f"smoothing_sigma_vox must be >= 0, got {self.smoothing_sigma_vox}")
        if self.std_floor <= 0:
            raise ValueError(f"std_floor must be > 0, got {self.std_floor}")
        if self.median_filter_size < 0 or self.mask_erosion_vox < 0 or self.min_component_vox < 0:
            raise ValueError("median_filter_size, mask_erosion_vox and min_component_vox must be >= 0")
        if not 0.0 < self.target_fpr < 1.0:
            raise ValueError(f"target_fpr must be in (0, 1), got {self.target_fpr}")


@dataclass(config=SCHEMA)
class ReconstructionConfig:
    """Pseudo-healthy reconstruction settings, stored in a model folder's ``model_index.json`` (key
    ``reconstruction``)."""

    t_star: tuple[float, ...] = (0.5,)  # noise levels as fractions of the training timesteps, one member each
    num_inference_steps: int = 20  # sampler grid over the FULL [0, T) range; only steps <= t* are run
    sampler: Literal["ddim", "dpm++"] = "ddim"
    guidance_scale: float = 1.0  # 1 = plain conditional prediction; > 1 = classifier-free guidance
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 16  # 2D slices (or 3D volumes) per network call
    # Memory-bounded inference for fine grids (1 mm heads): see brainfm.models.tiling and brainfm.anomaly.windows
    tiled_vae: bool = False  # VAE encode/decode slab by slab: the whole-volume result (to float rounding)
    latent_window: tuple[int, ...] | None = None  # the UNet on overlapping latent windows of this size, per axis
    window_overlap: float = 0.5  # fraction of a window shared with its neighbour (Hann-weighted cross-fade)

    def __post_init__(self) -> None:
        if not self.t_star or any(not 0.0 < t <= 1.0 for t in self.t_star):
            raise ValueError(f"t_star must be fractions in (0, 1], got {self.t_star}")
        if self.num_inference_steps < 1 or self.batch_size < 1:
            raise ValueError("num_inference_steps and batch_size must be >= 1")
        if not self.seeds:
            raise ValueError("seeds must hold at least one seed")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.latent_window is not None and (len(self.latent_window) not in (2, 3) or min(self.latent_window) < 1):
            raise ValueError(f"latent_window must give 2 or 3 positive sizes, got {self.latent_window}")
        if not 0.0 <= self.window_overlap < 1.0:
            raise ValueError(f"window_overlap must be in [0, 1), got {self.window_overlap}")
