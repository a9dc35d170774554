"""Healthy-anatomy conditioning: template tissue priors registered to each scan, and scalar brain volumes.

The diffusion model is conditioned on where grey and white matter *should* be, so its pseudo-healthy
reconstruction follows the subject's anatomy without copying a lesion. Everything here therefore derives from the
scan's image and brain mask and the ICBM152 template only. It must never see the lesion label: ``compute_anatomy``
does not read ``scan.label`` at all.

Registration: SimpleITK affine, Mattes mutual information (works across T1/T2/FLAIR contrasts), initialised by
``CenteredTransformInitializer`` MOMENTS (aligns the brains' centres of mass, so scans far from MNI space start
close), images averaged to ~4 mm then a 2-level pyramid, regular-step gradient descent, random sampling with a
fixed seed and a fixed thread count so the result is the same on every run and machine. MRI scans are matched against the (skull-stripped) template T1; CT scans against
the template rendered in CT-like contrast (HU from the GM/WM/CSF probabilities, then the recipe's HU window), so
the same intensity ordering (GM brighter than WM brighter than CSF) drives the metric.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator

import numpy as np

from brainfm.config import PreprocessConfig
from brainfm.data.preprocess import PreprocessedScan, normalise_mri, window_ct
from brainfm.io import BrainFMInputError

REGISTRATION_SEED = 20240917  # SimpleITK treats seed 0 as "seed from the wall clock": never use 0
REGISTRATION_THREADS = (
    1  # ITK sums metric terms per thread: one thread makes results bit-identical everywhere
)
REGISTRATION_MM = 4.0
_CT_LIKE_HU = {"gm": 40.0, "wm": 28.0, "csf": 8.0}  # typical unenhanced brain CT values


@dataclasses.dataclass
class AnatomyMaps:
    """Spatial tissue priors on the scan's recipe grid plus global volumes used as metadata tokens."""

    priors: np.ndarray  # float32 (C,X,Y,Z) in [0,1], C = len(recipe.tissue_priors), order as in the recipe
    scalars: dict[str, float]  # brain_volume_ml, gm_fraction, wm_fraction (and csf_fraction if used)
    scan_to_template: np.ndarray | None = None  # 4x4 registration result: scan-world to template-world points


@dataclasses.dataclass(frozen=True)
class _Template:
    t1: np.ndarray
    mask: np.ndarray
    priors: dict[str, np.ndarray]
    affine: np.ndarray


@functools.lru_cache(maxsize=2)
def load_template(resolution: int) -> _Template:
    """ICBM152 2009 T1, brain mask and GM/WM/CSF probabilities shipped with nilearn (no download); cached because
    every scan of a shard build needs them."""
    from nilearn import datasets

    t1_image = datasets.load_mni152_template(resolution=resolution)
    mask = (datasets.load_mni152_brain_mask(resolution=resolution).get_fdata() > 0.5).astype(np.float32)
    gm = np.clip(datasets.load_mni152_gm_template(resolution=resolution).get_fdata(), 0, 1).astype(np.float32)
    wm = np.clip(datasets.load_mni152_wm_template(resolution=resolution).get_fdata(), 0, 1).astype(np.float32)
    csf = np.clip(mask - gm - wm, 0, 1).astype(np.float32)
    arrays = [t1_image.get_fdata().astype(np.float32), mask, gm, wm, csf]
    for array in arrays:
        array.setflags(write=False)
    return _Template(
        arrays[0], mask, {"gm": gm, "wm": wm, "csf": csf}, np.asarray(t1_image.affine, np.float64)
    )


@contextlib.contextmanager
def _itk_threads(count: int) -> Iterator[None]:
    """Pin ITK's global thread count: the registration method's own setting does not reach the optimizer-scale
    estimator and metric internals, whose per-thread partial sums otherwise vary in the last bits between runs."""
    import SimpleITK as sitk

    previous = sitk.ProcessObject_GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(count)
    try:
        yield
    finally:
        sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(previous)


