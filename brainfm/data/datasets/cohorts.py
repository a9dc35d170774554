"""Healthy and ageing cohorts without lesion labels: IXI, any BIDS folder, OASIS-3.

Their scans train the healthy model (IXI is the healthy training set of the published 2D protocols); age and
sex come from the demographics each cohort ships beside its images.
"""

from __future__ import annotations

import re
from pathlib import Path

from brainfm.data.datasets.common import (
    NIFTI,
    DatasetRow,
    DatasetScan,
    Layout,
    as_float,
    column,
    find_named,
    read_table,
    sex_code,
)
from brainfm.io import BrainFMInputError

# ------------------------------------------------------------------------------------------------------ IXI
# Layout: https://brain-development.org/ixi-dataset/ -- one tarball per contrast (IXI-T1.tar, IXI-T2.tar,
# IXI-PD.tar, IXI-MRA.tar, IXI-DTI.tar) whose members are named IXI<id>-<site>-<nnnn>-<contrast>.nii.gz, site
# one of Guys (Guy's Hospital), HH (Hammersmith Hospital), IOP (Institute of Psychiatry); DTI volumes carry a
# direction suffix (-DTI-00 ... -DTI-16). Demographics: IXI.xls, sheet "Table", columns IXI_ID,
# "SEX_ID (1=m, 2=f)", ..., AGE (years). Some IXI_IDs appear on several rows; rows that disagree on age or sex
# leave that value empty rather than picking one. A CSV export of the sheet (IXI.csv) is read the same way.
_IXI = re.compile(r"^IXI(\d{3})-([A-Za-z]+)-(\d{4})-(T1|T2|PD|MRA|DTI-\d{2})" + NIFTI + "$")
_IXI_IGNORED = {"MRA": "IXI MRA (angiography), not used", "DTI": "IXI DTI, not used"}


def scan_ixi(root: Path, files: list[Path]) -> DatasetScan:
    scan = DatasetScan("ixi", root)
    demographics = _ixi_demographics(files, scan)
    for path in files:
        match = _IXI.match(path.name)
        if match is None:
            continue
        number, site, _, contrast = match.groups()
        kind = contrast.split("-")[0]
        if kind in _IXI_IGNORED:
            scan.ignore([path], _IXI_IGNORED[kind])
            continue
        subject = f"IXI{number}"
        age, sex = demographics.get(subject, (None, None))
        scan.add(
            DatasetRow(path=path, subject=subject, dataset="ixi", modality=kind, age=age, sex=sex, site=site)
        )
    return scan


def _ixi_demographics(files: list[Path], scan: DatasetScan) -> dict[str, tuple[float | None, str | None]]:
    table_path = find_named(files, "IXI.xls", "IXI.csv")
    if table_path is None:
        scan.notes.append("no IXI.xls (or IXI.csv export) under the root: age and sex left empty")
        return {}
    scan.use(table_path)
    rows = read_table(table_path)
    if not rows:
        raise BrainFMInputError(table_path, "has no rows")
    id_col = column(rows, table_path, "IXI_ID")
    age_col = column(rows, table_path, "AGE")
    sex_col = column(rows, table_path, "SEX_ID", prefix=True)
    ages: dict[str, set[float]] = {}
    sexes: dict[str, set[str]] = {}
    for row in rows:
        number = as_float(row.get(id_col, ""))
        if number is None:
            continue
        subject = f"IXI{int(number):03d}"
        age = as_float(row.get(age_col, ""))
        if age is not None and age > 0:  # the sheet uses 0/blank for unknown
            ages.setdefault(subject, set()).add(round(age, 2))
        sex = sex_code(row.get(sex_col, ""), numeric={1: "M", 2: "F"})
        if sex is not None:
            sexes.setdefault(subject, set()).add(sex)
    conflicts = sorted(
        s for s in set(ages) | set(sexes) if len(ages.get(s, ())) > 1 or len(sexes.get(s, ())) > 1
    )
    if conflicts:
        scan.notes.append(
            f"{table_path.name}: rows disagree on age or sex for {len(conflicts)} subject(s) "
            f"({', '.join(conflicts[:5])}{', ...' if len(conflicts) > 5 else ''}): left empty"
        )
    subjects = set(ages) | set(sexes)
    return {
        s: (
            next(iter(ages[s])) if len(ages.get(s, ())) == 1 else None,
            next(iter(sexes[s])) if len(sexes.get(s, ())) == 1 else None,
        )
        for s in subjects
    }


IXI = Layout(
    name="ixi",
    title="IXI",
    expected="files named IXI<nnn>-<Guys|HH|IOP>-<nnnn>-<T1|T2|PD>.nii.gz (the IXI-T1/T2/PD tarballs "
    "extracted), optionally IXI.xls",
    source="https://brain-development.org/ixi-dataset/",
    scan=scan_ixi,
)

