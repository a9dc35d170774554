"""Turn one scan straight from the scanner into model input on the recipe grid, and map model output back.

The recipe (``PreprocessConfig``) is stored with every shard set and model, so inference repeats exactly the
geometry and intensity mapping the model was trained on. ``preprocess_scan`` runs these stages, timing each
(``PreprocessedScan.provenance`` records what each did, for every output JSON):

1. **read** (``brainfm.data.volume.load_volume``): NIfTI or a DICOM series, checked before work; the modality is
   checked against the intensities, or CT vs MRI inferred when none is named (``brainfm.data.modality``).
2. **extraction**: a working copy on an axis-aligned RAS grid at ``WORK_MM`` (thick slices,
   anisotropic, oblique, gantry-tilted and LPS inputs all arrive the same way) and its brain found there: a given
   mask (thresholded at ``recipe.mask_threshold``), else ``brainfm.data.extraction.extract_brain`` (deepbet for
   T1, the co-registered T1 or a registered head template for other MRI, Hounsfield units for CT; skull-stripped
   inputs kept as they are), or with ``recipe.brain_extraction`` off the intensity mask of ``derive_brain_mask``.
3. **bias_correction** (MRI, ``recipe.bias_correction``): N4 log bias field fitted at reduced resolution
   (``brainfm.data.bias``).
4. **alignment** (``recipe.align_to_template``): the extracted brain is registered (affine, mutual information) to
   the ICBM152 template; the rotation of that affine orients the model grid, so tilted heads are seen upright. The
   same affine is kept as ``scan_to_template`` and places the tissue priors (``brainfm.data.anatomy``): one
   registration per scan. Without alignment the grid stays axis-aligned on the input's RAS lattice.
5. **resample**: the model grid (``recipe.shape`` voxels of ``recipe.spacing`` centred on the brain) is filled from
   the INPUT voxels in one interpolation (bias divided out), the mask and any lesion label come along
   (nearest-neighbour for the label, which must lie on its image's grid); MRI is clipped to
   ``recipe.mri_percentiles`` inside the brain and scaled to [0, 1], CT is the ``recipe.ct_window`` HU window;
   0 outside the brain.

The output affine is in the input's world, so ``to_input_space`` brings any model-grid array back onto the input's
own voxel grid through the inverse of that affine (rotation included).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import ScaleIntensityRange
from scipy import ndimage

from brainfm.config import PreprocessConfig, to_dict
from brainfm.data.bias import n4_log_bias
from brainfm.data.extraction import derive_brain_mask, extract_brain
from brainfm.data.modality import resolve_modality
from brainfm.data.registration import (
    Template,
    load_template,
    register_affine,
    resample_through,
    rotation_degrees,
    rotation_part,
)
from brainfm.data.volume import load_volume, read_volume, resample_to_grid, working_grid
from brainfm.io import BrainFMInputError

RECIPE_ID = "brainfm.data.preprocess"
WORK_MM = 1.5  # working grid of extraction, bias correction and alignment (deepbet works at ~1-2 mm)
GRID_TOLERANCE_VOX = 0.01  # a label's voxel centres may sit this far (in voxels) from its image's
FRONT_END_FIELDS = ("brain_extraction", "bias_correction", "align_to_template")  # absent from older recipes
_CT_LIKE_HU = {"gm": 40.0, "wm": 28.0, "csf": 8.0}  # typical unenhanced brain CT values
BRAIN_ML_RANGE = (800.0, 2200.0)  # extracted brain (with CSF) of adults; outside it the extraction likely failed
MAX_SLICE_RATIO = 2.0  # input voxels longer than this many recipe voxels: detail along them is interpolated


@dataclasses.dataclass
class PreprocessedScan:
    """One scan on the recipe grid plus what is needed to map results back to the input's voxel grid."""

    image: np.ndarray  # float32 (X,Y,Z) on the recipe grid, in [0, 1], 0 outside the mask
    mask: np.ndarray  # uint8 (X,Y,Z) brain mask on the same grid
    affine: np.ndarray  # 4x4 affine of the recipe grid, same world space as the input
    source_affine: np.ndarray  # the input's affine
    source_shape: tuple[int, int, int]
    modality: str
    label: np.ndarray | None = None  # uint8 lesion mask on the recipe grid (nearest-neighbour), if given
    source_path: str = ""
    scan_to_template: np.ndarray | None = None  # 4x4 affine, scan world -> template world (alignment's)
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)  # what each stage did, and seconds
    source_mask: np.ndarray | None = None  # bool brain mask on the input's grid (given or extracted)

    @property
    def brain_volume_ml(self) -> float:
        """Volume of the extracted brain before the grid was cut (the sanity figure of every output)."""
        return float(self.provenance.get("brain_volume_ml", 0.0))


