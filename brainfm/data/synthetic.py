"""The embedded default cohort: REAL anatomy, SIMULATED subjects and SIMULATED lesions.

Every scan written here starts from the real ICBM152 2009 template that nilearn ships (T1, grey- and
white-matter probability maps and brain mask, 1 or 2 mm) and, where Debian's ``mricron-data`` is installed,
the real Colin27 brain. Nothing is downloaded, so the whole project (tests, demo, benchmarks) runs offline.

"Subjects" are made by warping that anatomy (small rotation, +-8 % scaling, a few mm of translation, a smooth
elastic field and an age-dependent enlargement of the central CSF spaces), then rendering it as a T1 scan
(site-specific contrast, smooth bias field, Rician noise) or as a CT scan in Hounsfield units (tissue-wise HU,
CSF gap, skull and scalp shells, Gaussian noise). Lesions -- tumour, MS, stroke, small-vessel disease -- are
SIMULATED intensity changes painted onto that real anatomy; they are useful to exercise and compare
methods, and say nothing about performance on real patients. The manifest's ``dataset`` column
(``brainfm-synth-healthy`` / ``brainfm-synth-lesion``) keeps that visible downstream.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.spatial.transform import Rotation
from tqdm.auto import tqdm

from brainfm.io import BrainFMInputError, save_nifti, write_text

log = logging.getLogger(__name__)

LESION_KINDS: tuple[str, ...] = ("tumour", "ms", "stroke", "svd")
MANIFEST_COLUMNS: tuple[str, ...] = (
    "path", "subject", "dataset", "modality", "age", "sex", "site", "split", "mask", "label",
    "lesion_type", "lesion_volume_ml",
)
HEALTHY_DATASET = "brainfm-synth-healthy"
LESION_DATASET = "brainfm-synth-lesion"
COLIN27_CANDIDATES: tuple[Path, ...] = (
    Path("/usr/share/mricron/templates/ch2bet.nii.gz"),
    Path("/usr/share/mricron/templates/ch2bet.nii"),
    Path("/usr/share/data/mricron/templates/ch2bet.nii.gz"),
    Path("/usr/lib/mricron/templates/ch2bet.nii.gz"),
)


@dataclass(frozen=True)
class SiteSignature:
    """Scanner-specific appearance, so a site is a learnable (and harmonisable) nuisance factor."""

    gamma: float          # T1 contrast exponent around white matter
    noise: float          # Rician sigma as a fraction of white-matter intensity
    bias: float           # strength of the smooth multiplicative bias field (log scale)
    gain: float           # arbitrary scanner units
    ct_noise_hu: float    # CT Gaussian noise sigma in HU
    ct_offset_hu: float   # CT calibration offset in HU


SITES: dict[str, SiteSignature] = {
    "siteA": SiteSignature(gamma=1.00, noise=0.020, bias=0.06, gain=1000.0, ct_noise_hu=2.5, ct_offset_hu=0.0),
    "siteB": SiteSignature(gamma=1.25, noise=0.035, bias=0.12, gain=700.0, ct_noise_hu=3.5, ct_offset_hu=2.0),
    "siteC": SiteSignature(gamma=0.80, noise=0.050, bias=0.18, gain=1400.0, ct_noise_hu=4.5, ct_offset_hu=-2.0),
}

# Lesion targets as a fraction of the (white matter - CSF) intensity span above CSF, per modality. T1: GM sits
# near 0.6; CT: GM sits near 1.5 (it is denser than WM). Tuples are (low, high) for a uniform draw.
_TARGETS: dict[str, dict[str, tuple[float, float]]] = {
    "T1": {
        "necrosis": (0.05, 0.20), "rim": (1.25, 1.45), "oedema": (0.50, 0.62),
        "ms": (0.20, 0.40), "stroke": (0.05, 0.25), "svd": (0.00, 0.25),
    },
    "CT": {
        "necrosis": (0.10, 0.30), "rim": (2.30, 2.80), "oedema": (0.40, 0.55),
        "ms": (0.35, 0.55), "stroke": (0.30, 0.50), "svd": (0.05, 0.30),
    },
}


# ------------------------------------------------------------------------------------------- templates
@dataclass(frozen=True)
class TemplateAnatomy:
    """One real template on its own grid, with the derived maps every subject needs."""

    name: str
    t1: np.ndarray            # float32, skull-stripped, white matter ~0.87
    gm: np.ndarray            # float32 probability
    wm: np.ndarray            # float32 probability
    mask: np.ndarray          # float32 0/1 brain mask
    signed_distance_mm: np.ndarray  # float32, > 0 outside the brain (builds the CT skull shells)
    affine: np.ndarray
    voxel_mm: float
    ventricle_centre_mm: np.ndarray  # relative to the grid centre: the focus of age-related enlargement
    channels: np.ndarray  # (t1, gm, wm, mask, signed distance) stacked once: one grid_sample warps them all


def load_templates(resolution: int = 2) -> tuple[TemplateAnatomy, ...]:
    """ICBM152 2009 (always) and Colin27 (only if mricron-data is installed), on the ICBM grid."""
    if resolution not in (1, 2):
        raise ValueError(f"resolution must be 1 or 2 mm, got {resolution}")
    return _load_templates_cached(resolution)


@lru_cache(maxsize=2)
def _load_templates_cached(resolution: int) -> tuple[TemplateAnatomy, ...]:
    from nilearn import datasets

    t1_img = datasets.load_mni152_template(resolution=resolution)
    affine = np.asarray(t1_img.affine, dtype=np.float64)
    t1 = np.asarray(t1_img.get_fdata(), dtype=np.float32)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=resolution).get_fdata(), dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=resolution).get_fdata(), dtype=np.float32)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=resolution).get_fdata() > 0.5, dtype=np.float32)
    gm, wm = np.clip(gm, 0, 1) * mask, np.clip(wm, 0, 1) * mask
    t1 = np.clip(t1, 0, None) * mask  # drop the resampling tails outside the brain
    templates = [_anatomy("icbm152-2009", t1, gm, wm, mask, affine)]
    colin = _load_colin27(t1_img)
    if colin is not None:
        # Colin27 is registered to MNI space but ships without tissue maps: the ICBM priors, cut to its own
        # brain outline, stand in for them; its T1 is rescaled so white matter matches the ICBM level.
        colin_t1 = colin * (np.median(t1[(wm > 0.9)]) / max(float(np.median(colin[(wm > 0.9) & (colin > 0)])), 1e-6))
        colin_mask = (colin > 0.05 * colin.max()).astype(np.float32)
        colin_mask = ndimage.binary_fill_holes(colin_mask).astype(np.float32)
        templates.append(_anatomy("colin27", colin_t1 * colin_mask, gm * colin_mask, wm * colin_mask, colin_mask,
                                  affine))
    return tuple(templates)


def _load_colin27(reference) -> np.ndarray | None:
    """Colin27 resampled onto the ICBM grid; None (silently) when the Debian package is absent or unreadable."""
    path = next((p for p in COLIN27_CANDIDATES if p.is_file()), None)
    if path is None:
        return None
    try:
        import nibabel as nib
        from nilearn.image import resample_to_img

        img = nib.load(str(path))
        if len(img.shape) != 3:
            return None
        resampled = resample_to_img(img, reference, interpolation="continuous", force_resample=True,
                                    copy_header=True)
        data = np.clip(np.nan_to_num(np.asarray(resampled.get_fdata(), dtype=np.float32)), 0, None)
        return data if data.max() > 0 else None
    except Exception as exc:  # an optional extra: a broken system file must not stop the cohort
        log.debug("Colin27 at %s not usable: %s", path, exc)
        return None


def _anatomy(name: str, t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, mask: np.ndarray,
             affine: np.ndarray) -> TemplateAnatomy:
    voxel_mm = float(abs(affine[0, 0]))
    inside = mask > 0.5
    depth = ndimage.distance_transform_edt(inside) * voxel_mm
    signed = ndimage.distance_transform_edt(~inside) * voxel_mm - depth
    deep_csf = inside & (gm + wm < 0.3) & (depth > 15.0)
    centre = (np.asarray(mask.shape, dtype=np.float64) - 1) / 2
    focus = np.argwhere(deep_csf).mean(axis=0) if deep_csf.any() else np.argwhere(inside).mean(axis=0)
    maps = [t1, gm, wm, mask, signed]
    channels = np.ascontiguousarray(np.stack([m.astype(np.float32) for m in maps]))
    return TemplateAnatomy(
        name=name, t1=channels[0], gm=channels[1], wm=channels[2], mask=channels[3],
        signed_distance_mm=channels[4], affine=affine, voxel_mm=voxel_mm,
        ventricle_centre_mm=((focus - centre) * voxel_mm).astype(np.float32), channels=channels,
    )


# ------------------------------------------------------------------------------------------- subjects
@dataclass
class SyntheticSubject:
    """One rendered subject: arrays on the template grid plus the manifest metadata."""

    subject: str
    image: np.ndarray
    mask: np.ndarray          # uint8, the subject's own (warped) brain mask
    gm: np.ndarray
    wm: np.ndarray
    label: np.ndarray | None  # uint8, only for lesion subjects
    affine: np.ndarray
    modality: str
    age: int
    sex: str
    site: str
    template: str
    lesion_type: str = "healthy"
    lesion_volume_ml: float = 0.0


def synthesize_subject(
    subject: str,
    seed: int | Sequence[int],
    resolution: int = 2,
    modality: str = "T1",
    lesion_kind: str | None = None,
    template_index: int | None = None,
) -> SyntheticSubject:
    """Render one subject. Anatomy, metadata, appearance and lesion come from separate random streams of the
    same seed, so the same subject with and without a lesion differs only where the label says."""
    if modality not in _TARGETS:
        raise ValueError(f"modality must be one of {sorted(_TARGETS)}, got {modality!r}")
    if lesion_kind is not None and lesion_kind not in LESION_KINDS:
        raise ValueError(f"lesion kind must be one of {LESION_KINDS}, got {lesion_kind!r}")
    meta_rng, anat_rng, look_rng, lesion_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )
    templates = load_templates(resolution)
    anatomy = templates[(template_index if template_index is not None else 0) % len(templates)]

    age = int(meta_rng.integers(20, 86))
    sex = str(meta_rng.choice(["F", "M"]))
    site = str(meta_rng.choice(sorted(SITES)))

    warped = _warp_anatomy(anatomy, anat_rng, age=age, sex=sex, with_distance=modality == "CT")
    mask = warped["mask"] > 0.5
    gm = np.clip(warped["gm"], 0, 1) * mask
    wm = np.clip(warped["wm"], 0, 1) * mask
    wm_ref = 1.0
    if modality == "CT":
        clean = _render_ct(warped, gm, wm, look_rng)
    else:
        clean = warped["t1"] * mask
        # fixed by the lesion-free anatomy, so a lesion changes nothing outside its label
        pure_wm = mask & (wm > 0.9)
        wm_ref = float(np.median(clean[pure_wm])) if pure_wm.any() else float(clean.max())

    label = None
    volume_ml = 0.0
    if lesion_kind is not None:
        clean, label = simulate_lesion(clean, mask, wm, gm, lesion_kind, lesion_rng, modality,
                                       voxel_mm=anatomy.voxel_mm)
        volume_ml = float(label.sum()) * anatomy.voxel_mm**3 / 1000.0

    image = _appearance_ct(clean, SITES[site], look_rng) if modality == "CT" else \
        _appearance_t1(clean, wm_ref, SITES[site], look_rng)
    return SyntheticSubject(
        subject=subject, image=image.astype(np.float32), mask=mask.astype(np.uint8), gm=gm, wm=wm,
        label=label, affine=anatomy.affine, modality=modality, age=age, sex=sex, site=site,
        template=anatomy.name, lesion_type=lesion_kind or "healthy", lesion_volume_ml=volume_ml,
    )


def _smooth_field(shape: Sequence[int], rng: np.random.Generator, coarse: Sequence[int],
                  channels: int = 1) -> np.ndarray:
    """Low-frequency noise: a coarse normal grid upsampled trilinearly (vectorised, deterministic)."""
    control = torch.from_numpy(rng.standard_normal((1, channels, *coarse)).astype(np.float32))
    return F.interpolate(control, size=tuple(int(s) for s in shape), mode="trilinear",
                         align_corners=True)[0].numpy()


def _warp_anatomy(anatomy: TemplateAnatomy, rng: np.random.Generator, age: int, sex: str,
                  with_distance: bool) -> dict[str, np.ndarray]:
    """Resample every map of the template through one random smooth transform (one grid_sample call)."""
    shape = anatomy.mask.shape
    vox = anatomy.voxel_mm
    angles = rng.uniform(-6.0, 6.0, size=3)
    size_factor = (1.02 if sex == "M" else 0.98) * rng.uniform(0.94, 1.06) * rng.uniform(0.98, 1.02, size=3)
    size_factor = np.clip(size_factor, 0.92, 1.08)
    translation = rng.uniform(-4.0, 4.0, size=3)
    sampling = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(1.0 / size_factor)
    elastic = _smooth_field(shape, rng, coarse=(5, 6, 5), channels=3) * rng.uniform(1.0, 2.5)
    atrophy = 0.3 * float(np.clip((age - 20) / 65.0, 0.0, 1.0))  # older brains: larger central CSF spaces

    centre = (torch.tensor(shape, dtype=torch.float32) - 1) / 2
    sampling_t = torch.from_numpy(sampling.astype(np.float32))
    source = torch.addmm(torch.from_numpy(translation.astype(np.float32))[:, None], sampling_t,
                         _grid_points_mm(shape, vox))
    source += torch.from_numpy(elastic).reshape(3, -1)
    offset = source - torch.from_numpy(anatomy.ventricle_centre_mm)[:, None]
    source -= atrophy * offset * torch.exp(-(offset**2).sum(0, keepdim=True) / (2 * 25.0**2))
    source = source / (vox * centre[:, None])  # align_corners=True: -1 and +1 are the first and last voxel
    grid = source.flip(0).T.reshape(1, *shape, 3)  # grid_sample wants (W, H, D) order in the last dim

    names = ("t1", "gm", "wm", "mask", "signed_distance_mm")[: 5 if with_distance else 4]
    stack = torch.from_numpy(anatomy.channels[: len(names)])[None]
    warped = F.grid_sample(stack, grid, mode="bilinear", padding_mode="border", align_corners=True)[0].numpy()
    return dict(zip(names, warped, strict=True))


@lru_cache(maxsize=2)
def _grid_points_mm(shape: tuple[int, ...], voxel_mm: float) -> torch.Tensor:
    """(3, N) voxel-centre coordinates in mm relative to the grid centre; cached, it is the same for all."""
    centre = (torch.tensor(shape, dtype=torch.float32) - 1) / 2
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    return ((torch.stack(torch.meshgrid(*axes, indexing="ij")).reshape(3, -1) - centre[:, None]) * voxel_mm)


def _render_ct(warped: dict[str, np.ndarray], gm: np.ndarray, wm: np.ndarray,
               rng: np.random.Generator) -> np.ndarray:
    """Noise-free CT in HU: tissue mix inside the brain; CSF gap, skull and scalp shells and air outside."""
    hu_csf, hu_wm, hu_gm = rng.uniform(5, 15), rng.uniform(25, 32), rng.uniform(35, 45)
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    tissue = (csf * hu_csf + gm * hu_gm + wm * hu_wm) / np.maximum(csf + gm + wm, 1e-6)
    gap, skull, scalp = rng.uniform(1.5, 4.0), rng.uniform(5.0, 9.0), rng.uniform(3.0, 6.0)
    hu_bone, hu_soft = rng.uniform(700, 1500), rng.uniform(20, 60)
    knots = [0.0, gap, gap + 1, gap + skull - 1, gap + skull, gap + skull + scalp, gap + skull + scalp + 1]
    values = [hu_csf, hu_csf, hu_bone, hu_bone, hu_soft, hu_soft, -1000.0]
    outside = np.interp(warped["signed_distance_mm"], knots, values, left=hu_csf, right=-1000.0)
    diploe = 1.0 + 0.1 * _smooth_field(gm.shape, rng, coarse=(6, 7, 6))[0]
    outside = np.where(outside > hu_soft + 1, outside * diploe, outside)
    weight = np.clip(warped["mask"], 0.0, 1.0)
    return (weight * tissue + (1 - weight) * outside).astype(np.float32)


def _appearance_t1(clean: np.ndarray, wm_ref: float, site: SiteSignature, rng: np.random.Generator) -> np.ndarray:
    """Scanner look: gamma contrast around white matter, smooth bias field, gain, then Rician noise."""
    gamma = site.gamma * rng.uniform(0.92, 1.08)
    image = wm_ref * np.power(np.clip(clean, 0, None) / wm_ref, gamma)
    bias = np.exp(site.bias * _smooth_field(clean.shape, rng, coarse=(3, 3, 3))[0])
    gain = site.gain * rng.uniform(0.9, 1.1) / wm_ref
    image = image * bias * gain
    sigma = site.noise * rng.uniform(0.8, 1.2) * site.gain
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag).astype(np.float32)


def _appearance_ct(clean: np.ndarray, site: SiteSignature, rng: np.random.Generator) -> np.ndarray:
    """CT stays quantitative: only a small site calibration offset and Gaussian quantum noise."""
    sigma = site.ct_noise_hu * rng.uniform(0.8, 1.2)
    noisy = clean + site.ct_offset_hu + sigma * rng.standard_normal(clean.shape, dtype=np.float32)
    return noisy.astype(np.float32)


# ------------------------------------------------------------------------------------------- lesions
def simulate_lesion(
    image: np.ndarray,
    brain_mask: np.ndarray,
    wm_prob: np.ndarray,
    gm_prob: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    modality: str = "T1",
    voxel_mm: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint a SIMULATED lesion of ``kind`` onto a scan; return (new image, uint8 label).

    Intensities are placed relative to the scan's own white-matter and CSF levels, so any T1 (any units)
    or CT (HU) works. The label is exactly the set of voxels whose value changed by at least 10 % of the
    WM-CSF contrast (tumour: necrotic core + enhancing rim + oedema; no mass effect), all inside the brain mask.
    Territory directions for "stroke" assume RAS voxel axes (the template grid and the preprocessing output).
    """
    if kind not in LESION_KINDS:
        raise ValueError(f"lesion kind must be one of {LESION_KINDS}, got {kind!r}")
    if modality not in _TARGETS:
        raise ValueError(f"modality must be one of {sorted(_TARGETS)}, got {modality!r}")
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or not (image.shape == np.shape(brain_mask) == np.shape(wm_prob) == np.shape(gm_prob)):
        raise ValueError("image, brain_mask, wm_prob and gm_prob must be 3D arrays of one shape")
    mask = np.asarray(brain_mask) > 0.5
    wm = np.where(mask, np.asarray(wm_prob, dtype=np.float32), 0.0)
    gm = np.where(mask, np.asarray(gm_prob, dtype=np.float32), 0.0)
    if not np.isfinite(image[mask]).all():
        raise ValueError("image has non-finite values inside the brain mask")
    csf_ref, span = _reference_levels(image, mask, wm, gm)
    # chessboard distance never exceeds the Euclidean one, so "deeper than r" stays true; 10x faster than EDT
    depth = ndimage.distance_transform_cdt(mask, metric="chessboard").astype(np.float32) * voxel_mm
    targets = _TARGETS[modality]

    def level(name: str) -> float:
        return csf_ref + span * float(rng.uniform(*targets[name]))

    for _attempt in range(8):  # a draw can land where nothing changes (e.g. a wedge over CSF): draw again
        weight = np.zeros(image.shape, dtype=np.float32)
        target = np.zeros(image.shape, dtype=np.float32)
        if kind == "tumour":
            _paint_tumour(weight, target, mask, wm, gm, depth, rng, voxel_mm, level)
        elif kind == "ms":
            _paint_ms(weight, target, mask, wm, gm, depth, rng, voxel_mm, level("ms"))
        elif kind == "stroke":
            _paint_stroke(weight, target, mask, wm, gm, rng, voxel_mm, level("stroke"))
        else:
            _paint_svd(weight, target, mask, wm, depth, rng, voxel_mm, level("svd"))
        weight *= mask
        texture = 1.0 + 0.03 * _smooth_field(image.shape, rng, coarse=(8, 9, 8))[0]
        lesioned = image * (1 - weight) + target * texture * weight
        altered = (weight > 0) & (np.abs(lesioned - image) >= 0.1 * span)
        if altered.any():
            return np.where(altered, lesioned, image).astype(np.float32), altered.astype(np.uint8)
    raise ValueError(f"could not place a visible {kind} lesion in this brain mask")


