"""Tissue properties, scanner sites and the signal equations that turn tissue fractions into MRI and CT scans.

Each voxel holds the fraction of every tissue (anatomy labels from ``brainfm.data.anatomies`` plus SIMULATED lesion
tissues), so partial volume at boundaries comes out of the mixing itself. MRI intensities follow textbook signal
equations over tissue T1, T2 and proton density (literature values at 3 T; 1.5 T shortens T1 of solid tissue by
about a fifth), with sequence timings drawn per site:

* T1: MPRAGE-like inversion recovery (|1 - 2 exp(-TI/T1) + exp(-TR/T1)|) or spoiled gradient echo;
* T1CE: the site's T1 sequence after gadolinium, which adds ``gd_r1`` to each tissue's relaxation rate R1 = 1/T1
  (vessels, dura, choroid plexus and enhancing tumour; the intact blood-brain barrier keeps brain at 0);
* T2: spin echo, PD (1 - exp(-TR/T1)) exp(-TE/T2) with long TR and TE;
* FLAIR: inversion recovery with TI at the CSF null, magnitude image;
* PD: spin echo with a long TR and a short TE;
* CT: Hounsfield units per tissue (bone, air, fat-muscle scalp, blood).

Then a smooth multiplicative bias field (MRI), thick-slice acquisition (blur and decimation along one axis, then
linear interpolation back), and Rician (MRI) or Gaussian (CT) noise.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from brainfm.data.anatomies import LABEL_NAMES

MRI_MODALITIES: tuple[str, ...] = ("T1", "T1CE", "T2", "FLAIR", "PD")
SYNTH_MODALITIES: tuple[str, ...] = (*MRI_MODALITIES, "CT")
LESION_TISSUES: tuple[str, ...] = ("necrosis", "enhancing", "oedema", "ms_plaque", "infarct", "wmh")
TISSUES: tuple[str, ...] = (*LABEL_NAMES, *LESION_TISSUES)
TISSUE_INDEX: dict[str, int] = {name: i for i, name in enumerate(TISSUES)}


@dataclasses.dataclass(frozen=True)
class Tissue:
    """Relaxation at 3 T, proton density (water = 1), CT attenuation and gadolinium uptake of one tissue."""

    t1_ms: float
    t2_ms: float
    pd: float
    hu: float
    gd_r1: float = 0.0  # 1/s added to R1 on post-contrast T1
    fluid: bool = False  # free water: T1 barely depends on the field


# Brain values after Stanisz et al. 2005 and Wansapura et al. 1999 (3 T); lesion values are SIMULATED choices
# that reproduce the textbook appearance (oedema and plaques long T1 and T2, infarct longer, necrosis fluid-like).
TISSUE_PROPERTIES: dict[str, Tissue] = {
    "background": Tissue(1000.0, 1.0, 0.0, -1000.0),
    "soft_tissue": Tissue(500.0, 90.0, 0.85, 10.0),  # scalp, fat and muscle mixed
    "skull": Tissue(450.0, 40.0, 0.15, 1100.0),  # cortical bone gives no signal, marrow some
    "csf": Tissue(4200.0, 1800.0, 1.0, 8.0, fluid=True),
    "ventricles": Tissue(4200.0, 1800.0, 1.0, 8.0, fluid=True),
    "cortical_gm": Tissue(1450.0, 100.0, 0.80, 40.0),
    "deep_gm": Tissue(1150.0, 85.0, 0.78, 38.0),
    "wm": Tissue(850.0, 75.0, 0.69, 26.0),
    "cerebellar_gm": Tissue(1400.0, 100.0, 0.80, 40.0),
    "cerebellar_wm": Tissue(870.0, 75.0, 0.70, 27.0),
    "brainstem": Tissue(1000.0, 80.0, 0.72, 30.0),
    "dura_vessels": Tissue(1650.0, 150.0, 0.80, 55.0, gd_r1=3.5),  # venous blood and dura
    "choroid_plexus": Tissue(1300.0, 110.0, 0.85, 50.0, gd_r1=2.5),
    "necrosis": Tissue(3000.0, 600.0, 0.95, 15.0, gd_r1=0.05, fluid=True),
    "enhancing": Tissue(1500.0, 120.0, 0.85, 42.0, gd_r1=2.5),
    "oedema": Tissue(1750.0, 180.0, 0.88, 18.0, gd_r1=0.1),
    "ms_plaque": Tissue(1500.0, 150.0, 0.83, 24.0),
    "infarct": Tissue(2200.0, 250.0, 0.90, 14.0),
    "wmh": Tissue(1350.0, 140.0, 0.80, 22.0),
}
assert tuple(TISSUE_PROPERTIES) == TISSUES


@dataclasses.dataclass(frozen=True)
class Site:
    """One scanner and its protocol: the nuisance factor a model should learn to ignore (or harmonise)."""

    name: str
    field_t: float
    t1_sequence: str  # "mprage" or "spgr"
    timings: dict[str, dict[str, float]]  # per MRI modality: tr, te (ms), ti (ms, inversion), flip (degrees)
    slice_mm: dict[str, float]  # acquired slice thickness per modality (thick axis = slice_axis)
    slice_axis: int
    noise: float  # MRI Rician sigma as a fraction of the white-matter signal
    bias: float  # standard deviation of the log bias field
    gain: float  # arbitrary scanner units of white matter
    ct_noise_hu: float
    ct_offset_hu: float


def make_site(name: str) -> Site:
    """A site's protocol, drawn from its name (the same name always gives the same protocol)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    field = float(rng.choice([1.5, 3.0]))
    t1_sequence = str(rng.choice(["mprage", "spgr"]))
    fast = field == 3.0
    timings = {
        # MPRAGE-like: inversion time past grey matter's null (ln 2 x its T1), CSF still near its own
        "T1": ({"tr": rng.uniform(2000, 2500), "ti": rng.uniform(1050, 1250) if fast else rng.uniform(850, 1000),
                "te": rng.uniform(2.5, 4.0), "flip": 9.0} if t1_sequence == "mprage" else
               {"tr": rng.uniform(9, 22), "te": rng.uniform(2.5, 5.0), "flip": rng.uniform(18, 30), "ti": 0.0}),
        "T2": {"tr": rng.uniform(3500, 6500), "te": rng.uniform(85, 115), "ti": 0.0, "flip": 90.0},
        "FLAIR": {"tr": rng.uniform(8000, 11000), "te": rng.uniform(100, 140), "ti": 0.0, "flip": 90.0},
        "PD": {"tr": rng.uniform(8000, 10000), "te": rng.uniform(8, 15), "ti": 0.0, "flip": 90.0},  # CSF >= GM
    }
    timings["T1CE"] = dict(timings["T1"])
    slice_mm = {"T1": float(rng.choice([1.0, 1.2, 1.5])), "T1CE": float(rng.choice([1.0, 1.5, 5.0])),
                "T2": float(rng.uniform(3.0, 5.0)), "FLAIR": float(rng.uniform(3.0, 6.0)),
                "PD": float(rng.uniform(3.0, 5.0)), "CT": float(rng.choice([1.0, 2.5, 5.0]))}
    return Site(name=name, field_t=field, t1_sequence=t1_sequence, timings=timings, slice_mm=slice_mm,
                slice_axis=int(rng.choice([2, 2, 2, 1, 0])), noise=float(rng.uniform(0.015, 0.045)),
                bias=float(rng.uniform(0.05, 0.2)), gain=float(rng.uniform(500, 1500)),
                ct_noise_hu=float(rng.uniform(2.5, 6.0)), ct_offset_hu=float(rng.uniform(-3, 3)))