def _sitk_image(array: np.ndarray, affine: np.ndarray):  # -> SimpleITK.Image
    """(X,Y,Z) array + affine as a SimpleITK image; both images use the same world, so no LPS flip is needed."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0)), dtype=np.float32))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(d) for d in (affine[:3, :3] / spacing).ravel()])
    image.SetOrigin([float(o) for o in affine[:3, 3]])
    return image


def _template_contrast(template: _Template, scan: PreprocessedScan, recipe: PreprocessConfig) -> np.ndarray:
    """The template in the scan's intensity convention ([0,1], 0 outside the brain)."""
    if scan.modality == "CT":
        hu = sum(_CT_LIKE_HU[name] * prior for name, prior in template.priors.items())
        return window_ct(hu, template.mask, recipe.ct_window)
    return normalise_mri(template.t1, template.mask, recipe.mri_percentiles)


def register_template(scan: PreprocessedScan, recipe: PreprocessConfig):  # -> SimpleITK.Transform
    """Affine transform taking scan-world points to template-world points (SimpleITK's fixed→moving map).

    Both images are first averaged down to about ``REGISTRATION_MM`` (an affine needs no finer detail, and this keeps
    it near a second per scan on a busy CPU), then registered over two further pyramid levels.
    """
    import SimpleITK as sitk

    template = load_template(recipe.template_resolution)
    fixed = _sitk_image(scan.image, scan.affine)
    moving = _sitk_image(_template_contrast(template, scan, recipe), template.affine)
    fixed = sitk.BinShrink(fixed, [max(1, round(REGISTRATION_MM / s)) for s in fixed.GetSpacing()])
    moving = sitk.BinShrink(moving, [max(1, round(REGISTRATION_MM / s)) for s in moving.GetSpacing()])
    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(REGISTRATION_THREADS)
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.1, REGISTRATION_SEED)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=100, relaxationFactor=0.5
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(initial, inPlace=False)
    try:
        with _itk_threads(REGISTRATION_THREADS):
            transform = method.Execute(fixed, moving)
    except RuntimeError as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise BrainFMInputError(
            scan.source_path or None, f"template registration failed ({message})"
        ) from exc
    return transform


def _transform_matrix(transform) -> np.ndarray:
    """4x4 homogeneous matrix of a (composite of) affine SimpleITK transform(s), by probing points."""
    points = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    mapped = np.array([transform.TransformPoint(tuple(p)) for p in points])
    matrix = np.eye(4)
    matrix[:3, :3] = (mapped[1:] - mapped[0]).T
    matrix[:3, 3] = mapped[0]
    return matrix


def compute_anatomy(scan: PreprocessedScan, recipe: PreprocessConfig) -> AnatomyMaps:
    """Register the template to the scan, bring the requested priors onto the recipe grid (masked by the scan's
    brain mask), and derive brain volume and tissue fractions. Never reads ``scan.label``."""
    import SimpleITK as sitk

    if not scan.mask.any():
        raise BrainFMInputError(scan.source_path or None, "empty brain mask: no anatomy to compute")
    template = load_template(recipe.template_resolution)
    transform = register_template(scan, recipe)
    matrix = _transform_matrix(transform)
    # A registration that collapses or explodes the brain would hand the model nonsense conditioning.
    volume_ratio = abs(np.linalg.det(matrix[:3, :3]))
    if not 0.3 < volume_ratio < 3.0:
        raise BrainFMInputError(
            scan.source_path or None, f"template registration diverged (volume scale {volume_ratio:.2f})"
        )
    reference = _sitk_image(scan.image, scan.affine)
    mask = scan.mask > 0
    # gm and wm fractions are always reported so metadata keys do not depend on which priors are conditioned on.
    names = list(dict.fromkeys(["gm", "wm", *recipe.tissue_priors]))
    on_scan = {}
    for name in names:
        moved = sitk.Resample(
            _sitk_image(template.priors[name], template.affine),
            reference,
            transform,
            sitk.sitkLinear,
            0.0,
            sitk.sitkFloat32,
        )
        prior = np.transpose(sitk.GetArrayFromImage(moved), (2, 1, 0))
        on_scan[name] = (np.clip(prior, 0.0, 1.0) * mask).astype(np.float32)

    brain_voxels = float(mask.sum())
    voxel_ml = abs(float(np.linalg.det(scan.affine[:3, :3]))) / 1000.0
    scalars = {"brain_volume_ml": brain_voxels * voxel_ml}
    for name in names:
        scalars[f"{name}_fraction"] = float(on_scan[name].sum(dtype=np.float64) / brain_voxels)
    priors = np.stack([on_scan[name] for name in recipe.tissue_priors]).astype(np.float32)
    return AnatomyMaps(priors=priors, scalars=scalars, scan_to_template=matrix)
