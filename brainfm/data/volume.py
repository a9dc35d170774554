"""Reading scans and moving them between voxel grids: the layer every preprocessing step builds on.

``load_volume`` reads NIfTI (nibabel) or a DICOM series (SimpleITK, LPS converted to RAS world) and rejects inputs
the rest of the pipeline would silently mis-handle (4D, 2D, NaN/inf, constant). The header's dimensions are checked
against ``MAX_VOXELS``/``MAX_DIM`` before any voxel is read or allocated, so a tiny file that claims a huge volume
costs nothing. ``working_grid`` and ``resample_to_grid`` put a volume on an axis-aligned or any other grid with one
interpolation (MONAI ``Orientation`` is exact; ``SpatialResample`` does the rest).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, SpatialResample

from brainfm.io import BrainFMInputError

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
MAX_DIM = 4096  # voxels along any axis: beyond any scanner's matrix
MAX_VOXELS = 2**28  # 268 M voxels (1 GiB as float32): a 0.5 mm whole-head volume is ~0.1 G




def load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(data float32 3D, affine 4x4 in RAS world) from .nii/.nii.gz or a DICOM series folder.

    Raises ``BrainFMInputError(path, ...)`` for a missing or unreadable file, 2D/4D data, NaN/inf voxels and
    constant volumes: each would otherwise produce a silently meaningless model input.
    """
    data, affine = read_volume(path)
    if float(data.max()) == float(data.min()):
        raise BrainFMInputError(path, f"constant volume: every voxel equals {float(data.min()):g}")
    return data, affine


def read_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
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


def working_grid(
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


def resample_to_grid(
    data: np.ndarray, affine: np.ndarray, grid: np.ndarray, size: list, mode: str, fill: float = 0.0
) -> np.ndarray:
    """Resample (X,Y,Z) ``data`` (MONAI ``Orientation`` to RAS, then one ``SpatialResample``) onto any grid given
    by its affine and size; outside the input's field of view becomes ``fill``."""
    floor = float(fill)
    tensor = MetaTensor(
        torch.from_numpy(data - floor)[None], affine=torch.as_tensor(affine, dtype=torch.float64)
    )
    tensor = Orientation(axcodes="RAS", labels=_RAS_LABELS)(tensor)
    out = SpatialResample(mode=mode, padding_mode="zeros", dtype=torch.float64)(
        tensor, dst_affine=torch.as_tensor(grid, dtype=torch.float64), spatial_size=size
    )
    return np.asarray(out.as_tensor()[0].numpy(), dtype=np.float32) + floor
