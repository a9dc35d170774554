"""Healthy-anatomy conditioning: template tissue priors registered to each scan, and scalar brain volumes.

The diffusion model is conditioned on where grey and white matter *should* be, so its pseudo-healthy
reconstruction follows the subject's anatomy without copying a lesion. Everything here therefore derives from the
scan's image and brain mask and the ICBM152 template only. It must never see the lesion label: ``compute_anatomy``
does not read ``scan.label`` at all.

Registration (``brainfm.data.registration.register_affine``): SimpleITK, Mattes mutual information (works across
T1/T2/FLAIR/CT contrasts), a similarity stage from several initial tilts then an affine, seeded and single-threaded
so the result is the same on every run and machine. When preprocessing aligned the scan it already holds that
affine (``PreprocessedScan.scan_to_template``) and it is reused here: one registration per scan. MRI scans are
matched against the (skull-stripped) template T1; CT scans against the template rendered in CT-like contrast
(``brainfm.data.preprocess.template_contrast``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from brainfm.config import PreprocessConfig
from brainfm.data.preprocess import PreprocessedScan, template_contrast
from brainfm.data.registration import (
    REGISTRATION_THREADS,
    itk_threads,
    load_template,
    register_affine,
    sitk_image,
)
from brainfm.io import BrainFMInputError


@dataclasses.dataclass
class AnatomyMaps:
    """Spatial tissue priors on the scan's recipe grid plus global volumes used as metadata tokens."""

    priors: np.ndarray  # float32 (C,X,Y,Z) in [0,1], C = len(recipe.tissue_priors), order as in the recipe
    scalars: dict[str, float]  # brain_volume_ml, gm_fraction, wm_fraction (and csf_fraction if used)
    scan_to_template: np.ndarray | None = None  # 4x4 registration result: scan-world to template-world points


def register_template(scan: PreprocessedScan, recipe: PreprocessConfig) -> np.ndarray:
    """4x4 affine taking scan-world points to template-world points, from the preprocessed scan itself (used when
    preprocessing did not align the scan, so no registration exists yet)."""
    template = load_template(recipe.template_resolution)
    moving = template_contrast(template, scan.modality, recipe)
    return register_affine(scan.image, scan.affine, moving, template.affine, source=scan.source_path or None)


def compute_anatomy(scan: PreprocessedScan, recipe: PreprocessConfig) -> AnatomyMaps:
    """Register the template to the scan, bring the requested priors onto the recipe grid (masked by the scan's
    brain mask), and derive brain volume and tissue fractions. Never reads ``scan.label``."""
    import SimpleITK as sitk

    if not scan.mask.any():
        raise BrainFMInputError(scan.source_path or None, "empty brain mask: no anatomy to compute")
    template = load_template(recipe.template_resolution)
    # Preprocessing's alignment already registered this brain to the template: reuse it (one registration).
    matrix = scan.scan_to_template if scan.scan_to_template is not None else register_template(scan, recipe)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix([float(v) for v in matrix[:3, :3].ravel()])
    transform.SetTranslation([float(v) for v in matrix[:3, 3]])
    reference = sitk_image(scan.image, scan.affine)
    mask = scan.mask > 0
    # gm and wm fractions are always reported so metadata keys do not depend on which priors are conditioned on.
    names = list(dict.fromkeys(["gm", "wm", *recipe.tissue_priors]))
    on_scan = {}
    for name in names:
        with itk_threads(REGISTRATION_THREADS):
            moved = sitk.Resample(sitk_image(template.priors[name], template.affine), reference, transform,
                                  sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        prior = np.transpose(sitk.GetArrayFromImage(moved), (2, 1, 0))
        on_scan[name] = (np.clip(prior, 0.0, 1.0) * mask).astype(np.float32)

    brain_voxels = float(mask.sum())
    voxel_ml = abs(float(np.linalg.det(scan.affine[:3, :3]))) / 1000.0
    scalars = {"brain_volume_ml": brain_voxels * voxel_ml}
    for name in names:
        scalars[f"{name}_fraction"] = float(on_scan[name].sum(dtype=np.float64) / brain_voxels)
    priors = np.stack([on_scan[name] for name in recipe.tissue_priors]).astype(np.float32)
    return AnatomyMaps(priors=priors, scalars=scalars, scan_to_template=matrix)
