"""Turn one NIfTI/DICOM scan into model input on a fixed RAS grid, and map model output back.

The recipe (``PreprocessConfig``) is stored with every shard set and model, so inference repeats exactly the
geometry and intensity mapping the model was trained on. The pipeline:

1. ``load_volume`` reads NIfTI (nibabel) or a DICOM series (SimpleITK, LPS converted to RAS world) and rejects
   inputs the rest of the pipeline would silently mis-handle (4D, 2D, NaN/inf, constant). The header's
   dimensions are checked against ``MAX_VOXELS``/``MAX_DIM`` before any voxel is read or allocated, so a tiny
   file that claims a huge volume costs nothing.
2. MONAI ``Orientation("RAS")`` (exact axis flips/permutations), then ONE MONAI ``SpatialResample`` onto an
   axis-aligned RAS working grid at ``recipe.spacing`` that covers the whole input. A single interpolation
   (instead of ``Spacing`` followed by more resampling) keeps oblique inputs axis-aligned without blurring
   twice.
3. Brain mask: a given file is thresholded at ``recipe.mask_threshold`` and resampled nearest-neighbour;
   otherwise it is derived on the working grid (see ``derive_brain_mask``). A lesion label must lie on its
   image's own voxel grid (same shape, affine within ``GRID_TOLERANCE_VOX``); it follows the image
   nearest-neighbour, and a label whose lesion voxels all vanish on the recipe grid is refused, so it is never
   scored as healthy.
4. MONAI ``BorderPad`` + ``SpatialCrop`` (integer-voxel, exact) to ``recipe.shape`` centred on the mask's
   centroid; MONAI's MetaTensor keeps the affine in step.
5. Intensity: MRI is clipped to ``recipe.mri_percentiles`` computed inside the mask and scaled to [0, 1]; CT
   is the ``recipe.ct_window`` HU window scaled to [0, 1]. Everything outside the mask is 0.

The output affine is in the same world space as the input, so ``to_input_space`` can bring any array on the
recipe grid back onto the input's own voxel grid (used to write detection maps beside the user's scan).
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    BorderPad,
    KeepLargestConnectedComponent,
    Orientation,
    ScaleIntensityRange,
    SpatialCrop,
    SpatialResample,
)
from scipy import ndimage

from brainfm.config import MODALITIES, PreprocessConfig, to_dict
from brainfm.io import BrainFMInputError

RECIPE_ID = "brainfm.data.preprocess"
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
MAX_DIM = 4096  # voxels along any axis: beyond any scanner's matrix
MAX_VOXELS = 2**28  # 268 M voxels (1 GiB as float32): a 0.5 mm whole-head volume is ~0.1 G
GRID_TOLERANCE_VOX = 0.01  # a label's voxel centres may sit this far (in voxels) from its image's


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


# ------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------


def load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(data float32 3D, affine 4x4 in RAS world) from .nii/.nii.gz or a DICOM series folder.

    Raises ``BrainFMInputError(path, ...)`` for a missing or unreadable file, 2D/4D data, NaN/inf voxels and
    constant volumes: each would otherwise produce a silently meaningless model input.
    """
    data, affine = _read_volume(path)
    if float(data.max()) == float(data.min()):
        raise BrainFMInputError(path, f"constant volume: every voxel equals {float(data.min()):g}")
    return data, affine


