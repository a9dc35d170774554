"""A subject's geometry: one random smooth transform of a real anatomy's tissue fractions (SynthSeg-style).

Global pose and size (rotation, anisotropic scaling, translation), a smooth elastic field of a few mm, and local
growth or shrinkage where subjects differ most: the ventricles (enlarging with age), the deep grey nuclei, and the
thickness of cortex, CSF spaces, skull and scalp (their share of each partial-volume voxel is reweighted by smooth
random fields). All of it is one sampling grid, so every tissue, the brain mask and later every contrast share it.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.spatial.transform import Rotation

from brainfm.data import anatomies
from brainfm.data.anatomies import Anatomy
from brainfm.data.synthetic.contrast import TISSUE_INDEX, TISSUES, smooth_field

_GROWTH = ("cortical_gm", "wm", "csf", "skull", "soft_tissue")  # reweighted where they share voxels


@dataclasses.dataclass
class Geometry:
    """Where each output voxel samples the anatomy: grid_sample coordinates (1, X, Y, Z, 3) in [-1, 1]."""

    grid: torch.Tensor
    growth: np.ndarray  # (len(_GROWTH), X, Y, Z) log-weights for partial-volume reweighting


@lru_cache(maxsize=4)
def _points_mm(shape: tuple[int, ...], voxel_mm: float) -> torch.Tensor:
    """(3, N) voxel-centre coordinates in mm relative to the grid centre (the same for every subject)."""
    centre = (torch.tensor(shape, dtype=torch.float32) - 1) / 2
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    return (torch.stack(torch.meshgrid(*axes, indexing="ij")).reshape(3, -1) - centre[:, None]) * voxel_mm


@lru_cache(maxsize=16)
def _centres_mm(name: str, resolution: int) -> dict[str, np.ndarray]:
    """Centroids (mm from the grid centre) of the structures that grow: ventricles and left/right deep GM."""
    anatomy = anatomies.load_anatomy(name, resolution)
    centre = (np.asarray(anatomy.labels.shape) - 1) / 2
    brain = np.argwhere(anatomy.mask).mean(axis=0)
    out = {}
    for key, label in (("ventricles", anatomies.VENTRICLES), ("deep_gm", anatomies.DEEP_GM)):
        points = np.argwhere(anatomy.labels == label)
        if len(points) == 0:
            points = np.argwhere(anatomy.mask)
        if key == "deep_gm":
            left, right = points[points[:, 0] < brain[0]], points[points[:, 0] >= brain[0]]
            out["deep_gm_left"] = ((left if len(left) else points).mean(0) - centre) * resolution
            out["deep_gm_right"] = ((right if len(right) else points).mean(0) - centre) * resolution
        else:
            out[key] = (points.mean(0) - centre) * resolution
    return out


def sample_geometry(anatomy: Anatomy, rng: np.random.Generator, age: float) -> Geometry:
    """One subject's transform of ``anatomy`` (output grid = the anatomy's grid)."""
    shape = anatomy.labels.shape
    vox = float(anatomy.resolution)
    angles = rng.uniform(-8.0, 8.0, size=3)
    scale = np.clip(rng.uniform(0.93, 1.07) * rng.uniform(0.97, 1.03, size=3), 0.9, 1.1)
    translation = rng.uniform(-6.0, 6.0, size=3)
    sampling = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(1.0 / scale)
    points = _points_mm(shape, vox)
    source = torch.from_numpy(sampling.astype(np.float32)) @ points + torch.from_numpy(
        translation.astype(np.float32))[:, None]
    elastic = smooth_field(shape, rng, coarse=(6, 7, 6), channels=3) * rng.uniform(1.0, 3.5)
    source += torch.from_numpy(elastic).reshape(3, -1)
    centres = _centres_mm(anatomy.name, anatomy.resolution)
    # local growth: a sample drawn toward a structure's centre shows that structure larger (factor > 0)
    ageing = 0.35 * float(np.clip((age - 20.0) / 65.0, 0.0, 1.0))
    for key, factor, width in (("ventricles", ageing + rng.uniform(-0.1, 0.15), 22.0),
                               ("deep_gm_left", rng.uniform(-0.12, 0.12), 12.0),
                               ("deep_gm_right", rng.uniform(-0.12, 0.12), 12.0)):
        offset = source - torch.from_numpy(centres[key].astype(np.float32))[:, None]
        source -= factor * offset * torch.exp(-(offset**2).sum(0, keepdim=True) / (2 * width**2))
    half = vox * (torch.tensor(shape, dtype=torch.float32) - 1) / 2
    grid = (source / half[:, None]).flip(0).T.reshape(1, *shape, 3)  # grid_sample wants (z, y, x) order last
    growth = smooth_field(shape, rng, coarse=(5, 6, 5), channels=len(_GROWTH)) * 0.8
    return Geometry(grid=grid.contiguous(), growth=growth.astype(np.float32))


def warp_fractions(anatomy: Anatomy, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """(tissue fractions over ``TISSUES`` (lesion tissues 0), brain mask) of one subject on the output grid."""
    source = np.concatenate([anatomy.fractions(), anatomy.mask[None].astype(np.float32)])
    warped = F.grid_sample(torch.from_numpy(source)[None], geometry.grid, mode="bilinear", padding_mode="zeros",
                           align_corners=True)[0].numpy()
    n_labels = len(anatomies.LABEL_NAMES)
    fractions = np.zeros((len(TISSUES), *warped.shape[1:]), np.float32)
    fractions[:n_labels] = warped[:n_labels]
    fractions[TISSUE_INDEX["background"]] += np.clip(1.0 - warped[:n_labels].sum(0), 0.0, 1.0)  # outside FOV
    for k, name in enumerate(_GROWTH):
        fractions[TISSUE_INDEX[name]] *= np.exp(geometry.growth[k])
    fractions /= np.maximum(fractions.sum(0, keepdims=True), 1e-6)
    return fractions, warped[n_labels] > 0.5


def push(geometry: Geometry, centre_vox: np.ndarray, radius_mm: float, voxel_mm: float, brain: np.ndarray) -> None:
    """Mass effect, in place: tissue around ``centre_vox`` is displaced outward by a mass of ``radius_mm``: by R at
    its surface, fading as exp(-(r - R) / 2R) (ventricles and sulci are squeezed, the midline shifts). The push
    fades to half at the brain's edge (``brain``: the subject's mask): the skull does not move, the cortex is
    pressed against it. The map stays monotonic along each ray, so nothing folds."""
    shape = tuple(geometry.grid.shape[1:4])
    points = _points_mm(shape, voxel_mm)
    centre = (torch.from_numpy(np.asarray(centre_vox, np.float32)) - (torch.tensor(shape) - 1) / 2) * voxel_mm
    offset = points - centre[:, None]
    distance = offset.norm(dim=0).clamp_min(1e-3)
    shift = torch.where(distance > radius_mm, radius_mm * torch.exp(-(distance - radius_mm) / (2.0 * radius_mm)),
                        distance)
    weight = torch.from_numpy(ndimage.gaussian_filter(brain.astype(np.float32), 1.5).reshape(-1))
    moved = points - offset / distance * shift * weight  # sample nearer the centre: tissue appears pushed out
    half = voxel_mm * (torch.tensor(shape, dtype=torch.float32) - 1) / 2
    sample_at = (moved / half[:, None]).flip(0).T.reshape(1, *shape, 3)
    field = geometry.grid.permute(0, 4, 1, 2, 3)  # (1, 3, X, Y, Z): the transform itself, resampled
    geometry.grid = F.grid_sample(field, sample_at, mode="bilinear", padding_mode="border",
                                  align_corners=True).permute(0, 2, 3, 4, 1).contiguous()