def _reference_levels(image: np.ndarray, mask: np.ndarray, wm: np.ndarray, gm: np.ndarray) -> tuple[float, float]:
    """CSF level and WM-CSF span of this scan, measured on the tissue priors (robust medians)."""
    pure_wm = mask & (wm > 0.9)
    if pure_wm.sum() < 10:
        pure_wm = mask & (wm > 0.5)
    csf = mask & (gm + wm < 0.3)
    if pure_wm.sum() < 10 or csf.sum() < 10:
        raise ValueError("too few white-matter or CSF voxels in the brain mask to place a lesion")
    csf_ref = float(np.median(image[csf]))
    span = float(np.median(image[pure_wm])) - csf_ref
    if not span > 0:
        raise ValueError("white matter is not brighter than CSF: not a T1 or CT contrast")
    return csf_ref, span


def _blob(shape: Sequence[int], centre: np.ndarray, semi_axes_mm: np.ndarray, voxel_mm: float,
          rng: np.random.Generator, irregularity: float = 0.0,
          long_axis: np.ndarray | None = None) -> tuple[tuple[slice, ...], np.ndarray]:
    """Normalised ellipsoidal radius (1 = surface) of an optionally lumpy ovoid, in its bounding box.

    The first semi-axis follows ``long_axis`` when given (and non-zero), otherwise the orientation is random.
    """
    rotation = Rotation.random(random_state=rng).as_matrix()
    if long_axis is not None and np.linalg.norm(long_axis) > 0:
        rotation = Rotation.align_vectors([long_axis], [[1.0, 0.0, 0.0]])[0].as_matrix()
    reach = float(np.max(semi_axes_mm)) * (1 + irregularity) / voxel_mm + 1
    lo = np.maximum(np.floor(centre - reach).astype(int), 0)
    hi = np.minimum(np.ceil(centre + reach).astype(int) + 1, np.asarray(shape))
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    grids = np.meshgrid(*(np.arange(s.start, s.stop, dtype=np.float32) for s in box), indexing="ij")
    offsets = np.stack([(g - c) * voxel_mm for g, c in zip(grids, centre, strict=True)], axis=-1)
    local = offsets @ rotation.astype(np.float32)  # coordinates along the ovoid's own axes
    radius = np.sqrt(((local / semi_axes_mm.astype(np.float32)) ** 2).sum(-1))
    if irregularity > 0:
        lumps = _smooth_field(radius.shape, rng, coarse=(4, 4, 4))[0]
        radius = radius / np.clip(1 + irregularity * lumps, 0.5, None)
    return box, radius


