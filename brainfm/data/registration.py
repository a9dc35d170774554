"""Template space and deterministic SimpleITK registration: one affine per scan for alignment, tissue priors and
the template route of brain extraction, and a deformable one for carrying an atlas's labels onto another head.

The template is ICBM152 2009a as nilearn ships it (T1, brain mask, GM/WM/CSF probabilities; no download). A scan's
brain is registered to it ONCE per scan (``register_affine``): the rotation of that affine defines the model grid (so
tilted heads are seen upright, ``brainfm.data.preprocess``) and the same affine places the tissue priors
(``brainfm.data.anatomy``). The template route of brain extraction (``brainfm.data.extraction``) registers the OASIS
head with skull to a scan the same way.

``register_affine``: Mattes mutual information (works across T1/T2/FLAIR/CT contrasts), images averaged to about
``REGISTRATION_MM``; a rigid+scale (similarity) stage from five initial tilts (heads come pitched and rolled by tens
of degrees, beyond the capture range of a single start), the best kept, then an affine over two pyramid levels,
kept only if its metric beats the similarity's.

``register_deformable`` (``brainfm.data.anatomies``: OASIS's labels onto the other real heads, all T1 on 1 mm grids):
a similarity from five initial pitches, an affine, then fast symmetric-forces demons on histogram-matched images --
demons needs one contrast on both sides, which is why alignment and extraction use the affine alone.

Random metric sampling uses a fixed seed and ITK runs on one thread, so every result is bit-identical on every run
and machine (ITK sums partial results per thread).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
from scipy import ndimage

from brainfm.io import BrainFMInputError

REGISTRATION_SEED = 20240917  # SimpleITK treats seed 0 as "seed from the wall clock": never use 0
REGISTRATION_THREADS = 1  # ITK sums metric terms per thread: one thread makes results bit-identical everywhere
REGISTRATION_MM = 4.0
# initial (pitch, roll) of the similarity stage: upright, and tilted both ways about each axis
START_TILTS_DEG = ((0.0, 0.0), (25.0, 0.0), (-25.0, 0.0), (0.0, 25.0), (0.0, -25.0))
MAX_VOLUME_SCALE = 3.0  # an affine that shrinks or grows the brain more than this has diverged


@dataclasses.dataclass(frozen=True)
class Template:
    """ICBM152 2009a: T1 (skull-stripped), brain mask and tissue probabilities on one grid."""

    t1: np.ndarray
    mask: np.ndarray
    priors: dict[str, np.ndarray]
    affine: np.ndarray


@functools.lru_cache(maxsize=2)
def load_template(resolution: int) -> Template:
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
    return Template(arrays[0], mask, {"gm": gm, "wm": wm, "csf": csf}, np.asarray(t1_image.affine, np.float64))


@contextlib.contextmanager
def itk_threads(count: int) -> Iterator[None]:
    """Pin ITK's global thread count: the registration method's own setting does not reach the optimizer-scale
    estimator and metric internals, whose per-thread partial sums otherwise vary in the last bits between runs."""
    import SimpleITK as sitk

    previous = sitk.ProcessObject_GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(count)
    try:
        yield
    finally:
        sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(previous)


def sitk_image(array: np.ndarray, affine: np.ndarray) -> Any:
    """(X,Y,Z) array (its dtype kept) + affine as a SimpleITK image; all images share one world, so no LPS flip is
    needed."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(d) for d in (affine[:3, :3] / spacing).ravel()])
    image.SetOrigin([float(o) for o in affine[:3, 3]])
    return image


def from_sitk(image: Any) -> np.ndarray:
    """A SimpleITK image's voxels as an (X,Y,Z) array."""
    import SimpleITK as sitk

    return np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))


def transform_matrix(transform: Any) -> np.ndarray:
    """4x4 homogeneous matrix of a (composite of) affine SimpleITK transform(s), by probing points."""
    points = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    mapped = np.array([transform.TransformPoint(tuple(p)) for p in points])
    matrix = np.eye(4)
    matrix[:3, :3] = (mapped[1:] - mapped[0]).T
    matrix[:3, 3] = mapped[0]
    return matrix


