"""CQ500: non-contrast head CT as DICOM series, with three radiologists' reads per study.

Layout: Chilamkurthy et al. 2018, "Deep learning algorithms for detection of critical findings in head CT
scans: a retrospective study", Lancet 392:2388-2396, and the dataset page http://headctstudy.qure.ai/dataset
(also cq500.org): one zip per study, CQ500-CT-<n>.zip, holding "CQ500CT<n> CQ500CT<n>/Unknown Study/<series
description>/CT<nnnnnn>.dcm" (series such as "CT PLAIN THIN", "CT 5mm", "CT BONE"; folder names as extracted,
seen in public loaders of the data), and reads.csv: name (CQ500-CT-<n>), Category (B1/B2 batch), then R1:,
R2:, R3: each of ICH, IPH, IVH, SDH, EDH, SAH, BleedLocation-Left, BleedLocation-Right, ChronicBleed,
Fracture, CalvarialFracture, OtherFracture, MassEffect, MidlineShift (0/1). The study folder may sit directly
under the root or inside a CQ500-CT-<n>/ folder (each zip extracted into its own folder); both are accepted,
as is any depth between study and series folders.

One row per series folder (path = the folder; brainfm reads a DICOM series folder as one scan). CQ500 has no
voxel labels: ``findings`` lists the findings at least two of the three readers marked, ``lesion_type`` is
``haemorrhage`` where ICH is among them. Age and sex come from the first slice's DICOM header.
"""

from __future__ import annotations

import re
from pathlib import Path

from brainfm.data.datasets.common import DatasetRow, DatasetScan, Layout, column, find_named, read_table
from brainfm.io import BrainFMInputError

FINDINGS: tuple[str, ...] = (
    "ICH",
    "IPH",
    "IVH",
    "SDH",
    "EDH",
    "SAH",
    "BleedLocation-Left",
    "BleedLocation-Right",
    "ChronicBleed",
    "Fracture",
    "CalvarialFracture",
    "OtherFracture",
    "MassEffect",
    "MidlineShift",
)
_STUDY_DIR = re.compile(r"^CQ500CT(\d+) CQ500CT(\d+)$")
_ZIP_DIR = re.compile(r"^CQ500-CT-(\d+)$")
_NAME = re.compile(r"^CQ500-?CT-?(\d+)$", re.IGNORECASE)
_AGE = re.compile(r"^(\d{1,3})([DWMY])$")
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def _study_number(root: Path, folder: Path) -> str | None:
    number = None
    for name in folder.relative_to(root).parts:
        study = _STUDY_DIR.match(name)
        if study is not None and study.group(1) == study.group(2):
            return study.group(1)
        zipped = _ZIP_DIR.match(name)
        if zipped is not None:
            number = zipped.group(1)
    return number


def _reads(path: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Study -> (Category, findings marked by at least two of the three readers)."""
    rows = read_table(path)
    if not rows:
        raise BrainFMInputError(path, "reads.csv has no rows")
    name_col = column(rows, path, "name")
    category_col = next((c for c in rows[0] if c.lower() == "category"), None)
    missing = [f"R{r}:{f}" for r in (1, 2, 3) for f in FINDINGS if f"R{r}:{f}" not in rows[0]]
    if missing:
        raise BrainFMInputError(
            path, f"reads.csv lacks the columns {missing[:3]}{' ...' if len(missing) > 3 else ''}"
        )
    reads: dict[str, tuple[str, tuple[str, ...]]] = {}
    for row in rows:
        match = _NAME.match(row.get(name_col, ""))
        if match is None:
            continue
        votes = {
            f: sum(row.get(f"R{r}:{f}", "").strip() in ("1", "1.0") for r in (1, 2, 3)) for f in FINDINGS
        }
        category = row.get(category_col, "") if category_col else ""
        reads[f"CQ500-CT-{int(match.group(1))}"] = (category, tuple(f for f in FINDINGS if votes[f] >= 2))
    return reads


def _dicom_demographics(path: Path) -> tuple[float | None, str | None, bool]:
    """(age in years, sex, header readable) from one slice's header."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        header = pydicom.dcmread(
            str(path), stop_before_pixels=True, specific_tags=["PatientAge", "PatientSex"]
        )
    except (InvalidDicomError, OSError, ValueError):
        return None, None, False
    age_text = str(header.get("PatientAge", "") or "").strip().upper()
    match = _AGE.match(age_text)
    age = int(match.group(1)) * _AGE_UNIT_YEARS[match.group(2)] if match else None
    sex = str(header.get("PatientSex", "") or "").strip().upper()
    return age, (sex if sex in ("M", "F") else None), True


def scan_cq500(root: Path, files: list[Path]) -> DatasetScan:
    scan = DatasetScan("cq500", root, extra_columns=("series", "n_slices", "category", "findings"))
    series: dict[Path, list[Path]] = {}
    numbers: dict[Path, str] = {}
    for path in files:
        if path.suffix.lower() != ".dcm":
            continue
        if path.parent not in numbers:
            number = _study_number(root, path.parent)
            if number is None:
                continue
            numbers[path.parent] = number
        series.setdefault(path.parent, []).append(path)
    if not series:
        return scan
    reads_path = find_named(files, "reads.csv")
    if reads_path is None:
        raise BrainFMInputError(
            root,
            "no reads.csv under the root: CQ500 ships the radiologists' reads as "
            "reads.csv; put it beside the study folders",
        )
    scan.use(reads_path)
    reads = _reads(reads_path)
    unread: set[str] = set()
    bad_headers = 0
    for folder, slices in sorted(series.items()):
        subject = f"CQ500-CT-{int(numbers[folder])}"
        scan.series_dirs.add(folder)
        age, sex, readable = _dicom_demographics(slices[0])
        bad_headers += not readable
        if subject not in reads:
            unread.add(subject)
        category, findings = reads.get(subject, ("", ()))
        scan.add(
            DatasetRow(
                path=folder,
                subject=subject,
                dataset="cq500",
                modality="CT",
                age=age,
                sex=sex,
                lesion_type="haemorrhage" if "ICH" in findings else None,
                extra=(
                    ("series", folder.name),
                    ("n_slices", str(len(slices))),
                    ("category", category),
                    ("findings", ";".join(findings)),
                ),
            )
        )
    scan.notes.append("CQ500 has no voxel labels: findings are the majority of three readers, per study")
    if unread:
        scan.notes.append(
            f"{len(unread)} study(ies) not in reads.csv ({', '.join(sorted(unread)[:5])}): "
            "category and findings left empty"
        )
    if bad_headers:
        scan.notes.append(
            f"{bad_headers} series with an unreadable first DICOM header: age and sex left empty"
        )
    return scan


CQ500 = Layout(
    name="cq500",
    title="CQ500",
    expected="'CQ500CT<n> CQ500CT<n>/Unknown Study/<series>/*.dcm' study folders (the CQ500-CT-<n>.zip files "
    "extracted) and reads.csv",
    source="Chilamkurthy et al. 2018, Lancet 392:2388; http://headctstudy.qure.ai/dataset",
    scan=scan_cq500,
)
