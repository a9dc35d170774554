"""Public datasets, as distributed, to the project's manifest CSV (``brainfm data manifest``).

Users arrive with IXI, BraTS 2021, ATLAS v2.0, MSLUB, WMH 2017, OASIS-3, CQ500 or any BIDS folder; each layout
module knows one family's folder and file naming (with the documentation it follows cited where it is
defined), refuses a root that does not look like the dataset, and reports files it cannot place instead of
guessing what they are.
"""

from __future__ import annotations

import os
from pathlib import Path

from brainfm.data.datasets.challenges import ATLAS2, BRATS2021, MSLUB, WMH2017
from brainfm.data.datasets.cohorts import BIDS, IXI, OASIS3
from brainfm.data.datasets.common import (
    BASE_COLUMNS,
    DatasetRow,
    DatasetScan,
    Layout,
    ManifestReport,
    finish,
    list_files,
    refuse,
    sidecar_path,
    write_manifest,
)
from brainfm.data.datasets.cq500 import CQ500
from brainfm.io import BrainFMInputError

LAYOUTS: dict[str, Layout] = {
    layout.name: layout for layout in (IXI, BRATS2021, ATLAS2, MSLUB, WMH2017, OASIS3, CQ500, BIDS)
}

__all__ = [
    "BASE_COLUMNS",
    "LAYOUTS",
    "DatasetRow",
    "DatasetScan",
    "Layout",
    "ManifestReport",
    "build_manifest",
    "scan_dataset",
    "sidecar_path",
]


def scan_dataset(name: str, root: str | os.PathLike, *, exclude: tuple[Path, ...] = ()) -> DatasetScan:
    """Classify every file under ``root`` (but ``exclude``) as dataset ``name`` lays it out; refuse a root
    that is not one."""
    if name not in LAYOUTS:
        raise BrainFMInputError(None, f"unknown dataset {name!r}; known: {', '.join(LAYOUTS)}")
    layout = LAYOUTS[name]
    root_path = Path(os.path.abspath(root))
    if not root_path.is_dir():
        raise BrainFMInputError(root_path, "not a folder")
    files = [path for path in list_files(root_path) if path not in exclude]
    scan = layout.scan(root_path, files)
    if not scan.recognised:
        raise refuse(root_path, layout)
    return finish(scan, files)


def build_manifest(
    name: str, root: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False
) -> ManifestReport:
    """Scan ``root`` and write ``out`` (+ ``<out>.unclassified.txt``); existing files are kept unless
    ``overwrite``, and both are written under a temporary name and renamed."""
    out_path = Path(os.path.abspath(out))
    for target in (out_path, sidecar_path(out_path)):  # fail before a long walk, not after it
        if target.exists() and not overwrite:
            raise BrainFMInputError(target, "already exists; pass --overwrite to replace it")
    scan = scan_dataset(name, root, exclude=(out_path, sidecar_path(out_path)))  # a manifest kept in the root
    return write_manifest(scan, LAYOUTS[name].title, out_path, overwrite=overwrite)