SITE_NAMES: tuple[str, ...] = ("siteA", "siteB", "siteC", "siteD", "siteE", "siteF")
SITES: dict[str, Site] = {name: make_site(name) for name in SITE_NAMES}


def tissue_levels(modality: str, site: Site, rng: np.random.Generator) -> np.ndarray:
    """Noise-free signal of every tissue (``TISSUES`` order) for one scan: MRI in units where white matter is 1,
    CT in HU. Tissue properties are jittered per scan (T1, T2 +-6 %, PD +-3 %, HU +-2) around the table."""
    n = len(TISSUES)
    props = [TISSUE_PROPERTIES[name] for name in TISSUES]
    if modality == "CT":
        hu = np.array([p.hu for p in props]) + rng.normal(0.0, 2.0, n)
        hu[TISSUE_INDEX["skull"]] = rng.uniform(800, 1500)
        hu[TISSUE_INDEX["soft_tissue"]] = rng.uniform(-40, 40)  # the fat-to-muscle share of the scalp varies
        hu[TISSUE_INDEX["background"]] = -1000.0
        return hu.astype(np.float32)
    t1 = np.array([p.t1_ms * (1.0 if p.fluid or site.field_t == 3.0 else 0.8) for p in props])
    t1 *= np.exp(rng.normal(0.0, 0.06, n))
    t2 = np.array([p.t2_ms for p in props]) * np.exp(rng.normal(0.0, 0.06, n))
    pd = np.array([p.pd for p in props]) * np.exp(rng.normal(0.0, 0.03, n))
    if modality == "T1CE":
        t1 = 1.0 / (1.0 / t1 + np.array([p.gd_r1 for p in props]) / 1000.0)
    timing = site.timings[modality]
    tr, te, ti = timing["tr"], timing["te"], timing["ti"]
    if modality in ("T1", "T1CE") and site.t1_sequence == "spgr":
        e1, alpha = np.exp(-tr / t1), np.deg2rad(timing["flip"])
        signal = pd * np.sin(alpha) * (1 - e1) / (1 - np.cos(alpha) * e1) * np.exp(-te / t2)
    elif modality in ("T1", "T1CE"):
        signal = pd * np.abs(1 - 2 * np.exp(-ti / t1) + np.exp(-tr / t1)) * np.exp(-te / t2)
    elif modality == "FLAIR":
        csf_t1 = t1[TISSUE_INDEX["csf"]]
        ti = csf_t1 * np.log(2.0 / (1.0 + np.exp(-tr / csf_t1))) * rng.uniform(0.97, 1.03)  # the CSF null
        signal = pd * np.abs(1 - 2 * np.exp(-ti / t1) + np.exp(-tr / t1)) * np.exp(-te / t2)
    else:  # T2 and PD: spin echo
        signal = pd * (1 - np.exp(-tr / t1)) * np.exp(-te / t2)
    signal = signal * np.exp(rng.normal(0.0, 0.03, n))  # coil and reconstruction differences per tissue
    return (signal / signal[TISSUE_INDEX["wm"]]).astype(np.float32)