def resample_through(
    array: np.ndarray,
    array_affine: np.ndarray,
    matrix: np.ndarray,
    shape: tuple[int, ...],
    affine: np.ndarray,
    order: int = 1,
    fill: float = 0.0,
) -> np.ndarray:
    """``array`` sampled at the voxel centres of (``shape``, ``affine``), whose world points ``matrix`` maps into
    the array's world (the direction ``register_affine`` returns); ``fill`` outside the array. (scipy: for working
    copies; the model input itself is resampled with MONAI in ``brainfm.data.volume.resample_to_grid``.)"""
    pull = np.linalg.inv(array_affine) @ matrix @ affine
    source = np.asarray(array, dtype=np.float32)
    return ndimage.affine_transform(source, pull[:3, :3], offset=pull[:3, 3], output_shape=tuple(shape),
                                    order=order, mode="constant", cval=float(fill))


def rotation_part(matrix: np.ndarray) -> np.ndarray:
    """The proper rotation nearest to a 4x4 affine's linear part (polar decomposition via SVD): the rigid
    motion of a registration whose scale and shear only describe the subject's brain shape."""
    u, _, vt = np.linalg.svd(matrix[:3, :3])
    if np.linalg.det(u @ vt) < 0:
        u[:, -1] = -u[:, -1]
    return u @ vt


def rotation_degrees(rotation: np.ndarray) -> float:
    """Angle of a 3x3 rotation in degrees."""
    return float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0))))


def _affine_method(shrink: list[int], iterations: int, fixed_mask: Any | None, moving_mask: Any | None,
                   learning_rate: float = 1.0) -> Any:
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(REGISTRATION_THREADS)
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.2, REGISTRATION_SEED)
    if fixed_mask is not None:
        method.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        method.SetMetricMovingMask(moving_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=learning_rate, minStep=1e-3,
                                                    numberOfIterations=iterations, relaxationFactor=0.5)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel([s / 2.0 for s in shrink])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return method


def _metric(fixed_img: Any, moving_img: Any, transform: Any, fixed_mask: Any | None, moving_mask: Any | None) -> float:
    """Mattes MI of ``transform`` at full registration resolution (lower is better), to compare two results."""
    method = _affine_method([1], 1, fixed_mask, moving_mask)
    method.SetInitialTransform(transform, inPlace=False)
    return float(method.MetricEvaluate(fixed_img, moving_img))


def _shrunk(array: np.ndarray, affine: np.ndarray, mm: float) -> Any:
    import SimpleITK as sitk

    image = sitk_image(array, affine)
    return sitk.BinShrink(image, [max(1, round(mm / s)) for s in image.GetSpacing()])


def _shrunk_mask(mask: np.ndarray, affine: np.ndarray) -> Any:
    import SimpleITK as sitk

    return sitk.Cast(_shrunk(np.asarray(mask, np.float32), affine, REGISTRATION_MM) > 0.5, sitk.sitkUInt8)