def _read_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate geometry/finiteness; constant volumes are allowed (masks and labels may be all 0)."""
    path = Path(path)
    if not path.exists():
        raise BrainFMInputError(path, "file not found")
    if path.is_dir():
        data, affine = _read_dicom_series(path)
    elif path.name.lower().endswith(_NIFTI_SUFFIXES):
        data, affine = _read_nifti(path)
    else:
        data, affine = _read_with_simpleitk(path)
    while data.ndim > 3 and data.shape[-1] == 1:  # (X,Y,Z,1) is a 3D volume stored with a singleton time axis
        data = data[..., 0]
    if data.ndim == 4:
        raise BrainFMInputError(path, f"4D data of shape {data.shape}; give one 3D volume")
    if data.ndim != 3 or min(data.shape) < 2:
        raise BrainFMInputError(
            path, f"not 3D: shape {data.shape} (a single slice or 2D image cannot be used)"
        )
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise BrainFMInputError(path, "invalid (non-finite or singular) affine")
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise BrainFMInputError(path, f"{bad} NaN/inf voxel(s)")
    return np.ascontiguousarray(data, dtype=np.float32), np.asarray(affine, dtype=np.float64)


def check_dimensions(path: str | Path, shape: tuple[int, ...]) -> None:
    """Refuse a header that claims more voxels than any brain scan has, before its data is read."""
    dims = tuple(int(n) for n in shape)
    voxels = int(np.prod(dims, dtype=object)) if dims else 0
    if any(n < 0 for n in dims) or any(n > MAX_DIM for n in dims) or voxels > MAX_VOXELS:
        raise BrainFMInputError(
            path,
            f"header claims {'x'.join(map(str, dims))} voxels, over the limit of {MAX_DIM} per axis and "
            f"{MAX_VOXELS} in total (corrupt or not a brain scan)",
        )


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    try:
        image = nib.load(str(path))  # reads the header only
    except Exception as exc:  # nibabel raises many types (EOFError, zlib.error, ImageFileError, OSError ...)
        raise BrainFMInputError(path, f"unreadable NIfTI ({type(exc).__name__}: {exc})") from exc
    check_dimensions(path, image.shape)
    try:
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as exc:
        raise BrainFMInputError(path, f"unreadable NIfTI ({type(exc).__name__}: {exc})") from exc
    return data, np.asarray(image.affine, dtype=np.float64)


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    try:
        series_ids = reader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as exc:
        raise BrainFMInputError(folder, f"cannot scan folder for DICOM ({exc})") from exc
    if not series_ids:
        raise BrainFMInputError(folder, "folder holds no DICOM series")
    if len(series_ids) > 1:
        raise BrainFMInputError(
            folder, f"folder holds {len(series_ids)} DICOM series; give a folder with one"
        )
    files = reader.GetGDCMSeriesFileNames(str(folder), series_ids[0])
    slice_size = _header_size(Path(files[0]), folder)
    check_dimensions(folder, (*slice_size[:2], len(files) * int(np.prod(slice_size[2:], dtype=np.int64))))
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise BrainFMInputError(
            folder, f"unreadable DICOM series ({str(exc).strip().splitlines()[-1]})"
        ) from exc
    return _from_simpleitk(image, folder)


def _read_with_simpleitk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    check_dimensions(path, _header_size(path, path))
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise BrainFMInputError(path, f"unreadable image ({str(exc).strip().splitlines()[-1]})") from exc
    return _from_simpleitk(image, path)


def _header_size(path: Path, where: Path) -> tuple[int, ...]:
    """Image size from the file's header alone (SimpleITK ``ReadImageInformation``), x-fastest."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise BrainFMInputError(where, f"unreadable image ({str(exc).strip().splitlines()[-1]})") from exc
    return tuple(int(n) for n in reader.GetSize())


def _from_simpleitk(image: Any, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK stores arrays (z,y,x) in LPS world; brainfm uses (x,y,z) in RAS world like NIfTI."""
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise BrainFMInputError(
            path, f"{image.GetNumberOfComponentsPerPixel()}-component (colour/vector) image"
        )
    data = sitk.GetArrayFromImage(image).astype(np.float32)
    data = np.transpose(data, tuple(range(data.ndim))[::-1])
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    affine = np.eye(4)
    affine[:dim, :dim] = direction @ np.diag(image.GetSpacing())
    affine[:dim, 3] = image.GetOrigin()
    return data, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


# ------------------------------------------------------------------------------------------------------------
# Masks and intensities
# ------------------------------------------------------------------------------------------------------------


_KEEP_LARGEST = KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False, connectivity=1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected component (MONAI; an empty mask stays empty)."""
    kept = _KEEP_LARGEST(torch.from_numpy(np.asarray(mask, dtype=np.uint8)[None]))
    return np.asarray(kept)[0] > 0


def _otsu_threshold(image: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximal between-class variance; SimpleITK) of an image's intensity histogram, at the
    midpoint of its bin."""
    import SimpleITK as sitk

    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetNumberOfHistogramBins(bins)
    otsu.SetReturnBinMidpoint(True)
    otsu.Execute(sitk.GetImageFromArray(np.asarray(image, dtype=np.float32)))
    return float(otsu.GetThreshold())


def derive_brain_mask(image: np.ndarray, modality: str, recipe: PreprocessConfig) -> np.ndarray:
    """Brain mask from intensities alone, for inputs given without a mask.

    CT: voxels in the soft-tissue HU range ``recipe.ct_brain_hu``, eroded 2 voxels so the brain separates from
    scalp/neck soft tissue through skull gaps, largest component, dilated back inside the range, holes filled.
    MRI: Otsu foreground, opened to cut thin bridges (e.g. to skull/dura), largest component, holes filled.
    This is a brain mask for skull-stripped MRI and a head mask for MRI with skull: give ``mask_path`` there.
    """
    structure = ndimage.generate_binary_structure(3, 1)
    if modality == "CT":
        lo, hi = recipe.ct_brain_hu
        in_range = (image >= lo) & (image <= hi)
        core = ndimage.binary_erosion(in_range, structure, iterations=2)
        core = _largest_component(core)
        mask = ndimage.binary_dilation(core, structure, iterations=2) & in_range
    else:
        foreground = image > _otsu_threshold(image)
        mask = _largest_component(ndimage.binary_opening(foreground, structure, iterations=1))
    return ndimage.binary_fill_holes(mask)


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


# ------------------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------------------


def _working_grid(
    affine: np.ndarray, shape: tuple[int, ...], spacing: tuple[float, ...]
) -> tuple[np.ndarray, list]:
    """Axis-aligned RAS grid at ``spacing`` covering the input's voxel centres."""
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in shape])), dtype=np.float64)
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    lo, hi = world.min(axis=0), world.max(axis=0)
    size = [int(np.floor((h - lo_) / s + 1e-6)) + 1 for lo_, h, s in zip(lo, hi, spacing, strict=True)]
    grid = np.diag([*spacing, 1.0])
    grid[:3, 3] = lo
    return grid, size