# ------------------------------------------------------------------------------------------------------------
# Intensities
# ------------------------------------------------------------------------------------------------------------


def normalise_mri(image: np.ndarray, mask: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Clip to the intensity percentiles inside the brain and scale to [0, 1]; MRI units are arbitrary, so
    only the within-brain distribution is comparable between scanners."""
    inside = image[mask > 0]
    lo, hi = np.percentile(inside, percentiles)
    if not hi > lo:
        raise ValueError(f"no intensity contrast inside the brain mask (percentiles {lo:g} == {hi:g})")
    scaled = ScaleIntensityRange(a_min=float(lo), a_max=float(hi), b_min=0.0, b_max=1.0, clip=True)(image)
    return (np.asarray(scaled, dtype=np.float32) * (mask > 0)).astype(np.float32)


def window_ct(image: np.ndarray, mask: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Map the Hounsfield window to [0, 1]; HU are absolute, so a fixed window compares across scanners."""
    lo, hi = window
    scaled = ScaleIntensityRange(a_min=float(lo), a_max=float(hi), b_min=0.0, b_max=1.0, clip=True)(image)
    return (np.asarray(scaled, dtype=np.float32) * (mask > 0)).astype(np.float32)


def template_contrast(template: Template, modality: str, recipe: PreprocessConfig) -> np.ndarray:
    """The template brain in a scan's intensity convention ([0, 1], 0 outside the brain): the T1 for MRI (mutual
    information copes with the other contrasts), HU from the tissue probabilities for CT."""
    if modality == "CT":
        hu = sum(_CT_LIKE_HU[name] * prior for name, prior in template.priors.items())
        return window_ct(hu, template.mask, recipe.ct_window)
    return normalise_mri(template.t1, template.mask, recipe.mri_percentiles)


def _normalise(image: np.ndarray, mask: np.ndarray, modality: str, recipe: PreprocessConfig) -> np.ndarray:
    if modality == "CT":
        return window_ct(image, mask, recipe.ct_window)
    return normalise_mri(image, mask, recipe.mri_percentiles)


# ------------------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------------------


def _model_grid(
    centre: np.ndarray, rotation: np.ndarray | None, recipe: PreprocessConfig, lattice: np.ndarray
) -> np.ndarray:
    """Affine of the model grid: ``recipe.shape`` voxels of ``recipe.spacing`` around the brain's ``centre``
    (world). With a ``rotation`` (scan world -> template world) the grid axes are the template's axes; without, it
    is axis-aligned and snapped to the input's RAS ``lattice`` (so an input already at the recipe spacing is
    sampled at its own voxel centres, exactly)."""
    half = np.array([s // 2 for s in recipe.shape], dtype=np.float64)
    spacing = np.diag(np.asarray(recipe.spacing, dtype=np.float64))
    grid = np.eye(4)
    if rotation is None:
        steps = np.rint((centre - lattice[:3, 3]) / np.asarray(recipe.spacing)) - half
        grid[:3, :3] = spacing
        grid[:3, 3] = lattice[:3, 3] + steps * np.asarray(recipe.spacing)
        return grid
    grid[:3, :3] = rotation.T @ spacing
    grid[:3, 3] = centre - grid[:3, :3] @ half
    return grid


def _check_same_grid(
    path: str | Path,
    shape: tuple[int, ...],
    affine: np.ndarray,
    image_shape: tuple[int, ...],
    image_affine: np.ndarray,
) -> None:
    """A lesion label must be drawn on its image's voxels: same shape, and voxel centres (checked at the
    grid's corners) within ``GRID_TOLERANCE_VOX`` of a voxel. Resampling a label from another grid would move
    lesions without a word."""
    if tuple(shape) != tuple(image_shape):
        raise BrainFMInputError(
            path,
            f"lesion label grid {'x'.join(map(str, shape))} does not match its image's "
            f"{'x'.join(map(str, image_shape))}; give the label on the image's own voxel grid",
        )
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in shape])), dtype=np.float64)
    offset = (corners @ (affine[:3, :3] - image_affine[:3, :3]).T) + (affine[:3, 3] - image_affine[:3, 3])
    voxel_mm = float(np.linalg.norm(image_affine[:3, :3], axis=0).min())
    shift = float(np.linalg.norm(offset, axis=1).max()) / voxel_mm
    if shift > GRID_TOLERANCE_VOX:
        raise BrainFMInputError(
            path,
            f"lesion label grid (affine) does not match its image's: voxels differ by up to {shift:.3g} "
            "voxel(s); give the label on the image's own voxel grid",
        )


