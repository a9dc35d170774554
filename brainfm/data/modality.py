"""CT or MRI, from the intensities: the check a named modality must pass, and the guess when none is named.

CT is stored in Hounsfield units, an absolute scale: air is near -1000 HU and every head CT has air around the
head, and the skull is bone above ~700 HU. MRI intensities are arbitrary positive numbers with no air at -1000.
So air is the deciding evidence (bone is reported beside it): a CT passed as an MRI contrast, or an MRI passed as
CT, would otherwise be normalised with the wrong recipe and scored as if nothing were wrong. Which MRI contrast a
scan is cannot be told reliably from intensities; it comes from the manifest, ``--modality``, or a model that
serves one MRI contrast only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from brainfm.config import MODALITIES
from brainfm.io import BrainFMInputError

AIR_HU = (-1100.0, -850.0)  # air (-1000 HU) with reconstruction noise; padding outside the scan circle is lower
BONE_HU = 700.0
MIN_AIR_FRACTION = 0.02  # a head CT's field of view always holds this much air around the head
MRI_MODALITIES = tuple(m for m in MODALITIES if m != "CT")


@dataclasses.dataclass(frozen=True)
class IntensityEvidence:
    """What the intensities say: fractions of voxels at air and bone HU, and the value range."""

    air_fraction: float
    bone_fraction: float
    minimum: float
    maximum: float

    @property
    def kind(self) -> str:
        return "CT" if self.air_fraction >= MIN_AIR_FRACTION else "MRI"

    def describe(self) -> str:
        return (f"{self.air_fraction:.1%} of voxels near -1000 HU (air), {self.bone_fraction:.1%} above "
                f"{BONE_HU:.0f} HU (bone), values {self.minimum:.4g} to {self.maximum:.4g}")


def intensity_evidence(data: np.ndarray) -> IntensityEvidence:
    """Air and bone fractions of a volume (every other voxel along each axis: the fractions need no more)."""
    sample = np.asarray(data)[::2, ::2, ::2]
    air = (sample >= AIR_HU[0]) & (sample <= AIR_HU[1])
    return IntensityEvidence(
        air_fraction=float(air.mean()),
        bone_fraction=float((sample > BONE_HU).mean()),
        minimum=float(data.min()),
        maximum=float(data.max()),
    )


def resolve_modality(
    path: str | Path, data: np.ndarray, given: str | None, serves: Sequence[str] | None = None
) -> tuple[str, dict[str, object]]:
    """The scan's modality and the evidence for the output JSON: ``given`` checked against the intensities, or
    (when ``None``) CT vs MRI inferred; an inferred MRI takes the one MRI contrast in ``serves`` (default: all
    modalities, so the contrast must then be named). Refusals are one line naming the file, the modality given
    (or inferred) and the evidence."""
    serves = tuple(serves) if serves is not None else MODALITIES
    evidence = intensity_evidence(data)
    record: dict[str, object] = {"evidence": evidence.describe(), "looks_like": evidence.kind}
    if given is not None:
        modality = str(given).upper()
        if modality not in MODALITIES:
            raise BrainFMInputError(path, f"unknown modality {modality!r}; expected one of {list(MODALITIES)}")
        if modality == "CT" and evidence.kind != "CT":
            raise BrainFMInputError(path, f"modality CT given, but the intensities are not CT Hounsfield units "
                                          f"({evidence.describe()}); a head CT holds air at -1000 HU")
        if modality != "CT" and evidence.kind == "CT":
            raise BrainFMInputError(path, f"modality {modality} given, but the intensities are CT Hounsfield units "
                                          f"({evidence.describe()}); pass the modality CT")
        return modality, {**record, "source": "given"}
    if evidence.kind == "CT":
        if "CT" not in serves:
            raise BrainFMInputError(path, f"the intensities are CT Hounsfield units ({evidence.describe()}), and this "
                                          f"model serves {', '.join(serves)} only")
        return "CT", {**record, "source": "inferred from intensities"}
    mri = [m for m in serves if m in MRI_MODALITIES]
    if not mri:
        raise BrainFMInputError(path, f"the intensities look like MRI ({evidence.describe()}), and this model serves "
                                      f"{', '.join(serves)} only")
    if len(mri) > 1:
        raise BrainFMInputError(path, f"give the modality: the intensities look like MRI ({evidence.describe()}) "
                                      f"and the contrast cannot be inferred; one of {mri}")
    return mri[0], {**record, "source": "inferred from intensities (MRI; the one MRI contrast served)"}
