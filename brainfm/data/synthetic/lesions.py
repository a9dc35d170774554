"""SIMULATED lesions as tissues, so that each contrast shows them as it would (nothing here is patient data).

A lesion replaces part of the healthy tissue fractions of a subject with lesion tissues (``LESION_TISSUES`` of
``contrast``) whose relaxation times, density and gadolinium uptake then decide their look in every contrast:

* ``tumour``: necrotic core, enhancing rim (bright on T1CE), vasogenic oedema spreading through white matter
  (bright on T2/FLAIR, dark on T1), and mass effect that pushes the surrounding tissue away (see ``deform.push``);
* ``metastasis``: one to four enhancing nodules at the grey-white junction, ring-enhancing when large, with oedema;
* ``ms``: ovoid plaques, periventricular (long axis away from the ventricle: Dawson's fingers) and juxtacortical;
* ``stroke``: a territorial infarct (MCA, ACA or PCA-like wedge, cortex included) in one hemisphere;
* ``svd``: small-vessel disease, periventricular caps and confluent deep white-matter hyperintensities.

The label (written beside the scans) is where lesion tissue fills at least half of a voxel: the same for every
contrast of the subject. Stroke territories assume the RAS grid of ``brainfm.data.anatomies``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from brainfm.data.synthetic.contrast import TISSUE_INDEX, smooth_field

# the original four first, so lesion subjects cycle through kinds in the order they always did
LESION_KINDS: tuple[str, ...] = ("tumour", "ms", "stroke", "svd", "metastasis")
_T = TISSUE_INDEX
_WHITE = [_T[n] for n in ("wm", "cerebellar_wm", "brainstem", "deep_gm")]
_PARENCHYMA = [_T[n] for n in ("cortical_gm", "deep_gm", "wm", "cerebellar_gm", "cerebellar_wm", "brainstem")]
_LESION = [_T[n] for n in ("necrosis", "enhancing", "oedema", "ms_plaque", "infarct", "wmh")]


@dataclasses.dataclass
class LesionPlan:
    """Where a lesion goes, chosen on the healthy subject (a tumour's mass effect reshapes it before painting)."""

    kind: str
    centre: np.ndarray  # voxel coordinates of a tumour's centre (other kinds pick their foci while painting)
    radius_mm: float
    mass_mm: float  # radius of the ball whose growth displaces tissue (0: none)


def _fraction(fractions: np.ndarray, names: Sequence[int]) -> np.ndarray:
    return fractions[list(names)].sum(axis=0)


def _pick(candidates: np.ndarray, fallback: np.ndarray, rng: np.random.Generator, n: int = 1) -> np.ndarray:
    """n random voxel coordinates from candidates (or the fallback set when the subject offers none)."""
    points = np.argwhere(candidates)
    if len(points) == 0:
        points = np.argwhere(fallback)
    if len(points) == 0:
        raise ValueError("the brain mask is empty: nowhere to place a lesion")
    return points[rng.choice(len(points), size=n, replace=len(points) < n)].astype(np.float64)


def plan_lesion(kind: str, fractions: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                voxel_mm: float) -> LesionPlan:
    """Choose the lesion's main focus (and a tumour's size and mass effect) on the healthy subject."""
    if kind not in LESION_KINDS:
        raise ValueError(f"lesion kind must be one of {LESION_KINDS}, got {kind!r}")
    if kind != "tumour":
        return LesionPlan(kind, np.zeros(3), 0.0, 0.0)  # placed while painting
    depth = ndimage.distance_transform_edt(mask) * voxel_mm
    cerebrum = _fraction(fractions, [_T["wm"], _T["deep_gm"]]) > 0.5
    radius = float(rng.uniform(8.0, 20.0))
    centre = _pick(cerebrum & (depth > radius + 6.0), cerebrum & (depth >= depth.max() * 0.7), rng)[0]
    return LesionPlan(kind, centre, radius, mass_mm=radius * float(rng.uniform(0.5, 0.8)))


def paint_lesion(plan: LesionPlan, fractions: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                 voxel_mm: float) -> np.ndarray:
    """Replace healthy tissue by lesion tissue in ``fractions`` (in place); return the uint8 lesion label."""
    depth = ndimage.distance_transform_edt(mask) * voxel_mm
    for _attempt in range(8):  # a draw can land where nothing fills half a voxel: draw again
        if plan.kind == "tumour":
            _tumour(fractions, plan.centre, plan.radius_mm, rng, voxel_mm)
        elif plan.kind == "metastasis":
            _metastases(fractions, mask, depth, rng, voxel_mm)
        elif plan.kind == "ms":
            _ms(fractions, mask, depth, rng, voxel_mm)
        elif plan.kind == "stroke":
            _stroke(fractions, mask, rng, voxel_mm)
        else:
            _svd(fractions, mask, depth, rng, voxel_mm)
        label = (_fraction(fractions, _LESION) >= 0.5) & mask
        if label.any():
            return label.astype(np.uint8)
    raise ValueError(f"could not place a visible {plan.kind} lesion in this brain")


def _replace(fractions: np.ndarray, box: tuple[slice, ...], weight: np.ndarray, tissue: str,
             sources: Sequence[int]) -> None:
    """Move ``weight`` (0..1) of the ``sources`` tissues' share into ``tissue`` within ``box``, in place."""
    weight = np.clip(weight, 0.0, 1.0).astype(np.float32)
    local = fractions[(slice(None), *box)]
    moved = np.zeros(weight.shape, np.float32)
    for index in sources:
        taken = local[index] * weight
        local[index] -= taken
        moved += taken
    local[_T[tissue]] += moved


def _blob(shape: Sequence[int], centre: np.ndarray, semi_axes_mm: np.ndarray, voxel_mm: float,
          rng: np.random.Generator, irregularity: float = 0.0,
          long_axis: np.ndarray | None = None) -> tuple[tuple[slice, ...], np.ndarray]:
    """Normalised ellipsoidal radius (1 = surface) of an optionally lumpy ovoid, in its bounding box; the first
    semi-axis follows ``long_axis`` when given, otherwise the orientation is random."""
    rotation = Rotation.random(random_state=rng).as_matrix()
    if long_axis is not None and np.linalg.norm(long_axis) > 0:
        rotation = Rotation.align_vectors([long_axis], [[1.0, 0.0, 0.0]])[0].as_matrix()
    reach = float(np.max(semi_axes_mm)) * (1 + irregularity) / voxel_mm + 2
    lo = np.maximum(np.floor(centre - reach).astype(int), 0)
    hi = np.minimum(np.ceil(centre + reach).astype(int) + 1, np.asarray(shape))
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    grids = np.meshgrid(*(np.arange(s.start, s.stop, dtype=np.float32) for s in box), indexing="ij")
    offsets = np.stack([(g - c) * voxel_mm for g, c in zip(grids, centre, strict=True)], axis=-1)
    radius = np.sqrt((((offsets @ rotation.astype(np.float32)) / semi_axes_mm.astype(np.float32)) ** 2).sum(-1))
    if irregularity > 0:
        lumps = smooth_field(radius.shape, rng, coarse=(4, 4, 4))[0]
        radius = radius / np.clip(1 + irregularity * lumps, 0.5, None)
    return box, radius


def _edge(radius: np.ndarray, outer: float, size_mm: float, voxel_mm: float) -> np.ndarray:
    """1 inside ``outer`` (normalised radius), 0 outside, a one-voxel ramp between: partial volume at the edge."""
    return np.clip((outer - radius) * size_mm / voxel_mm + 0.5, 0.0, 1.0)


def _tumour(fractions, centre, radius_mm, rng, voxel_mm, oedema_range=(1.4, 2.0)) -> None:
    """Necrotic core, enhancing rim 2-6 mm thick, oedema through the white matter around it."""
    oedema = float(rng.uniform(*oedema_range))
    axes = radius_mm * rng.uniform(0.8, 1.2, size=3)
    box, radius = _blob(fractions.shape[1:], centre, axes * oedema, voxel_mm, rng, irregularity=0.2)
    radius = radius * oedema  # now 1 = the tumour's surface, `oedema` = the oedema's
    size = float(axes.mean())
    _replace(fractions, box, _edge(radius, oedema, size, voxel_mm) * 0.95, "oedema", _WHITE)
    _replace(fractions, box, _edge(radius, 1.0, size, voxel_mm), "enhancing",
             _PARENCHYMA + [_T["csf"], _T["oedema"]])
    core = 1.0 - float(rng.uniform(2.0, 6.0)) / size
    if core > 0.2:
        _replace(fractions, box, _edge(radius, core, size, voxel_mm), "necrosis", [_T["enhancing"]])


def _metastases(fractions, mask, depth, rng, voxel_mm) -> None:
    junction = (fractions[_T["cortical_gm"]] > 0.15) & (fractions[_T["wm"]] > 0.15) & (depth > 10.0)
    for centre in _pick(junction, mask & (depth > 10.0), rng, n=int(rng.integers(1, 5))):
        radius = float(rng.uniform(3.0, 9.0))
        _tumour(fractions, centre, radius, rng, voxel_mm, oedema_range=(1.6, 3.0))


def _ms(fractions, mask, depth, rng, voxel_mm) -> None:
    """Periventricular plaques pointing away from the nearest ventricle, and juxtacortical ones."""
    ventricles = fractions[_T["ventricles"]] > 0.5
    if not ventricles.any():
        ventricles = mask & (depth > depth.max() * 0.8)
    distance, nearest = ndimage.distance_transform_edt(~ventricles, return_indices=True)
    distance = distance * voxel_mm
    white = fractions[_T["wm"]] > 0.6
    periventricular = white & (distance >= voxel_mm) & (distance <= 10.0)
    cortex_near = ndimage.binary_dilation(fractions[_T["cortical_gm"]] > 0.5, iterations=max(1, round(3 / voxel_mm)))
    juxtacortical = white & cortex_near & (depth > 6.0)
    count = int(rng.integers(4, 16))
    n_juxta = int(rng.binomial(count, 0.3))
    centres = np.concatenate([_pick(periventricular, white, rng, n=count - n_juxta),
                              _pick(juxtacortical, white, rng, n=n_juxta)]) if n_juxta else \
        _pick(periventricular, white, rng, n=count)
    for centre in centres:
        index = tuple(int(c) for c in centre)
        outward = centre - np.array([nearest[axis][index] for axis in range(3)], dtype=np.float64)
        short = float(rng.uniform(max(2.0, 0.8 * voxel_mm), 4.5))
        axes = np.array([short * rng.uniform(1.5, 2.5), short, short * rng.uniform(0.8, 1.0)])
        box, radius = _blob(fractions.shape[1:], centre, axes, voxel_mm, rng, long_axis=outward)
        _replace(fractions, box, _edge(radius, 1.0, short, voxel_mm), "ms_plaque", _WHITE + [_T["cortical_gm"]])


def _stroke(fractions, mask, rng, voxel_mm) -> None:
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
    half_angle = np.deg2rad(rng.uniform(10.0, 30.0))
    inner_mm = rng.uniform(10.0, 30.0)
    grids = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in mask.shape), indexing="ij", sparse=True)
    offsets = [(g - float(a)) * voxel_mm for g, a in zip(grids, apex, strict=True)]
    distance = np.sqrt(offsets[0] ** 2 + offsets[1] ** 2 + offsets[2] ** 2)
    cosine = sum(o * float(d) for o, d in zip(offsets, direction, strict=True)) / np.maximum(distance, 1e-3)
    angle = np.arccos(np.clip(cosine, -1.0, 1.0))
    allowed = half_angle * (1 + 0.2 * smooth_field(mask.shape, rng, coarse=(6, 7, 6))[0])
    hemisphere = side * (grids[0] - brain_centre[0]) > 0
    weight = np.clip((allowed - angle) / (0.15 * allowed), 0.0, 1.0) * np.clip((distance - inner_mm) / voxel_mm, 0, 1)
    weight = weight * (mask & hemisphere)
    _replace(fractions, (slice(None),) * 3, weight, "infarct", _PARENCHYMA)


def _svd(fractions, mask, depth, rng, voxel_mm) -> None:
    """Periventricular caps and bands, confluent deep patches and punctate foci of white-matter hyperintensity."""
    ventricles = fractions[_T["ventricles"]] > 0.5
    distance = ndimage.distance_transform_edt(~ventricles) * voxel_mm if ventricles.any() else \
        np.full(mask.shape, np.inf, np.float32)
    white = fractions[_T["wm"]] > 0.5
    band = float(rng.uniform(3.0, 8.0))
    patches = smooth_field(mask.shape, rng, coarse=(8, 9, 8))[0] > rng.uniform(1.0, 1.6)
    weight = ((white & (distance <= band)) | (white & patches & (depth > 12.0))).astype(np.float32)
    weight = ndimage.gaussian_filter(weight, 0.5)
    _replace(fractions, (slice(None),) * 3, weight, "wmh", _WHITE)
    for centre in _pick(white & (depth > 15.0), white, rng, n=int(rng.integers(5, 21))):
        size = float(rng.uniform(1.5, 3.0))
        box, radius = _blob(fractions.shape[1:], centre, np.full(3, size), voxel_mm, rng)
        _replace(fractions, box, _edge(radius, 1.0, size, voxel_mm), "wmh", _WHITE)