def register_affine(
    fixed: np.ndarray,
    fixed_affine: np.ndarray,
    moving: np.ndarray,
    moving_affine: np.ndarray,
    *,
    source: Any = None,
    moving_mask: np.ndarray | None = None,
    fixed_mask: np.ndarray | None = None,
    refine_masks: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """4x4 affine taking ``fixed`` world points to ``moving`` world points (SimpleITK's fixed-to-moving map).

    ``moving_mask``/``fixed_mask`` limit the metric (and the centre-of-mass start) to part of each image, e.g. a
    head's brain and skull, so a neck, a face or the field of view never pull it; ``refine_masks`` (fixed, moving)
    replace them for the affine stage. A registration that diverges raises ``BrainFMInputError`` naming ``source``.
    """
    import SimpleITK as sitk

    with itk_threads(REGISTRATION_THREADS):
        fixed_img = _shrunk(fixed, fixed_affine, REGISTRATION_MM)
        moving_img = _shrunk(moving, moving_affine, REGISTRATION_MM)
        mask_img = None if moving_mask is None else _shrunk_mask(moving_mask, moving_affine)
        fixed_mask_img = None if fixed_mask is None else _shrunk_mask(fixed_mask, fixed_affine)
        try:
            # centres of mass of the masked regions: a neck, a face or a wide field of view does not pull the start
            centred = sitk.CenteredTransformInitializer(
                fixed_img if fixed_mask_img is None else fixed_img * sitk.Cast(fixed_mask_img, sitk.sitkFloat32),
                moving_img if mask_img is None else moving_img * sitk.Cast(mask_img, sitk.sitkFloat32),
                sitk.Similarity3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS)
            best: tuple[float, Any] | None = None
            for pitch, roll in START_TILTS_DEG:
                start = sitk.Similarity3DTransform(centred)
                start.SetMatrix([float(v) for v in _rotation_xy(pitch, roll).ravel()])
                method = _affine_method([2], 40, fixed_mask_img, mask_img)
                method.SetInitialTransform(start, inPlace=True)
                method.Execute(fixed_img, moving_img)
                value = method.GetMetricValue()
                if best is None or value < best[0]:
                    best = (value, start)
            assert best is not None
            affine = sitk.AffineTransform(3)
            affine.SetCenter(best[1].GetCenter())
            affine.SetMatrix(best[1].GetMatrix())
            affine.SetTranslation(best[1].GetTranslation())
            if refine_masks is not None:
                fixed_mask_img = _shrunk_mask(refine_masks[0], fixed_affine)
                mask_img = _shrunk_mask(refine_masks[1], moving_affine)
            similarity = sitk.AffineTransform(affine)
            # half the similarity stage's step: at 1.0 an affine walked off to a third of the brain's volume
            method = _affine_method([2, 1], 100, fixed_mask_img, mask_img, learning_rate=0.5)
            method.SetInitialTransform(affine, inPlace=True)
            method.Execute(fixed_img, moving_img)
            # the affine must improve on the similarity it started from, else the similarity is kept
            if _metric(fixed_img, moving_img, affine, fixed_mask_img, mask_img) > _metric(
                    fixed_img, moving_img, similarity, fixed_mask_img, mask_img):
                affine = similarity
        except RuntimeError as exc:
            message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise BrainFMInputError(source, f"template registration failed ({message})") from exc
    matrix = transform_matrix(affine)
    scale = abs(float(np.linalg.det(matrix[:3, :3])))
    if not 1.0 / MAX_VOLUME_SCALE < scale < MAX_VOLUME_SCALE:
        raise BrainFMInputError(source, f"template registration diverged (volume scale {scale:.2f})")
    return matrix


def _rotation_xy(pitch_deg: float, roll_deg: float) -> np.ndarray:
    """3x3 rotation: ``roll_deg`` about y after ``pitch_deg`` about x."""
    a, b = np.deg2rad(pitch_deg), np.deg2rad(roll_deg)
    about_x = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    about_y = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return about_y @ about_x


# ------------------------------------------------------------------------------------------------------------
# Label transfer between heads (brainfm.data.anatomies)
# ------------------------------------------------------------------------------------------------------------


def register_deformable(fixed: np.ndarray, fixed_affine: np.ndarray, moving: np.ndarray,
                        moving_affine: np.ndarray, moving_mask: np.ndarray) -> Any:
    """Transform taking ``fixed`` world points to ``moving`` world points, driven by the moving image inside
    ``moving_mask`` (its brain dilated to take the skull in, so faces, necks and fields of view never pull it).

    A similarity transform from five initial pitches (heads come tilted) keeps the best Mattes mutual information at
    8 mm, then an affine at 8 then 4 mm; then fast symmetric-forces demons at 4 mm on the histogram-matched images
    cut to the mask. Inputs are 1 mm grids. Seeded and single-threaded, so the result never changes.
    """
    import SimpleITK as sitk

    with itk_threads(1):
        fixed_img = sitk.BinShrink(sitk_image(fixed.astype(np.float32), fixed_affine), [2, 2, 2])
        moving_img = sitk.BinShrink(sitk_image(moving.astype(np.float32), moving_affine), [2, 2, 2])
        mask_img = sitk.BinShrink(sitk_image(moving_mask.astype(np.uint8), moving_affine), [2, 2, 2]) > 0
        centre = sitk.CenteredTransformInitializer(fixed_img, moving_img, sitk.Similarity3DTransform(),
                                                   sitk.CenteredTransformInitializerFilter.MOMENTS)
        best = None
        for pitch in (-20.0, -10.0, 0.0, 10.0, 20.0):
            start = sitk.Similarity3DTransform(centre)
            start.SetRotation((1.0, 0.0, 0.0), float(np.deg2rad(pitch)))
            method = _registration_method(mask_img, [4], iterations=60)
            method.SetInitialTransform(start, inPlace=False)
            transform = method.Execute(fixed_img, moving_img)
            if best is None or method.GetMetricValue() < best[0]:
                best = (method.GetMetricValue(), transform)
        affine_tx = sitk.AffineTransform(3)
        affine_tx.SetCenter(centre.GetCenter())
        similarity = sitk.Similarity3DTransform(best[1].GetNthTransform(0) if best[1].GetName() ==
                                                "CompositeTransform" else best[1])
        affine_tx.SetMatrix(similarity.GetMatrix())
        affine_tx.SetTranslation(similarity.GetTranslation())
        affine_tx.SetCenter(similarity.GetCenter())
        method = _registration_method(mask_img, [4, 2], iterations=100)
        method.SetInitialTransform(affine_tx, inPlace=False)
        affine_tx = method.Execute(fixed_img, moving_img)
        region = sitk.Resample(sitk.Cast(mask_img, sitk.sitkFloat32), fixed_img, affine_tx, sitk.sitkLinear, 0.0)
        moved = sitk.Resample(moving_img, fixed_img, affine_tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32) * region
        matched = sitk.HistogramMatching(moved, fixed_img * region, numberOfHistogramLevels=128,
                                         numberOfMatchPoints=15, thresholdAtMeanIntensity=True)
        demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()  # at 4 mm: 2 mm costs 5x for Dice +0.01
        demons.SetNumberOfIterations(60)
        demons.SetStandardDeviations(1.5)
        field = demons.Execute(sitk.BinShrink(fixed_img * region, [2, 2, 2]), sitk.BinShrink(matched, [2, 2, 2]))
        displacement = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    return sitk.CompositeTransform([affine_tx, displacement])


def _registration_method(moving_mask: Any, shrink: list[int], iterations: int) -> Any:
    """The deformable transfer's similarity/affine stages (smoothing in mm; ``_affine_method`` smooths in voxels:
    each is what its own accuracy was measured with)."""
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.2, REGISTRATION_SEED)
    method.SetMetricMovingMask(moving_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=iterations,
                                                    relaxationFactor=0.5)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel([s / 2.0 for s in shrink])
    return method


def warp(transform, moving: np.ndarray, moving_affine: np.ndarray, shape: tuple[int, ...],
         affine: np.ndarray, order: int) -> np.ndarray:
    """``moving`` resampled onto (``shape``, ``affine``) through ``register_deformable``'s transform (order 0:
    labels)."""
    import SimpleITK as sitk

    reference = sitk_image(np.zeros(shape, np.uint8), affine)
    interpolator = sitk.sitkNearestNeighbor if order == 0 else sitk.sitkLinear
    with itk_threads(1):
        moved = sitk.Resample(sitk_image(moving.astype(np.float32), moving_affine), reference, transform,
                              interpolator, 0.0, sitk.sitkFloat32)
    return from_sitk(moved)