# ----------------------------------------------------------------------------------------------------- BIDS
# Layout: the BIDS specification (https://bids-specification.readthedocs.io, "Modality agnostic files" and
# "Magnetic Resonance Imaging / Anatomy imaging data"): sub-<label>/[ses-<label>/]anat/
# sub-<label>[_ses-<label>][_<entity>-<value>...]_<suffix>.nii[.gz], participants.tsv with participant_id and
# the optional age and sex columns (site too, where a study records it). Suffixes T1w, T2w, FLAIR and PDw are
# listed; the deprecated BIDS 1.0 suffix PD (OASIS-3 still uses BIDS 1.0.1) is read as PDw. Other anat
# suffixes (T2starw, angio, defacemask, UNIT1, quantitative maps ...) and other datatypes (func, dwi, fmap,
# perf, pet) are ignored, with their name in the reason.
_BIDS_FILE = re.compile(r"^sub-([A-Za-z0-9]+)((?:_[A-Za-z]+-[A-Za-z0-9]+)*)_([A-Za-z0-9]+)" + NIFTI + "$")
BIDS_MODALITIES = {"T1w": "T1", "T2w": "T2", "FLAIR": "FLAIR", "PDw": "PD", "PD": "PD"}
_BIDS_TOP_IGNORED = {"derivatives", "sourcedata", "code", "stimuli", "phenotype"}
_BIDS_METADATA = ("participants.json", "sessions.tsv", "scans.tsv", "dataset_description.json")


def parse_bids_name(name: str) -> tuple[str, dict[str, str], str] | None:
    """(subject label, entities, suffix) of a BIDS NIfTI file name, or None."""
    match = _BIDS_FILE.match(name)
    if match is None:
        return None
    subject, entity_text, suffix = match.groups()
    entities = dict(part.split("-", 1) for part in entity_text.split("_")[1:])
    return subject, entities, suffix


def _entity_column(entities: dict[str, str]) -> str:
    return "_".join(f"{k}-{v}" for k, v in entities.items() if k != "ses")


def scan_bids(root: Path, files: list[Path]) -> DatasetScan:
    scan = DatasetScan(root.name, root, extra_columns=("session", "bids_entities"))
    participants = _bids_participants(root, scan)
    for path in files:
        parts = path.relative_to(root).parts
        if parts[0] in _BIDS_TOP_IGNORED:
            scan.ignore([path], f"BIDS {parts[0]}/ folder (not raw scans)")
            continue
        if len(parts) == 1:
            if path.name in _BIDS_METADATA or path.name.endswith(("_scans.tsv", "_sessions.tsv")):
                scan.ignore([path], "BIDS metadata (not read)")
            continue
        if not re.match(r"^sub-[A-Za-z0-9]+$", parts[0]):
            continue
        if path.name.endswith(("_scans.tsv", "_sessions.tsv", "_scans.json", "_sessions.json")):
            scan.ignore([path], "BIDS metadata (not read)")
            continue
        parsed = parse_bids_name(path.name)
        session_dir = parts[1] if len(parts) == 4 and parts[1].startswith("ses-") else None
        if parsed is None or len(parts) not in (3, 4) or (len(parts) == 4 and session_dir is None):
            if path.name.endswith(".json") and len(parts) in (3, 4):
                scan.ignore([path], "BIDS JSON sidecar (not read)")
            continue
        label, entities, suffix = parsed
        if f"sub-{label}" != parts[0] or (session_dir and f"ses-{entities.get('ses')}" != session_dir):
            continue  # the name and the folders disagree: left unclassified
        datatype = parts[-2]
        if datatype.startswith(("sub-", "ses-")):
            continue  # a scan outside any datatype folder: left unclassified
        if datatype != "anat":
            scan.ignore([path], f"BIDS datatype {datatype} (not structural)")
            continue
        if suffix not in BIDS_MODALITIES:
            scan.ignore([path], f"BIDS anat suffix {suffix} (not one of {', '.join(BIDS_MODALITIES)})")
            continue
        info = participants.get(label, {})
        scan.add(
            DatasetRow(
                path=path,
                subject=label,
                dataset=scan.dataset,
                modality=BIDS_MODALITIES[suffix],
                age=as_float(info.get("age", "")),
                sex=sex_code(info.get("sex", "")),
                site=info.get("site") or None,
                extra=(("session", entities.get("ses", "")), ("bids_entities", _entity_column(entities))),
            )
        )
    return scan


def _bids_participants(root: Path, scan: DatasetScan) -> dict[str, dict[str, str]]:
    path = root / "participants.tsv"
    if not path.is_file():
        scan.notes.append("no participants.tsv at the root: age and sex left empty")
        return {}
    scan.use(path)
    rows = read_table(path)
    if not rows:
        return {}
    id_col = column(rows, path, "participant_id")
    lower = {name.lower(): name for name in rows[0]}
    out: dict[str, dict[str, str]] = {}
    for row in rows:
        label = row.get(id_col, "").removeprefix("sub-")
        out[label] = {key: row.get(lower[key], "") for key in ("age", "sex", "site") if key in lower}
        for key, value in out[label].items():
            if value.lower() in ("n/a", "na", "nan"):
                out[label][key] = ""
    return out