def smooth_field(shape: Sequence[int], rng: np.random.Generator, coarse: Sequence[int],
                 channels: int = 1) -> np.ndarray:
    """Low-frequency noise (channels, *shape): a coarse normal grid upsampled trilinearly."""
    control = torch.from_numpy(rng.standard_normal((1, channels, *coarse)).astype(np.float32))
    return F.interpolate(control, size=tuple(int(s) for s in shape), mode="trilinear",
                         align_corners=True)[0].numpy()


def render(fractions: np.ndarray, modality: str, site: Site, rng: np.random.Generator,
           voxel_mm: float) -> np.ndarray:
    """One scan from tissue fractions (len(TISSUES), X, Y, Z): mixing, texture, bias, thick slices, noise."""
    levels = tissue_levels(modality, site, rng)
    shape = fractions.shape[1:]
    image = np.tensordot(levels, fractions, axes=1).astype(np.float32)
    brain = fractions[[TISSUE_INDEX[n] for n in ("cortical_gm", "deep_gm", "wm", "cerebellar_gm",
                                                  "cerebellar_wm", "brainstem")]].sum(axis=0)
    texture = smooth_field(shape, rng, coarse=(10, 12, 10))[0]
    if modality == "CT":
        image += 2.0 * texture * brain
    else:
        bias = smooth_field(shape, rng, coarse=(3, 3, 3))[0]
        image *= (1.0 + 0.025 * texture * brain) * np.exp(site.bias * bias)
    axis = 2 if modality == "CT" else site.slice_axis  # CT is acquired axially (helical), reformatted
    image = _thick_slices(image, site.slice_mm[modality], axis, voxel_mm)
    if modality == "CT":
        noisy = image + site.ct_offset_hu + site.ct_noise_hu * rng.standard_normal(shape, dtype=np.float32)
        return np.clip(noisy, -1024.0, None).astype(np.float32)
    sigma = site.noise * rng.uniform(0.8, 1.25)
    real = image + sigma * rng.standard_normal(shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(shape, dtype=np.float32)
    return (np.sqrt(real**2 + imaginary**2) * site.gain).astype(np.float32)


def _thick_slices(image: np.ndarray, slice_mm: float, axis: int, voxel_mm: float) -> np.ndarray:
    """Acquire slices ``slice_mm`` thick along ``axis`` (Gaussian slice profile, one slice per thickness), then
    interpolate them back onto the grid, as a scanner's reformat does; in-plane, a slight point-spread blur."""
    in_plane = [0.35 if a != axis else 0.0 for a in range(3)]
    image = ndimage.gaussian_filter(image, in_plane, mode="nearest") if slice_mm <= voxel_mm * 1.5 else image
    step = slice_mm / voxel_mm
    if step <= 1.5:
        return image
    blurred = ndimage.gaussian_filter1d(image, sigma=step / 2.355, axis=axis, mode="nearest")
    n = image.shape[axis]
    acquired = np.arange(0.0, n - 1 + 1e-6, step)  # slice centres, in voxels
    slices = np.take(blurred, np.rint(acquired).astype(int), axis=axis)
    position = np.minimum(np.arange(n) / step, len(acquired) - 1.0)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, len(acquired) - 1)
    weight = (position - low).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
    return (np.take(slices, low, axis=axis) * (1 - weight) + np.take(slices, high, axis=axis) * weight
            ).astype(np.float32)