def _pick(candidates: np.ndarray, fallback: np.ndarray, rng: np.random.Generator, n: int = 1) -> np.ndarray:
    """n random voxel coordinates from candidates (or the fallback set when the anatomy offers none)."""
    points = np.argwhere(candidates)
    if len(points) == 0:
        points = np.argwhere(fallback)
    if len(points) == 0:
        raise ValueError("the brain mask is empty: nowhere to place a lesion")
    return points[rng.choice(len(points), size=n, replace=len(points) < n)].astype(np.float64)


def _paint_tumour(weight, target, mask, wm, gm, depth, rng, voxel_mm, level) -> None:
    """Necrotic core (hypo in T1), enhancing rim (bright), oedema around it spreading in white matter."""
    radius_mm = rng.uniform(7.0, 20.0)
    oedema_factor = rng.uniform(1.25, 1.7)
    necrotic = max(0.0, 1.0 - rng.uniform(2.5, 6.0) / radius_mm)  # a rim 2.5-6 mm thick around the core
    deep = mask & (depth > radius_mm) & (wm + gm > 0.5)
    centre = _pick(deep, mask & (depth >= depth.max() * 0.8), rng)[0]
    semi_axes = radius_mm * rng.uniform(0.75, 1.25, size=3)
    box, radius = _blob(mask.shape, centre, semi_axes * oedema_factor, voxel_mm, rng, irregularity=0.25)
    radius = radius * oedema_factor  # now 1 = tumour surface, oedema_factor = oedema surface
    core, rim_level, oedema_level, core_level = radius < necrotic, level("rim"), level("oedema"), level("necrosis")
    body = radius < 1.0
    oedema = (radius < oedema_factor) & ~body & (wm[box] > 0.3)
    edge = np.clip((oedema_factor - radius) / (0.3 * oedema_factor), 0, 1)
    local_weight = np.where(body, 1.0, np.where(oedema, 0.5 + 0.5 * edge, 0.0))
    local_target = np.where(core, core_level, np.where(body, rim_level, oedema_level))
    weight[box] = np.maximum(weight[box], local_weight)
    target[box] = np.where(local_weight > 0, local_target, target[box])