BIDS = Layout(
    name="bids",
    title="a BIDS dataset",
    expected="sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>]..._<T1w|T2w|FLAIR|PDw>.nii.gz, "
    "optionally participants.tsv",
    source="https://bids-specification.readthedocs.io",
    scan=scan_bids,
)

# -------------------------------------------------------------------------------------------------- OASIS-3
# Layout: the OASIS download scripts (github.com/NrgXnat/oasis-scripts, README): download_oasis_scans.sh
# writes <dir>/OAS30001_MR_d0129/<scan folder, e.g. anat1>/<file>.nii.gz (+ .json), the NIfTI files being
# BIDS-named (sub-OAS30001_ses-d0129[_acq-..][_run-..]_T1w.nii.gz; converted from DICOM by dcm2niix, BIDS
# 1.0.1), and download_oasis_scans_bids.sh writes a BIDS tree sub-OAS30001/ses-d0129/anat/...; both are
# accepted. The session label d<N> is days since the participant's entry. Demographics:
# OASIS3_demographics.csv (from the "OASIS3_data_files" subject) with OASISID, AgeatEntry,
# GENDER (1 = male, 2 = female), per the OASIS-3 data dictionary; age at a session = AgeatEntry + N / 365.25.
# OASIS-3 includes cognitively impaired participants: the manifest lists everyone; choosing the cognitively
# normal ones needs the clinical (CDR) tables.
_OASIS_SESSION = re.compile(r"^(OAS3\d{4})_MR_(d\d{4})$")


def scan_oasis3(root: Path, files: list[Path]) -> DatasetScan:
    scan = DatasetScan("oasis3", root, extra_columns=("session", "bids_entities"))
    demographics = _oasis_demographics(files, scan)
    for path in files:
        parts = path.relative_to(root).parts
        if path.name.startswith("OASIS3_") and path.suffix.lower() == ".csv" and path not in scan.used:
            scan.ignore([path], "OASIS-3 data table (not read)")
            continue
        parsed = parse_bids_name(path.name)
        if parsed is None:
            if path.name.endswith(".json") and (
                _OASIS_SESSION.match(parts[0]) or parts[0].startswith("sub-OAS3")
            ):
                scan.ignore([path], "OASIS-3 JSON sidecar (not read)")
            continue
        label, entities, suffix = parsed
        session = entities.get("ses", "")
        scripts_layout = len(parts) == 3 and _OASIS_SESSION.match(parts[0])
        bids_layout = len(parts) == 4 and parts[:3] == (f"sub-{label}", f"ses-{session}", "anat")
        if scripts_layout and parts[0] != f"{label}_MR_{session}":
            continue
        if not (scripts_layout or bids_layout) or not label.startswith("OAS3"):
            if len(parts) == 4 and parts[0] == f"sub-{label}" and label.startswith("OAS3"):
                scan.ignore([path], f"OASIS-3 BIDS datatype {parts[2]} (not structural)")
            continue
        if suffix not in BIDS_MODALITIES:
            scan.ignore([path], f"OASIS-3 scan type {suffix} (not one of T1w, T2w, FLAIR, PDw)")
            continue
        entry_age, sex = demographics.get(label, (None, None))
        age = None if entry_age is None else entry_age + int(session[1:]) / 365.25
        scan.add(
            DatasetRow(
                path=path,
                subject=label,
                dataset="oasis3",
                modality=BIDS_MODALITIES[suffix],
                age=age,
                sex=sex,
                site="WUSTL",
                extra=(("session", session), ("bids_entities", _entity_column(entities))),
            )
        )
    return scan


def _oasis_demographics(files: list[Path], scan: DatasetScan) -> dict[str, tuple[float | None, str | None]]:
    path = find_named(files, "OASIS3_demographics.csv")
    if path is None:
        scan.notes.append("no OASIS3_demographics.csv under the root: age and sex left empty")
        return {}
    scan.use(path)
    rows = read_table(path)
    if not rows:
        return {}
    id_col = column(rows, path, "OASISID", "Subject")
    age_col = column(rows, path, "AgeatEntry")
    sex_col = column(rows, path, "GENDER", "M/F")
    return {
        row[id_col]: (
            as_float(row.get(age_col, "")),
            sex_code(row.get(sex_col, ""), numeric={1: "M", 2: "F"}),
        )
        for row in rows
        if row.get(id_col)
    }


OASIS3 = Layout(
    name="oasis3",
    title="OASIS-3",
    expected="OAS3<nnnn>_MR_d<nnnn>/<scan>/sub-OAS3<nnnn>_ses-d<nnnn>_..._T1w.nii.gz "
    "(download_oasis_scans.sh) or sub-OAS3<nnnn>/ses-d<nnnn>/anat/... (download_oasis_scans_bids.sh)",
    source="https://github.com/NrgXnat/oasis-scripts",
    scan=scan_oasis3,
)
