"""Multi-channel input (BraTS-style): a subject's co-registered contrasts stacked as the channels of one sample.

The data config's ``preprocess.channels`` names the contrasts in order. The manifest keeps one row per scan; here
the rows of a subject become one sample: its row of the first (reference) contrast carries the others' files.
The reference is preprocessed as any scan (brain, N4, alignment, grid); every other channel is resampled onto the
reference's grid with the same brain mask, and normalised as its own contrast. A subject that lacks a contrast, or
has two scans of one, is refused with one line naming the subject and the manifest: a sample with a silently
missing channel would teach the model that the channel can be absent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from brainfm.config import PreprocessConfig
from brainfm.data.manifest import ManifestRow
from brainfm.io import BrainFMInputError


def stack_channels(rows: Sequence[ManifestRow], channels: Sequence[str], where: str | Path) -> list[ManifestRow]:
    """One row per subject: its ``channels[0]`` row, with ``channels`` holding the other contrasts' files (in
    order). Raises ``BrainFMInputError`` naming ``where`` (the manifest) and the subject for a missing or repeated
    contrast."""
    channels = tuple(str(c).upper() for c in channels)
    by_subject: dict[str, dict[str, ManifestRow]] = {}
    for row in rows:
        scans = by_subject.setdefault(row.subject, {})
        modality = (row.modality or "").upper()
        if modality in scans:
            raise BrainFMInputError(where, f"subject {row.subject!r} has two {modality} scans (rows "
                                           f"{scans[modality].row} and {row.row}); multi-channel input takes one")
        scans[modality] = row
    stacked = []
    for subject, scans in by_subject.items():
        missing = [c for c in channels if c not in scans]
        if missing:
            have = ", ".join(sorted(m or "no modality" for m in scans))
            raise BrainFMInputError(where, f"subject {subject!r} has no {' or '.join(missing)} scan (has {have}); "
                                           f"preprocess.channels asks for {', '.join(channels)}")
        reference = scans[channels[0]]
        extra = tuple((c, scans[c].path) for c in channels[1:])
        stacked.append(dataclasses.replace(reference, channels=extra))
    return stacked


def channel_images(row: ManifestRow, grid: np.ndarray, recipe: PreprocessConfig) -> list[np.ndarray]:
    """The non-reference channels of ``row`` on the reference's model ``grid`` (float32, normalised)."""
    from brainfm.data.preprocess import preprocess_scan

    images = []
    for modality, path in row.channels:
        scan = preprocess_scan(path, modality, recipe, mask_path=row.mask, t1_path=row.t1, grid=grid,
                               serves=(modality,))
        images.append(np.asarray(scan.image, dtype=np.float32))
    return images


__all__ = ["channel_images", "stack_channels"]