def _paint_ms(weight, target, mask, wm, gm, depth, rng, voxel_mm, lesion_level) -> None:
    """Several small ovoids in periventricular white matter, long axis pointing away from the nearest
    ventricle (Dawson's fingers)."""
    ventricles = mask & (gm + wm < 0.3) & (depth > 12.0)
    if not ventricles.any():
        ventricles = mask & (gm + wm < 0.3)
    # taxicab distance is never below the Euclidean one, so "within 10 mm" stays true
    distance, nearest = ndimage.distance_transform_cdt(~ventricles, metric="taxicab", return_indices=True)
    distance = distance.astype(np.float32) * voxel_mm
    periventricular = mask & (wm > 0.7) & (distance >= voxel_mm) & (distance <= 10.0)
    centres = _pick(periventricular, mask & (wm > 0.7) & (depth > 8.0), rng, n=int(rng.integers(3, 13)))
    for centre in centres:
        index = tuple(int(c) for c in centre)
        outward = centre - np.array([nearest[axis][index] for axis in range(3)], dtype=np.float64)
        short = rng.uniform(max(1.5, 0.8 * voxel_mm), 4.0)
        semi_axes = np.array([short * rng.uniform(1.5, 2.5), short, short * rng.uniform(0.8, 1.0)])
        box, radius = _blob(mask.shape, centre, semi_axes, voxel_mm, rng, long_axis=outward)
        inside = (radius < 1.0) & (wm[box] > 0.3)
        inside |= radius == radius.min()  # the centre voxel always belongs to the lesion
        local_weight = np.where(inside, 0.6 + 0.4 * np.clip(1 - radius, 0, 1), 0.0)
        weight[box] = np.maximum(weight[box], local_weight)
        target[box] = np.where(local_weight > 0, lesion_level, target[box])


