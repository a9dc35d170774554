"""Data configs: the preprocessing recipe (stored with every shard set and every model), shard building, and
the streaming reader's filters and augmentations."""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic.dataclasses import dataclass

from brainfm.config.loader import SCHEMA

MODALITIES = ("T1", "T2", "FLAIR", "PD", "CT", "T1CE")  # T1CE: post-contrast T1 (BraTS t1ce, MSLUB T1WKS)


@dataclass(config=SCHEMA)
class PreprocessConfig:
    """The exact recipe that turns a scan into model input; inference repeats it from the stored copy."""

    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)  # mm, RAS axis order
    shape: tuple[int, int, int] = (96, 112, 96)  # voxels after crop/pad around the brain
    mri_percentiles: tuple[float, float] = (0.5, 99.5)  # clip inside the brain mask, then scale to [0, 1]
    ct_window: tuple[float, float] = (0.0, 80.0)  # Hounsfield window mapped to [0, 1] (brain window)
    mask_threshold: float = 0.5  # for given probabilistic masks
    tissue_priors: tuple[str, ...] = ("gm", "wm")  # template priors brought onto the scan grid
    template_resolution: int = 2  # mm of the nilearn ICBM152 template used for registration/priors
    # HU range of intracranial soft tissue for derived CT masks
    ct_brain_hu: tuple[float, float] = (-15.0, 100.0)
    # Front end for scans straight from the scanner (brainfm.data.preprocess); stored recipes without these keys
    # predate them and are read with all three off.
    brain_extraction: bool = True  # deepbet (T1) / T1 or head template (other MRI) / HU (CT); off: intensity mask
    bias_correction: bool = True  # N4 on MRI before normalisation
    align_to_template: bool = True  # rigid alignment to the ICBM152 template orients the model grid
    # Multi-channel input (BraTS-style): a subject's co-registered contrasts stacked as image channels, in this
    # order; the first is the reference (its brain, alignment and grid serve every channel). Empty: one scan, one
    # channel. With channels, every subject must have one scan of each (the shard build refuses otherwise).
    channels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be positive, got {self.spacing}")
        if any(s < 8 for s in self.shape):
            raise ValueError(f"shape must be at least 8 voxels per axis, got {self.shape}")
        lo, hi = self.mri_percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"mri_percentiles must satisfy 0 <= lo < hi <= 100, got {self.mri_percentiles}")
        if self.ct_window[0] >= self.ct_window[1]:
            raise ValueError(f"ct_window must be (low, high) with low < high, got {self.ct_window}")
        if self.ct_brain_hu[0] >= self.ct_brain_hu[1]:
            raise ValueError(f"ct_brain_hu must be (low, high) with low < high, got {self.ct_brain_hu}")
        if self.template_resolution not in (1, 2):
            raise ValueError(f"template_resolution must be 1 or 2 (mm), got {self.template_resolution}")
        if len(set(self.channels)) < len(self.channels) or set(self.channels) - set(MODALITIES):
            raise ValueError(f"channels must be distinct modalities from {list(MODALITIES)}, got {list(self.channels)}")
        if len(self.channels) == 1:
            raise ValueError("channels needs two or more contrasts (leave it empty for one scan per sample)")
        unknown = set(self.tissue_priors) - {"gm", "wm", "csf"}
        if unknown:
            raise ValueError(f"tissue_priors must be among gm, wm, csf; got {sorted(unknown)}")


@dataclass(config=SCHEMA)
class ShardConfig:
    max_shard_bytes: int = 256 * 1024 * 1024
    max_samples_per_shard: int = 64
    split_fractions: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1}
    )
    seed: int = 0
    workers: int = 2

    def __post_init__(self) -> None:
        total = sum(self.split_fractions.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must sum to 1, got {total}")
        if self.max_samples_per_shard < 1 or self.max_shard_bytes < 1024:
            raise ValueError("max_samples_per_shard must be >= 1 and max_shard_bytes >= 1024")


@dataclass(config=SCHEMA)
class ReaderConfig:
    """How the streaming shard reader filters, shuffles and augments; probabilities of 0 switch a MONAI
    augmentation off, so the default reads the data exactly as stored."""

    min_brain_fraction: float = 0.05  # 2D: skip axial slices with less brain than this
    on_corrupt: Literal["skip", "raise"] = "skip"
    slice_shuffle_volumes: int = 8  # 2D: slices are shuffled across windows of this many volumes
    affine_prob: float = 0.0  # small RandAffine, applied identically to image, mask, anatomy and label
    rotate_degrees: float = 5.0
    scale_fraction: float = 0.05
    translate_voxels: float = 2.0
    bias_field_prob: float = 0.0
    bias_field_coeff: float = 0.3
    noise_prob: float = 0.0
    noise_std: float = 0.02
    contrast_prob: float = 0.0
    contrast_gamma: tuple[float, float] = (0.8, 1.25)

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_brain_fraction < 1.0:
            raise ValueError(f"min_brain_fraction must be in [0, 1), got {self.min_brain_fraction}")
        if self.slice_shuffle_volumes < 1:
            raise ValueError(f"slice_shuffle_volumes must be >= 1, got {self.slice_shuffle_volumes}")
        probs = (self.affine_prob, self.bias_field_prob, self.noise_prob, self.contrast_prob)
        if any(not 0.0 <= p <= 1.0 for p in probs):
            raise ValueError(f"augmentation probabilities must be in [0, 1], got {probs}")
        if min(self.rotate_degrees, self.scale_fraction, self.translate_voxels, self.noise_std) < 0:
            raise ValueError("rotate_degrees, scale_fraction, translate_voxels and noise_std must be >= 0")
        if not 0 < self.contrast_gamma[0] <= self.contrast_gamma[1]:
            raise ValueError(
                f"contrast_gamma must be (low, high) with 0 < low <= high, got {self.contrast_gamma}"
            )


@dataclass(config=SCHEMA)
class DataConfig:
    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
    shards: ShardConfig = dataclasses.field(default_factory=ShardConfig)
    reader: ReaderConfig = dataclasses.field(default_factory=ReaderConfig)