def _load_mask_like(path: str | Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        return read_volume(path)
    except BrainFMInputError as exc:
        raise BrainFMInputError(path, f"{what}: {exc.problem}") from None


# ------------------------------------------------------------------------------------------------------------
# Public pipeline
# ------------------------------------------------------------------------------------------------------------


class _Clock:
    """Seconds per stage, for the provenance record and the benchmark."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._last, 3)
        self._last = now


def _align(
    image: np.ndarray, brain: np.ndarray, affine: np.ndarray, modality: str, recipe: PreprocessConfig, source: Any
) -> np.ndarray:
    """scan-world -> template-world affine of the extracted brain (see ``brainfm.data.registration.register_affine``)."""
    template = load_template(recipe.template_resolution)
    try:
        fixed = _normalise(image, brain, modality, recipe)
    except ValueError as exc:
        raise BrainFMInputError(source, str(exc)) from None
    return register_affine(fixed, affine, template_contrast(template, modality, recipe), template.affine, source=source)


def preprocess_scan(
    path: str | Path,
    modality: str | None,
    recipe: PreprocessConfig,
    mask_path: str | Path | None = None,
    label_path: str | Path | None = None,
    *,
    t1_path: str | Path | None = None,
    serves: Sequence[str] | None = None,
    grid: np.ndarray | None = None,
) -> PreprocessedScan:
    """Read, check, extract the brain, correct the bias, align, resample and normalise one scan (see the module
    docstring).

    ``modality`` None: CT vs MRI is inferred from the intensities (an MRI then takes the one MRI contrast in
    ``serves``); a named modality the intensities contradict is refused. ``t1_path``: a T1 of the same subject in
    the same world coordinates, used to extract the brain of a non-T1 MRI. Raises ``BrainFMInputError`` (one line
    naming the file) for inputs that cannot be served, including a lesion label off the image's grid or one whose
    lesion vanishes on the recipe grid (so evaluation never counts it as a healthy control). ``grid``: the model-grid
    affine of a co-registered reference contrast of the same subject (multi-channel input): the scan is resampled
    onto it instead of being aligned on its own, so every channel shares one grid.
    """
    clock = _Clock()
    data, source_affine = load_volume(path)
    modality, modality_record = resolve_modality(path, data, modality, serves)
    clock.lap("read")

    work_affine, work_size = working_grid(source_affine, data.shape, (WORK_MM,) * 3)
    # Outside the field of view takes the volume's minimum (air for CT, background for MRI), not 0, which would be
    # brain-like HU in CT.
    fill = float(data.min())
    work = resample_through(data, source_affine, np.eye(4), work_size, work_affine, order=1, fill=fill)
    given_mask = None
    if mask_path is not None:
        mask_data, mask_affine = _load_mask_like(mask_path, "brain mask")
        given_mask = ((mask_data >= recipe.mask_threshold).astype(np.float32), mask_affine)
        brain = resample_through(*given_mask, np.eye(4), work_size, work_affine, order=0) > 0.5
        method = f"given mask {mask_path}"
    elif recipe.brain_extraction:
        extraction = extract_brain(work, work_affine, modality, recipe, work_mm=WORK_MM, t1_path=t1_path,
                                   source=path)
        brain, method = extraction.mask, extraction.method
    else:
        brain, method = derive_brain_mask(work, modality, recipe), "intensity mask (brain_extraction off)"
    if not brain.any():
        raise BrainFMInputError(mask_path or path, "empty brain mask on the scan's grid (no overlap or nothing found)")
    clock.lap("extraction")

    log_bias = None
    if recipe.bias_correction and modality != "CT":
        log_bias = n4_log_bias(work, brain, work_affine)
        work = work / np.exp(log_bias)
        clock.lap("bias_correction")
    scan_to_template = rotation = None
    if recipe.align_to_template and grid is None:
        scan_to_template = _align(work, brain, work_affine, modality, recipe, path)
        rotation = rotation_part(scan_to_template)
        clock.lap("alignment")

    centre = (work_affine @ np.append(np.argwhere(brain).mean(axis=0), 1.0))[:3]
    lattice, _ = working_grid(source_affine, data.shape, recipe.spacing)
    grid = _model_grid(centre, rotation, recipe, lattice) if grid is None else np.asarray(grid, dtype=np.float64)
    shape = list(recipe.shape)
    image = resample_to_grid(data, source_affine, grid, shape, mode="bilinear", fill=fill)
    if log_bias is not None:
        image = image / np.exp(resample_through(log_bias, work_affine, np.eye(4), shape, grid, order=1))
    if given_mask is not None:
        mask_out = resample_to_grid(*given_mask, grid, shape, mode="nearest") > 0.5
    else:
        mask_out = resample_to_grid(brain.astype(np.float32), work_affine, grid, shape, mode="bilinear") > 0.5
    mask_out = mask_out.astype(np.uint8)
    if not mask_out.any():
        raise BrainFMInputError(mask_path or path, "empty brain mask on the model grid")
    try:
        image = _normalise(image, mask_out, modality, recipe)
    except ValueError as exc:
        raise BrainFMInputError(path, str(exc)) from None
    label = None
    if label_path is not None:
        label = _label_on_grid(label_path, data.shape, source_affine, grid, recipe)
    if given_mask is not None and given_mask[0].shape == data.shape and np.allclose(given_mask[1], source_affine):
        source_mask = given_mask[0] > 0.5
    elif given_mask is not None:
        source_mask = resample_through(*given_mask, np.eye(4), data.shape, source_affine, order=0) > 0.5
    else:
        source_mask = resample_through(brain.astype(np.float32), work_affine, np.eye(4), data.shape, source_affine,
                                       order=0) > 0.5
    clock.lap("resample")

    spacing = np.linalg.norm(source_affine[:3, :3], axis=0)
    brain_ml = float(brain.sum()) * WORK_MM**3 / 1000.0
    provenance = {
        "modality": {"name": modality, **modality_record},
        "brain_extraction": method,
        "brain_volume_ml": round(brain_ml, 1),
        "bias_correction": "N4 (SimpleITK)" if log_bias is not None else "off",
        "alignment_rotation_degrees": None if rotation is None else round(rotation_degrees(rotation), 2),
        "source_spacing_mm": [round(float(s), 3) for s in spacing],
        "seconds": clock.seconds,
        "warnings": _warnings(brain_ml, spacing, recipe),
    }
    return PreprocessedScan(
        image=np.ascontiguousarray(image, dtype=np.float32),
        mask=mask_out,
        affine=grid,
        source_affine=source_affine,
        source_shape=tuple(int(n) for n in data.shape),
        modality=modality,
        label=label,
        source_path=str(path),
        scan_to_template=scan_to_template,
        provenance=provenance,
        source_mask=source_mask,
    )


def _warnings(brain_ml: float, spacing: np.ndarray, recipe: PreprocessConfig) -> list[str]:
    """Results that are produced but must not be trusted silently (copied into every output JSON and figure)."""
    warnings = []
    low, high = BRAIN_ML_RANGE
    if not low <= brain_ml <= high:
        warnings.append(f"extracted brain volume {brain_ml:.0f} ml is outside {low:.0f}-{high:.0f} ml: the brain "
                        "extraction likely failed (check the mask, or give one)")
    finest = min(recipe.spacing)
    if float(spacing.max()) > MAX_SLICE_RATIO * finest:
        warnings.append(f"slice thickness {float(spacing.max()):.1f} mm exceeds {MAX_SLICE_RATIO:g}x the model's "
                        f"{finest:g} mm spacing: detail between slices is interpolated, small lesions may be missed")
    return warnings


def _label_on_grid(
    label_path: str | Path,
    shape: tuple[int, ...],
    affine: np.ndarray,
    grid: np.ndarray,
    recipe: PreprocessConfig,
) -> np.ndarray:
    """A lesion label (on its image's grid, integer classes) brought nearest-neighbour onto the model grid; one whose
    lesion voxels all fall outside the grid is refused, so the scan is never scored as a healthy control."""
    label_data, label_affine = _load_mask_like(label_path, "lesion label")
    _check_same_grid(label_path, label_data.shape, label_affine, shape, affine)
    if np.any(label_data < 0) or np.any(label_data > 255) or np.any(label_data != np.round(label_data)):
        raise BrainFMInputError(label_path, "lesion label must hold integer classes in 0..255")
    label = np.rint(resample_to_grid(label_data, affine, grid, list(recipe.shape), mode="nearest")).astype(np.uint8)
    lesion_voxels = int(np.count_nonzero(label_data))
    if lesion_voxels and not label.any():
        raise BrainFMInputError(
            label_path,
            f"lesion label: all {lesion_voxels} lesion voxel(s) fall outside the model grid after "
            f"preprocessing ({'x'.join(map(str, recipe.shape))} voxels of {list(recipe.spacing)} mm "
            "around the brain); refused so the scan is never scored as a healthy control",
        )
    return label


# Input voxels coarser than this many recipe voxels: most of the model input is invented. Clinical 5-7 mm slices
# still serve a 2 mm model (preprocessing warns above 2x).
MAX_SPACING_RATIO = 3.5
MAX_BORDER_BRAIN_FRACTION = 0.02  # more brain than this on the grid's faces: the brain was cut off by the FOV
MIN_BRAIN_ML = 300.0  # less brain than this: partial coverage (a few slices) or not a head scan


def check_serving_geometry(scan: PreprocessedScan, recipe: PreprocessConfig, path: str | Path) -> None:
    """Refuse (one line naming ``path``) a scan a model with ``recipe`` cannot serve: slices far coarser than its
    grid, too little brain, or a brain cut by the grid's field of view."""
    source_spacing = np.linalg.norm(np.asarray(scan.source_affine)[:3, :3], axis=0)
    finest = min(recipe.spacing)
    if float(source_spacing.max()) > MAX_SPACING_RATIO * finest:
        raise BrainFMInputError(
            path, f"voxel spacing {np.round(source_spacing, 2).tolist()} mm is too coarse for a model trained "
                  f"at {list(recipe.spacing)} mm (more than {MAX_SPACING_RATIO:g}x)",
        )
    mask = np.asarray(scan.mask) > 0
    brain_ml = float(mask.sum()) * abs(float(np.linalg.det(scan.affine[:3, :3]))) / 1000.0
    if brain_ml < MIN_BRAIN_ML:
        raise BrainFMInputError(path, f"only {brain_ml:.0f} ml of brain found (partial coverage or not a head "
                                      f"scan; at least {MIN_BRAIN_ML:.0f} ml needed)")
    border = np.zeros_like(mask)
    for axis in range(3):
        index: list[Any] = [slice(None)] * 3
        for end in (0, -1):
            index[axis] = end
            border[tuple(index)] = True
    on_border = float((mask & border).sum()) / float(mask.sum())
    if on_border > MAX_BORDER_BRAIN_FRACTION:
        raise BrainFMInputError(path, f"the brain does not fit the model's field of view ({on_border:.1%} of "
                                      f"brain voxels on the edge of the {list(recipe.shape)} grid)")


def to_input_space(array: np.ndarray, scan: PreprocessedScan, order: int = 1) -> np.ndarray:
    """Map an (X,Y,Z) array on the recipe grid back onto the input's own voxel grid through the two affines
    (rotation included), so results can be written as NIfTI that overlays the user's scan. ``order=0`` for masks.

    Interpolated maps keep to the nearest-neighbour footprint of their nonzero voxels: a brain-masked map does not
    bleed a model voxel's width past the brain edge (on a rotated grid that fringe would reach the scalp). Every
    map is then cut to the brain mask on the input's grid (``scan.source_mask``), so nothing lies outside the
    brain the user gave or the extractor found."""
    array = np.asarray(array)
    if array.shape != scan.image.shape:
        raise ValueError(f"array shape {array.shape} does not match the recipe grid {scan.image.shape}")
    source_to_recipe = np.linalg.inv(scan.affine) @ scan.source_affine

    def pull(values: np.ndarray, interpolation: int) -> np.ndarray:
        return ndimage.affine_transform(values, source_to_recipe[:3, :3], offset=source_to_recipe[:3, 3],
                                        output_shape=scan.source_shape, order=interpolation, mode="constant",
                                        cval=0.0)

    brain = True if scan.source_mask is None else scan.source_mask
    if order == 0:
        return (pull(array, 0) * brain).astype(array.dtype)
    footprint = (pull((array != 0).astype(np.uint8), 0) > 0) & brain
    return (pull(array.astype(np.float32), order) * footprint).astype(np.float32)


def recipe_dict(recipe: PreprocessConfig) -> dict:
    """JSON-able copy of the recipe with the code that applies it, stored beside shards and models."""
    from brainfm.version import __version__

    return {"id": RECIPE_ID, "brainfm_version": __version__, "params": to_dict(recipe)}


def recipe_from_dict(payload: Any, where: str | Path) -> PreprocessConfig:
    """The recipe stored by ``recipe_dict`` (or its bare ``params``) as a config; strict: unknown keys fail.

    ``where`` names the file it came from in the one-line error. A stored recipe without the front-end switches
    (``FRONT_END_FIELDS``) predates them: it is read with them off, so an older model sees what it was trained on.
    """
    from brainfm.config import ConfigError, from_dict

    params = payload.get("params", payload) if isinstance(payload, dict) else None
    if isinstance(payload, dict) and "id" in payload and payload["id"] != RECIPE_ID:
        raise BrainFMInputError(where, f"not a {RECIPE_ID} recipe (id {payload['id']!r})")
    if not isinstance(params, dict):
        raise BrainFMInputError(where, "preprocessing recipe must be a JSON object")
    params = {**{name: False for name in FRONT_END_FIELDS}, **params}
    try:
        return from_dict(PreprocessConfig, params, where=str(where))
    except ConfigError as exc:
        raise BrainFMInputError(where, f"invalid preprocessing recipe ({exc})") from exc