def _paint_stroke(weight, target, mask, wm, gm, rng, voxel_mm, lesion_level) -> None:
    """A wedge from a deep apex to the cortex in one hemisphere (MCA, ACA or PCA-like territory)."""
    points = np.argwhere(mask)
    brain_centre = points.mean(axis=0)
    side = float(rng.choice([-1.0, 1.0]))
    territory = str(rng.choice(["MCA", "ACA", "PCA"], p=[0.6, 0.2, 0.2]))
    direction = {
        "MCA": np.array([side, rng.uniform(-0.3, 0.3), rng.uniform(0.0, 0.4)]),
        "ACA": np.array([0.15 * side, 0.6, 0.8]),
        "PCA": np.array([0.3 * side, -1.0, -0.1]),
    }[territory] + rng.normal(0.0, 0.1, size=3)
    direction /= np.linalg.norm(direction)
    apex = brain_centre + np.array([side * 15.0, 0.0, 5.0]) / voxel_mm
    half_angle = np.deg2rad(rng.uniform(8.0, 30.0))
    inner_mm = rng.uniform(10.0, 30.0)

    grids = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in mask.shape), indexing="ij", sparse=True)
    offsets = [(g - float(a)) * voxel_mm for g, a in zip(grids, apex, strict=True)]
    distance = np.sqrt(offsets[0] ** 2 + offsets[1] ** 2 + offsets[2] ** 2)
    cosine = sum(o * float(d) for o, d in zip(offsets, direction, strict=True)) / np.maximum(distance, 1e-3)
    angle = np.arccos(np.clip(cosine, -1.0, 1.0))
    allowed = half_angle * (1 + 0.2 * _smooth_field(mask.shape, rng, coarse=(6, 7, 6))[0])
    hemisphere = side * (grids[0] - brain_centre[0]) > 0
    region = mask & hemisphere & (angle < allowed) & (distance > inner_mm) & (wm + gm > 0.4)
    edge = np.clip((allowed - angle) / (0.3 * allowed), 0.0, 1.0)
    local_weight = np.where(region, 0.6 + 0.4 * edge, 0.0).astype(np.float32)
    np.maximum(weight, local_weight, out=weight)
    target[region] = lesion_level