def _to_grid(
    data: np.ndarray, affine: np.ndarray, grid: np.ndarray, size: list, mode: str, fill: float = 0.0
) -> np.ndarray:
    """Resample (X,Y,Z) ``data`` onto the working grid; outside the input's field of view becomes ``fill``."""
    floor = float(fill)
    tensor = MetaTensor(
        torch.from_numpy(data - floor)[None], affine=torch.as_tensor(affine, dtype=torch.float64)
    )
    tensor = Orientation(axcodes="RAS", labels=_RAS_LABELS)(tensor)
    out = SpatialResample(mode=mode, padding_mode="zeros", dtype=torch.float64)(
        tensor, dst_affine=torch.as_tensor(grid, dtype=torch.float64), spatial_size=size
    )
    return np.asarray(out.as_tensor()[0].numpy(), dtype=np.float32) + floor


def _crop_box(mask: np.ndarray, shape: tuple[int, int, int]) -> tuple[list[int], list[int]]:
    centre = np.rint(ndimage.center_of_mass(mask)).astype(int)
    start = [int(c - s // 2) for c, s in zip(centre, shape, strict=True)]
    return start, [b + s for b, s in zip(start, shape, strict=True)]


def _crop_pad(
    channels: np.ndarray, grid: np.ndarray, start: list[int], end: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Exact integer crop/pad with MONAI so the MetaTensor affine follows the shift."""
    sizes = channels.shape[1:]
    border = []
    for b, e, n in zip(start, end, sizes, strict=True):
        border += [max(0, -b), max(0, e - n)]
    tensor = MetaTensor(torch.from_numpy(channels), affine=torch.as_tensor(grid, dtype=torch.float64))
    tensor = BorderPad(spatial_border=border, mode="constant", value=0)(tensor)
    roi_start = [b + border[2 * i] for i, b in enumerate(start)]
    roi_end = [e + border[2 * i] for i, e in enumerate(end)]
    tensor = SpatialCrop(roi_start=roi_start, roi_end=roi_end)(tensor)
    return tensor.as_tensor().numpy(), tensor.affine.numpy().astype(np.float64)


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
        return _read_volume(path)
    except BrainFMInputError as exc:
        raise BrainFMInputError(path, f"{what}: {exc.problem}") from None


# ------------------------------------------------------------------------------------------------------------
# Public pipeline
# ------------------------------------------------------------------------------------------------------------


def preprocess_scan(
    path: str | Path,
    modality: str,
    recipe: PreprocessConfig,
    mask_path: str | Path | None = None,
    label_path: str | Path | None = None,
) -> PreprocessedScan:
    """Load, reorient, resample, crop/pad around the brain and normalise one scan (see the module docstring).

    Raises ``BrainFMInputError`` for inputs that cannot be served, including a lesion label off the image's
    grid or one whose lesion vanishes on the recipe grid (so evaluation never counts it as a healthy control).
    """
    if modality not in MODALITIES:
        raise BrainFMInputError(path, f"unknown modality {modality!r}; expected one of {list(MODALITIES)}")
    data, source_affine = load_volume(path)
    grid, size = _working_grid(source_affine, data.shape, recipe.spacing)
    # Outside the field of view takes the volume's minimum (air for CT, background for MRI), not 0, which
    # would be brain-like HU in CT.
    image = _to_grid(data, source_affine, grid, size, mode="bilinear", fill=float(data.min()))

    if mask_path is not None:
        mask_data, mask_affine = _load_mask_like(mask_path, "brain mask")
        binary = (mask_data >= recipe.mask_threshold).astype(np.float32)
        mask = _to_grid(binary, mask_affine, grid, size, mode="nearest") > 0.5
        mask_source: str | Path = mask_path
    else:
        mask = derive_brain_mask(image, modality, recipe)
        mask_source = path
    if not mask.any():
        raise BrainFMInputError(
            mask_source, "empty brain mask on the scan's grid (no overlap or nothing found)"
        )

    channels = [image - float(image.min()), mask.astype(np.float32)]
    if label_path is not None:
        label_data, label_affine = _load_mask_like(label_path, "lesion label")
        _check_same_grid(label_path, label_data.shape, label_affine, data.shape, source_affine)
        if np.any(label_data < 0) or np.any(label_data > 255) or np.any(label_data != np.round(label_data)):
            raise BrainFMInputError(label_path, "lesion label must hold integer classes in 0..255")
        channels.append(_to_grid(label_data, source_affine, grid, size, mode="nearest"))

    start, end = _crop_box(mask, recipe.shape)
    cropped, affine = _crop_pad(np.stack(channels).astype(np.float32), grid, start, end)
    image = cropped[0] + float(image.min())
    mask_out = (cropped[1] > 0.5).astype(np.uint8)
    try:
        if modality == "CT":
            image = window_ct(image, mask_out, recipe.ct_window)
        else:
            image = normalise_mri(image, mask_out, recipe.mri_percentiles)
    except ValueError as exc:
        raise BrainFMInputError(path, str(exc)) from None
    label = None
    if label_path is not None:
        label = np.rint(cropped[2]).astype(np.uint8)
        lesion_voxels = int(np.count_nonzero(label_data))
        if lesion_voxels and not label.any():
            raise BrainFMInputError(
                label_path,
                f"lesion label: all {lesion_voxels} lesion voxel(s) fall outside the model grid after "
                f"preprocessing ({'x'.join(map(str, recipe.shape))} voxels of {list(recipe.spacing)} mm "
                "around the brain); refused so the scan is never scored as a healthy control",
            )
    return PreprocessedScan(
        image=np.ascontiguousarray(image, dtype=np.float32),
        mask=mask_out,
        affine=affine,
        source_affine=source_affine,
        source_shape=tuple(int(n) for n in data.shape),
        modality=modality,
        label=label,
        source_path=str(path),
    )


def to_input_space(array: np.ndarray, scan: PreprocessedScan, order: int = 1) -> np.ndarray:
    """Map an (X,Y,Z) array on the recipe grid back onto the input's own voxel grid through the two affines,
    so results can be written as NIfTI that overlays the user's scan. ``order=0`` for masks."""
    array = np.asarray(array)
    if array.shape != scan.image.shape:
        raise ValueError(f"array shape {array.shape} does not match the recipe grid {scan.image.shape}")
    source_to_recipe = np.linalg.inv(scan.affine) @ scan.source_affine
    out_dtype = array.dtype if order == 0 else np.float32
    return ndimage.affine_transform(
        array.astype(np.float32) if order > 0 else array,
        source_to_recipe[:3, :3],
        offset=source_to_recipe[:3, 3],
        output_shape=scan.source_shape,
        order=order,
        mode="constant",
        cval=0.0,
    ).astype(out_dtype)


def recipe_dict(recipe: PreprocessConfig) -> dict:
    """JSON-able copy of the recipe with the code that applies it, stored beside shards and models."""
    from brainfm.version import __version__

    return {"id": RECIPE_ID, "brainfm_version": __version__, "params": to_dict(recipe)}


def recipe_from_dict(payload: Any, where: str | Path) -> PreprocessConfig:
    """The recipe stored by ``recipe_dict`` (or its bare ``params``) as a config; strict: unknown keys fail.

    ``where`` names the file it came from in the one-line error.
    """
    from brainfm.config import ConfigError, from_dict

    params = payload.get("params", payload) if isinstance(payload, dict) else None
    if isinstance(payload, dict) and "id" in payload and payload["id"] != RECIPE_ID:
        raise BrainFMInputError(where, f"not a {RECIPE_ID} recipe (id {payload['id']!r})")
    if not isinstance(params, dict):
        raise BrainFMInputError(where, "preprocessing recipe must be a JSON object")
    try:
        return from_dict(PreprocessConfig, params, where=str(where))
    except ConfigError as exc:
        raise BrainFMInputError(where, f"invalid preprocessing recipe ({exc})") from exc
