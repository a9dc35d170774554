"""Settings of the separate studies (``brainfm study``): what each one compares, on which cohort.

A study builds a demo-like cohort and models (``demo``: overrides of :class:`DemoSettings`), chooses among its
candidates on the VALIDATION anatomy only (calibration on half of the healthy validation subjects, the healthy
false-positive rate on the other half, lesion AUPRC on the validation lesions), and says which setting it keeps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic.dataclasses import dataclass

from brainfm.config.data import MODALITIES
from brainfm.config.loader import SCHEMA

PriorSource = Literal["affine", "deformable", "templates", "none"]
Normalisation = Literal["voxelwise", "regional", "global"]


@dataclass(config=SCHEMA)
class StudySettings:
    """Every setting a study's numbers depend on (stored in its folder, like the demo's)."""

    demo: dict[str, Any] = dataclasses.field(default_factory=dict)  # nested overrides of DemoSettings
    fpr_factor: float = 3.0  # a candidate qualifies when its held-out healthy FPR <= fpr_factor x target_fpr
    bootstrap_resamples: int = 1000
    # priors: where the conditioning's tissue priors come from, and how z-maps are normalised
    priors: tuple[PriorSource, ...] = ("affine", "deformable", "templates", "none")
    prior_templates: tuple[str, ...] = ("mni152fsl",)  # added to ICBM152's priors by the "templates" source
    normalisations: tuple[Normalisation, ...] = ("voxelwise", "regional", "global")
    # ablate: inference-side settings, one factor at a time from the demo's reconstruction setting
    t_star: tuple[float, ...] = (0.3, 0.5, 0.7)
    inference_steps: tuple[int, ...] = (5, 10, 20)
    ensemble_sizes: tuple[int, ...] = (1, 2, 4)
    guidance_scales: tuple[float, ...] = (0.0, 1.0, 2.0)  # 0: unconditional (conditioning off); > 1: CFG
    # pooling: one model on every contrast vs one model per contrast, same steps x batch per contrast
    pooling_modalities: tuple[str, ...] = ("T1", "FLAIR")

    def __post_init__(self) -> None:
        if self.fpr_factor < 1.0:
            raise ValueError(f"fpr_factor must be >= 1, got {self.fpr_factor}")
        if self.bootstrap_resamples < 100:
            raise ValueError(f"bootstrap_resamples must be >= 100, got {self.bootstrap_resamples}")
        if not self.priors or not self.normalisations:
            raise ValueError("priors and normalisations must each name at least one candidate")
        if any(not 0.0 < t <= 1.0 for t in self.t_star) or not self.t_star:
            raise ValueError(f"t_star must be fractions in (0, 1], got {self.t_star}")
        if not self.inference_steps or min(self.inference_steps) < 1:
            raise ValueError(f"inference_steps must be >= 1, got {self.inference_steps}")
        if not self.ensemble_sizes or min(self.ensemble_sizes) < 1:
            raise ValueError(f"ensemble_sizes must be >= 1, got {self.ensemble_sizes}")
        if not self.guidance_scales or min(self.guidance_scales) < 0:
            raise ValueError(f"guidance_scales must be >= 0, got {self.guidance_scales}")
        unknown = sorted(set(self.pooling_modalities) - set(MODALITIES))
        if len(self.pooling_modalities) < 2 or unknown:
            raise ValueError(f"pooling_modalities must name at least 2 of {MODALITIES}, got "
                             f"{list(self.pooling_modalities)}")