def _paint_svd(weight, target, mask, wm, depth, rng, voxel_mm, lesion_level) -> None:
    """Many tiny lacune-like dots in deep white matter."""
    deep_wm = mask & (wm > 0.85) & (depth > 15.0)
    for centre in _pick(deep_wm, mask & (wm > 0.5), rng, n=int(rng.integers(15, 61))):
        box, radius = _blob(mask.shape, centre, np.full(3, rng.uniform(1.0, 2.5)), voxel_mm, rng)
        inside = (radius < 1.0) | (radius == radius.min())
        weight[box] = np.where(inside, 1.0, weight[box])
        target[box] = np.where(inside, lesion_level, target[box])


# ------------------------------------------------------------------------------------------- cohort
def synthesize_cohort(
    out_dir: str | Path,
    n_healthy: int = 24,
    n_lesion: int | None = None,
    seed: int = 0,
    resolution: int = 2,
    ct_fraction: float = 0.0,
    lesion_kinds: Sequence[str] = LESION_KINDS,
) -> Path:
    """Write healthy and SIMULATED-lesion subjects plus ``manifest.csv``; return the manifest path.

    The manifest is written last, so an interrupted run leaves no manifest that would point at missing scans.
    Paths in it are relative to its folder. Same arguments -> the same files, byte for byte.
    """
    n_lesion = n_healthy // 2 if n_lesion is None else n_lesion
    lesion_kinds = tuple(lesion_kinds)
    if n_healthy < 0 or n_lesion < 0 or n_healthy + n_lesion == 0:
        raise ValueError(f"need at least one subject (got {n_healthy} healthy, {n_lesion} lesion)")
    if not 0.0 <= ct_fraction <= 1.0:
        raise ValueError(f"ct_fraction must be within [0, 1], got {ct_fraction}")
    if n_lesion and (not lesion_kinds or any(k not in LESION_KINDS for k in lesion_kinds)):
        raise ValueError(f"lesion_kinds must be a non-empty subset of {LESION_KINDS}, got {lesion_kinds}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BrainFMInputError(out_dir, "output path exists and is not a folder")
    n_templates = len(load_templates(resolution))

    plan: list[tuple[str, tuple[int, ...], str, str | None, int]] = []
    for group, count, prefix in ((0, n_healthy, "synth-healthy"), (1, n_lesion, "synth-lesion")):
        n_ct = int(round(ct_fraction * count))
        ct_subjects = set(np.random.default_rng([seed, group, 7]).permutation(count)[:n_ct].tolist())
        for index in range(count):
            kind = lesion_kinds[index % len(lesion_kinds)] if group == 1 else None
            modality = "CT" if index in ct_subjects else "T1"
            plan.append((f"{prefix}-{index:04d}", (seed, group, index), modality, kind, index % n_templates))

    rows = []
    for name, subject_seed, modality, kind, template_index in tqdm(plan, desc="synth", unit="subject",
                                                                   disable=None):
        subject = synthesize_subject(name, subject_seed, resolution=resolution, modality=modality,
                                     lesion_kind=kind, template_index=template_index)
        image_rel, mask_rel = f"images/{name}.nii.gz", f"masks/{name}_mask.nii.gz"
        save_nifti(subject.image, subject.affine, out_dir / image_rel, dtype=np.float32)
        save_nifti(subject.mask, subject.affine, out_dir / mask_rel, dtype=np.uint8)
        label_rel = ""
        if subject.label is not None:
            label_rel = f"labels/{name}_label.nii.gz"
            save_nifti(subject.label, subject.affine, out_dir / label_rel, dtype=np.uint8)
        rows.append({
            "path": image_rel, "subject": name, "dataset": HEALTHY_DATASET if kind is None else LESION_DATASET,
            "modality": modality, "age": subject.age, "sex": subject.sex, "site": subject.site,
            "split": "" if kind is None else "test", "mask": mask_rel, "label": label_rel,
            "lesion_type": subject.lesion_type, "lesion_volume_ml": f"{subject.lesion_volume_ml:.3f}",
        })

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    manifest = out_dir / "manifest.csv"
    write_text(manifest, buffer.getvalue())
    return manifest
