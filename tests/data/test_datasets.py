"""Public dataset layouts -> manifest CSV: fixture trees in each distributed layout (tiny volumes written
here), exact rows, refusals of wrong roots, unclassified files, never-overwrite, and the shard writer's
manifest reader."""

from __future__ import annotations

import csv
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainfm.cli import build_parser, main
from brainfm.data.datasets import LAYOUTS, build_manifest, scan_dataset
from brainfm.data.manifest import read_manifest
from brainfm.io import BrainFMInputError

BASE = [
    "path",
    "subject",
    "dataset",
    "modality",
    "age",
    "sex",
    "site",
    "split",
    "mask",
    "label",
    "lesion_type",
]


def nifti(path: Path, label: bool = False) -> Path:
    """An 8x8x8 volume (a 2x2x2 lesion for labels) at 1 mm."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros((8, 8, 8), np.uint8 if label else np.float32)
    data[3:5, 3:5, 3:5] = 1 if label else 100.0
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def touch(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def row(path: str, subject: str, dataset: str, modality: str, **kw: str) -> dict[str, str]:
    out = dict.fromkeys(BASE, "")
    out.update(path=path, subject=subject, dataset=dataset, modality=modality, **kw)
    return out


def run_manifest(dataset: str, root: Path, out: Path, *extra: str) -> int:
    return main(["data", "manifest", "--dataset", dataset, "--root", str(root), "--out", str(out), *extra])


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def unclassified(out: Path) -> list[str]:
    return out.with_name(out.name + ".unclassified.txt").read_text().splitlines()


def assert_readable(out: Path, n_rows: int) -> None:
    """The manifest reader (shards, detect, evaluate) accepts every row: files found, modalities known."""
    entries, rejected = read_manifest(out, default_modality="T1")
    assert rejected == []
    assert len(entries) == n_rows


# ------------------------------------------------------------------------------------------------- trees
def ixi_tree(root: Path) -> None:
    import xlwt

    nifti(root / "IXI-T1" / "IXI002-Guys-0828-T1.nii.gz")
    nifti(root / "IXI-T2" / "IXI002-Guys-0828-T2.nii.gz")
    nifti(root / "IXI-PD" / "IXI012-HH-1211-PD.nii.gz")
    nifti(root / "IXI-T1" / "IXI013-IOP-0873-T1.nii.gz")
    nifti(root / "IXI-MRA" / "IXI002-Guys-0828-MRA.nii.gz")
    nifti(root / "IXI-DTI" / "IXI002-Guys-0828-DTI-00.nii.gz")
    nifti(root / "IXI-T1" / "IXI002-Guys-0828-T3.nii.gz")  # no such contrast: unclassified
    touch(root / "notes.txt")  # unclassified
    book = xlwt.Workbook()
    sheet = book.add_sheet("Table")
    table = [
        ["IXI_ID", "SEX_ID (1=m, 2=f)", "HEIGHT", "AGE"],
        [2, 2, 164, 35.8001],
        [12, 1, 175, 38.78],
        [12, 1, 175, 38.78],  # duplicate row, same values
        [13, 1, 180, 46.71],
        [13, 1, 180, 50.2],
    ]  # duplicate rows that disagree on age
    for i, values in enumerate(table):
        for j, value in enumerate(values):
            sheet.write(i, j, value)
    book.save(str(root / "IXI.xls"))


def brats_tree(root: Path) -> None:
    for kind in ("t1", "t1ce", "t2", "flair"):
        nifti(root / "BraTS2021_00000" / f"BraTS2021_00000_{kind}.nii.gz")
        nifti(root / "BraTS2021_01666" / f"BraTS2021_01666_{kind}.nii.gz")  # validation release: no seg
    nifti(root / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz", label=True)
    nifti(root / "BraTS2021_00002" / "BraTS2021_00003_t1.nii.gz")  # case id and folder disagree
    touch(root / "BraTS2021_Training_Data.tar")


def atlas_tree(root: Path) -> None:
    space = "space-MNI152NLin2009aSym"
    for part, cohort, sub in (
        ("Training", "R001", "sub-r001s001"),
        ("Training", "R052", "sub-r052s031"),
        ("Testing", "R003", "sub-r003s002"),
    ):
        anat = root / "ATLAS_2" / part / cohort / sub / "ses-1" / "anat"
        nifti(anat / f"{sub}_ses-1_{space}_T1w.nii.gz")
        if part == "Training":
            nifti(anat / f"{sub}_ses-1_{space}_label-L_desc-T1lesion_mask.nii.gz", label=True)
    touch(root / "ATLAS_2" / "Training" / "dataset_description.json", "{}")
    nifti(root / "ATLAS_2" / "Training" / "R001" / "sub-r001s001" / "ses-1" / "anat" / "extra.nii.gz")


def mslub_tree(root: Path) -> None:
    patient = root / "patient01"
    for kind in ("T1W", "T1WKS", "T2W", "FLAIR"):
        nifti(patient / f"patient01_{kind}.nii.gz")
    nifti(patient / "patient01_brainmask.nii.gz", label=True)
    nifti(patient / "patient01_consensus_gt.nii.gz", label=True)
    touch(patient / "patient01_T1W_to_FLAIR.txt")
    nifti(patient / "raw" / "patient01_FLAIR.nii.gz")
    nifti(root / "patient02" / "patient02_FLAIR.nii.gz")  # no consensus_gt: ignored


def mslub_mirror_tree(root: Path) -> None:
    coregistered = root / "cross_sectional" / "coregistered" / "patient02"
    for name in ("FLAIR", "T2W"):
        nifti(coregistered / f"{name}.nii.gz")
    nifti(coregistered / "consensus_gt.nii.gz", label=True)
    nifti(coregistered / "brainmask.nii.gz", label=True)
    nifti(root / "cross_sectional" / "raw" / "patient02" / "FLAIR.nii.gz")
    nifti(root / "cross_sectional" / "MNI" / "patient02" / "GOLD_STANDARD_regtoMNI.nii.gz", label=True)
    nifti(root / "longitiudinal" / "raw" / "patient01" / "study1_FLAIR.nii.gz")
    touch(root / "cross_sectional" / "README.md")


def wmh_tree(root: Path) -> None:
    for folder in (
        root / "training" / "Utrecht" / "0",
        root / "training" / "Amsterdam" / "GE3T" / "100",
        root / "test" / "Amsterdam" / "GE1T5" / "137",
    ):
        nifti(folder / "pre" / "FLAIR.nii.gz")
        nifti(folder / "pre" / "T1.nii.gz")
        nifti(folder / "wmh.nii.gz", label=True)
    nifti(root / "training" / "Utrecht" / "0" / "orig" / "FLAIR.nii.gz")
    nifti(root / "training" / "Utrecht" / "0" / "pre" / "3DT1.nii.gz")
    nifti(root / "test" / "Singapore" / "51" / "pre" / "FLAIR.nii.gz")  # no wmh.nii.gz: ignored
    nifti(
        root / "additional_annotations" / "observer_o3" / "training" / "Utrecht" / "0" / "result.nii.gz", True
    )
    touch(root / "training" / "Utrecht" / "0" / "pre" / "FLAIR_notes.csv")  # unclassified


def oasis_tree(root: Path) -> None:
    session = root / "OAS30001_MR_d0129"
    nifti(session / "anat1" / "sub-OAS30001_ses-d0129_run-01_T1w.nii.gz")
    touch(session / "anat1" / "sub-OAS30001_ses-d0129_run-01_T1w.json", "{}")
    nifti(session / "anat2" / "sub-OAS30001_ses-d0129_acq-TSE_T2w.nii.gz")
    nifti(session / "func1" / "sub-OAS30001_ses-d0129_task-rest_run-01_bold.nii.gz")
    nifti(root / "sub-OAS30002" / "ses-d0000" / "anat" / "sub-OAS30002_ses-d0000_FLAIR.nii.gz")
    nifti(session / "anat3" / "sub-OAS30009_ses-d0129_T1w.nii.gz")  # another participant's name: unclassified
    touch(root / "OASIS3_demographics.csv", "OASISID,AgeatEntry,GENDER\nOAS30001,65.19,2\nOAS30002,71.0,1\n")
    touch(root / "OASIS3_UDSb4_cdr.csv", "OASISID,CDRTOT\n")


def bids_tree(root: Path) -> None:
    touch(
        root / "participants.tsv",
        "participant_id\tage\tsex\tsite\nsub-01\t25\tM\tA\nsub-02\tn/a\tfemale\tB\n",
    )
    touch(root / "dataset_description.json", "{}")
    nifti(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    nifti(root / "sub-01" / "anat" / "sub-01_T2starw.nii.gz")
    nifti(root / "sub-01" / "func" / "sub-01_task-rest_bold.nii.gz")
    nifti(root / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_acq-mprage_T1w.nii.gz")
    nifti(root / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_FLAIR.nii.gz")
    nifti(root / "sub-02" / "ses-1" / "anat" / "sub-03_ses-1_T1w.nii.gz")  # name and folder disagree
    nifti(root / "derivatives" / "fmriprep" / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz", True)


def dicom_series(folder: Path, n: int, age: str, sex: str) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = "1.2.826.0.1.3680043.8.498.1." + str(zlib.crc32(folder.name.encode()))
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = f"{series_uid}.{i + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = (
            CTImageStorage,
            f"{series_uid}.{i + 1}",
            series_uid,
        )
        ds.Modality, ds.PatientAge, ds.PatientSex, ds.InstanceNumber = "CT", age, sex, i + 1
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, float(i)], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness, ds.RescaleIntercept, ds.RescaleSlope = [1, 1], 1, -1024, 1
        ds.PixelData = np.full((8, 8), 1040, np.int16).tobytes()
        ds.save_as(str(folder / f"CT{i:06d}.dcm"), enforce_file_format=True)


def cq500_tree(root: Path) -> None:
    from brainfm.data.datasets.cq500 import FINDINGS

    header = ["name", "Category"] + [f"R{r}:{f}" for r in (1, 2, 3) for f in FINDINGS]
    votes = {
        ("CQ500-CT-0", "R1:ICH"),
        ("CQ500-CT-0", "R2:ICH"),
        ("CQ500-CT-0", "R1:IPH"),
        ("CQ500-CT-0", "R2:MassEffect"),
        ("CQ500-CT-0", "R3:MassEffect"),
    }
    lines = [",".join(header)]
    for name, category in (("CQ500-CT-0", "B1"), ("CQ500-CT-1", "B2")):
        lines.append(",".join([name, category] + ["1" if (name, c) in votes else "0" for c in header[2:]]))
    touch(root / "reads.csv", "\n".join(lines) + "\n")
    study0 = root / "CQ500CT0 CQ500CT0" / "Unknown Study"
    dicom_series(study0 / "CT PLAIN THIN", 3, "045Y", "M")
    dicom_series(study0 / "CT BONE", 2, "045Y", "M")
    dicom_series(root / "CQ500-CT-1" / "CQ500CT1 CQ500CT1" / "Unknown Study" / "CT 5mm", 2, "030Y", "F")
    touch(study0 / "CT PLAIN THIN" / "Thumbs.db")  # unclassified
    touch(root / "CQ500-CT-2.zip")


TREES = {
    "ixi": ixi_tree,
    "brats2021": brats_tree,
    "atlas2": atlas_tree,
    "mslub": mslub_tree,
    "wmh2017": wmh_tree,
    "oasis3": oasis_tree,
    "cq500": cq500_tree,
    "bids": bids_tree,
}


# ------------------------------------------------------------------------------------------------- layouts
def test_ixi_rows_demographics_and_unclassified(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "IXI"
    ixi_tree(root)
    out = root / "manifest.csv"  # under the root: relative paths, and the manifest is not walked on a rerun
    assert run_manifest("ixi", root, out) == 0
    columns, rows = read_rows(out)
    assert columns == BASE
    assert rows == [
        row("IXI-T1/IXI002-Guys-0828-T1.nii.gz", "IXI002", "ixi", "T1", age="35.8", sex="F", site="Guys"),
        row("IXI-T2/IXI002-Guys-0828-T2.nii.gz", "IXI002", "ixi", "T2", age="35.8", sex="F", site="Guys"),
        row("IXI-PD/IXI012-HH-1211-PD.nii.gz", "IXI012", "ixi", "PD", age="38.78", sex="M", site="HH"),
        row("IXI-T1/IXI013-IOP-0873-T1.nii.gz", "IXI013", "ixi", "T1", sex="M", site="IOP"),
    ]
    assert unclassified(out) == ["IXI-T1/IXI002-Guys-0828-T3.nii.gz", "notes.txt"]
    printed = capsys.readouterr().out
    assert "IXI MRA (angiography), not used (1)" in printed and "IXI DTI, not used (1)" in printed
    assert "IXI013" in printed and "notes.txt" in printed  # the age conflict and the unclassified file
    assert_readable(out, 4)
    capsys.readouterr()
    assert (
        run_manifest("ixi", root, out, "--overwrite") == 0
    )  # the kept manifest is not read as a dataset file
    assert unclassified(out) == ["IXI-T1/IXI002-Guys-0828-T3.nii.gz", "notes.txt"]


def test_ixi_csv_export_and_absolute_paths(tmp_path: Path) -> None:
    root = tmp_path / "ixi"
    nifti(root / "IXI002-Guys-0828-T2.nii.gz")
    touch(root / "IXI.csv", 'IXI_ID,"SEX_ID (1=m, 2=f)",AGE\n2,1,60.5\n')
    out = tmp_path / "elsewhere" / "ixi.csv"
    report = build_manifest("ixi", root, out)
    assert (report.n_rows, report.n_subjects, report.unclassified) == (1, 1, ())
    assert read_rows(out)[1] == [
        row(
            (root / "IXI002-Guys-0828-T2.nii.gz").as_posix(),
            "IXI002",
            "ixi",
            "T2",
            age="60.5",
            sex="M",
            site="Guys",
        )
    ]


def test_brats2021(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "BraTS"
    brats_tree(root)
    out = root / "brats.csv"
    assert run_manifest("brats2021", root, out) == 0
    seg = "BraTS2021_00000/BraTS2021_00000_seg.nii.gz"
    expected = [
        row(
            f"BraTS2021_00000/BraTS2021_00000_{kind}.nii.gz",
            "BraTS2021_00000",
            "brats2021",
            modality,
            label=seg,
            lesion_type="tumour",
        )
        for kind, modality in (("flair", "FLAIR"), ("t1", "T1"), ("t1ce", "T1CE"), ("t2", "T2"))
    ]
    assert read_rows(out)[1] == expected
    assert unclassified(out) == ["BraTS2021_00002/BraTS2021_00003_t1.nii.gz"]
    printed = capsys.readouterr().out
    assert (
        "BraTS seg missing (a release without labels: a label-less row would count as a healthy scan) (4)"
        in printed
    )
    assert "archive (extract it first) (1)" in printed
    assert_readable(out, 4)


def test_atlas2(tmp_path: Path) -> None:
    root = tmp_path / "atlas"
    atlas_tree(root)
    out = tmp_path / "atlas.csv"
    report = build_manifest("atlas2", root, out)
    columns, rows = read_rows(out)
    assert columns == [*BASE, "partition"]
    space = "space-MNI152NLin2009aSym"
    expected = []
    for cohort, sub in (("R001", "sub-r001s001"), ("R052", "sub-r052s031")):
        anat = f"atlas/ATLAS_2/Training/{cohort}/{sub}/ses-1/anat/{sub}_ses-1_{space}"
        expected.append(
            row(
                f"{anat}_T1w.nii.gz",
                sub,
                "atlas2",
                "T1",
                site=cohort,
                label=f"{anat}_label-L_desc-T1lesion_mask.nii.gz",
                lesion_type="stroke",
                partition="Training",
            )
        )
    assert rows == expected
    assert report.unclassified == ("ATLAS_2/Training/R001/sub-r001s001/ses-1/anat/extra.nii.gz",)
    assert report.ignored == {
        "ATLAS lesion mask missing (a release without labels: a label-less row would "
        "count as a healthy scan)": 1,
        "JSON sidecar or description (not read)": 1,
    }
    assert_readable(out, 2)


def test_mslub_archive_layout(tmp_path: Path) -> None:
    root = tmp_path / "MSLUB"
    mslub_tree(root)
    out = root / "mslub.csv"
    report = build_manifest("mslub", root, out)
    common = {
        "site": "Ljubljana",
        "mask": "patient01/patient01_brainmask.nii.gz",
        "label": "patient01/patient01_consensus_gt.nii.gz",
        "lesion_type": "ms",
    }
    assert read_rows(out)[1] == [
        row(f"patient01/patient01_{kind}.nii.gz", "patient01", "mslub", modality, **common)
        for kind, modality in (("FLAIR", "FLAIR"), ("T1W", "T1"), ("T1WKS", "T1CE"), ("T2W", "T2"))
    ]
    assert report.unclassified == ()
    assert set(report.ignored) == {
        "MSLUB affine transform parameters (not read)",
        "MSLUB raw image in its original space (the label is on the co-registered FLAIR grid; the "
        "co-registered copy is listed)",
        "MSLUB consensus_gt missing (a release without labels: a label-less row would count as a healthy "
        "scan)",
    }
    assert_readable(out, 4)


def test_mslub_open_ms_data_mirror(tmp_path: Path) -> None:
    root = tmp_path / "open_ms_data"
    mslub_mirror_tree(root)
    out = root / "m.csv"
    report = build_manifest("mslub", root, out)
    folder = "cross_sectional/coregistered/patient02"
    common = {
        "site": "Ljubljana",
        "mask": f"{folder}/brainmask.nii.gz",
        "label": f"{folder}/consensus_gt.nii.gz",
        "lesion_type": "ms",
    }
    assert read_rows(out)[1] == [
        row(f"{folder}/FLAIR.nii.gz", "patient02", "mslub", "FLAIR", **common),
        row(f"{folder}/T2W.nii.gz", "patient02", "mslub", "T2", **common),
    ]
    assert report.unclassified == ()
    assert report.ignored["documentation"] == 1
    assert report.ignored["MSLUB longitudinal lesion-change database (a different dataset)"] == 1
    assert report.ignored["MSLUB copy registered to MNI by the open_ms_data mirror (not listed)"] == 1


def test_wmh2017_sites_partitions_and_label_2(tmp_path: Path) -> None:
    root = tmp_path / "WMH"
    wmh_tree(root)
    out = root / "wmh.csv"
    report = build_manifest("wmh2017", root, out)
    columns, rows = read_rows(out)
    assert columns == [*BASE, "partition", "label_ignore"]
    expected = []
    for folder, subject, site, partition in (
        ("test/Amsterdam/GE1T5/137", "test_Amsterdam-GE1T5_137", "Amsterdam-GE1T5", "test"),
        ("training/Amsterdam/GE3T/100", "training_Amsterdam-GE3T_100", "Amsterdam-GE3T", "training"),
        ("training/Utrecht/0", "training_Utrecht_0", "Utrecht", "training"),
    ):
        for name, modality in (("FLAIR", "FLAIR"), ("T1", "T1")):
            expected.append(
                row(
                    f"{folder}/pre/{name}.nii.gz",
                    subject,
                    "wmh2017",
                    modality,
                    site=site,
                    label=f"{folder}/wmh.nii.gz",
                    lesion_type="svd",
                    partition=partition,
                    label_ignore="2",
                )
            )
    assert rows == expected
    assert report.unclassified == ("training/Utrecht/0/pre/FLAIR_notes.csv",)
    assert report.ignored == {
        "WMH additional observers' annotations (not the reference standard)": 1,
        "WMH orig/ image (the organisers' pre/ copy on the label's grid is listed)": 1,
        "WMH 3D T1 on its own grid, not the FLAIR grid of wmh.nii.gz": 1,
        "wmh.nii.gz missing (a release without labels: a label-less row would count as a healthy scan)": 1,
    }
    assert_readable(out, 6)


def test_wmh2017_original_training_download(tmp_path: Path) -> None:
    """The 2017 training zip had Utrecht/, Singapore/ and GE3T/ at the top (no Amsterdam/ level)."""
    root = tmp_path / "WMH_training"
    for folder in (root / "GE3T" / "100", root / "Singapore" / "50"):
        nifti(folder / "pre" / "FLAIR.nii.gz")
        nifti(folder / "wmh.nii.gz", label=True)
    rows = read_rows(build_manifest("wmh2017", root, root / "w.csv").manifest)[1]
    assert [(r["subject"], r["site"], r["partition"]) for r in rows] == [
        ("Amsterdam-GE3T_100", "Amsterdam-GE3T", ""),
        ("Singapore_50", "Singapore", ""),
    ]


def test_oasis3_both_download_layouts(tmp_path: Path) -> None:
    root = tmp_path / "oasis"
    oasis_tree(root)
    out = root / "oasis.csv"
    report = build_manifest("oasis3", root, out)
    columns, rows = read_rows(out)
    assert columns == [*BASE, "session", "bids_entities"]
    age = f"{round(65.19 + 129 / 365.25, 2):g}"
    assert rows == [
        row(
            "OAS30001_MR_d0129/anat1/sub-OAS30001_ses-d0129_run-01_T1w.nii.gz",
            "OAS30001",
            "oasis3",
            "T1",
            age=age,
            sex="F",
            site="WUSTL",
            session="d0129",
            bids_entities="run-01",
        ),
        row(
            "OAS30001_MR_d0129/anat2/sub-OAS30001_ses-d0129_acq-TSE_T2w.nii.gz",
            "OAS30001",
            "oasis3",
            "T2",
            age=age,
            sex="F",
            site="WUSTL",
            session="d0129",
            bids_entities="acq-TSE",
        ),
        row(
            "sub-OAS30002/ses-d0000/anat/sub-OAS30002_ses-d0000_FLAIR.nii.gz",
            "OAS30002",
            "oasis3",
            "FLAIR",
            age="71",
            sex="M",
            site="WUSTL",
            session="d0000",
            bids_entities="",
        ),
    ]
    assert report.unclassified == ("OAS30001_MR_d0129/anat3/sub-OAS30009_ses-d0129_T1w.nii.gz",)
    assert report.ignored == {
        "OASIS-3 JSON sidecar (not read)": 1,
        "OASIS-3 data table (not read)": 1,
        "OASIS-3 scan type bold (not one of T1w, T2w, FLAIR, PDw)": 1,
    }
    assert_readable(out, 3)


def test_bids_participants_and_datatypes(tmp_path: Path) -> None:
    root = tmp_path / "ds000001"
    bids_tree(root)
    out = tmp_path / "bids.csv"
    report = build_manifest("bids", root, out)
    assert read_rows(out)[1] == [
        row(
            "ds000001/sub-01/anat/sub-01_T1w.nii.gz",
            "01",
            "ds000001",
            "T1",
            age="25",
            sex="M",
            site="A",
            session="",
            bids_entities="",
        ),
        row(
            "ds000001/sub-02/ses-1/anat/sub-02_ses-1_FLAIR.nii.gz",
            "02",
            "ds000001",
            "FLAIR",
            sex="F",
            site="B",
            session="1",
            bids_entities="",
        ),
        row(
            "ds000001/sub-02/ses-1/anat/sub-02_ses-1_acq-mprage_T1w.nii.gz",
            "02",
            "ds000001",
            "T1",
            sex="F",
            site="B",
            session="1",
            bids_entities="acq-mprage",
        ),
    ]
    assert report.unclassified == ("sub-02/ses-1/anat/sub-03_ses-1_T1w.nii.gz",)
    assert report.ignored == {
        "BIDS derivatives/ folder (not raw scans)": 1,
        "BIDS datatype func (not structural)": 1,
        "BIDS anat suffix T2starw (not one of T1w, T2w, FLAIR, PDw, PD)": 1,
        "BIDS metadata (not read)": 1,
    }
    assert_readable(out, 3)


def test_cq500_dicom_series_and_reads(tmp_path: Path) -> None:
    root = tmp_path / "CQ500"
    cq500_tree(root)
    out = root / "cq500.csv"
    report = build_manifest("cq500", root, out)
    columns, rows = read_rows(out)
    assert columns == [*BASE, "series", "n_slices", "category", "findings"]
    study0 = "CQ500CT0 CQ500CT0/Unknown Study"
    assert rows == [
        row(
            f"{study0}/CT BONE",
            "CQ500-CT-0",
            "cq500",
            "CT",
            age="45",
            sex="M",
            lesion_type="haemorrhage",
            series="CT BONE",
            n_slices="2",
            category="B1",
            findings="ICH;MassEffect",
        ),
        row(
            f"{study0}/CT PLAIN THIN",
            "CQ500-CT-0",
            "cq500",
            "CT",
            age="45",
            sex="M",
            lesion_type="haemorrhage",
            series="CT PLAIN THIN",
            n_slices="3",
            category="B1",
            findings="ICH;MassEffect",
        ),
        row(
            "CQ500-CT-1/CQ500CT1 CQ500CT1/Unknown Study/CT 5mm",
            "CQ500-CT-1",
            "cq500",
            "CT",
            age="30",
            sex="F",
            series="CT 5mm",
            n_slices="2",
            category="B2",
            findings="",
        ),
    ]
    assert report.unclassified == (f"{study0}/CT PLAIN THIN/Thumbs.db",)
    assert report.ignored == {"archive (extract it first)": 1}
    assert any("no voxel labels" in note for note in report.notes)
    assert_readable(out, 3)


def test_cq500_without_reads_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "CQ500"
    dicom_series(root / "CQ500CT5 CQ500CT5" / "Unknown Study" / "CT 5mm", 1, "050Y", "F")
    with pytest.raises(BrainFMInputError, match="no reads.csv"):
        scan_dataset("cq500", root)


# ------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("dataset", sorted(TREES))
def test_wrong_root_exits_2_with_one_line(
    dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every layout refuses another dataset's tree with one line saying what it expected."""
    other = "brats2021" if dataset != "brats2021" else "ixi"
    root = tmp_path / "root"
    TREES[other](root)
    out = tmp_path / "m.csv"
    assert run_manifest(dataset, root, out) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert (
        err == f"brainfm: error: {root}: does not look like {LAYOUTS[dataset].title}: expected "
        f"{LAYOUTS[dataset].expected}"
    )
    assert not out.exists() and not out.with_name("m.csv.unclassified.txt").exists()


def test_existing_output_is_never_overwritten_unasked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "ds"
    bids_tree(root)
    out = tmp_path / "m.csv"
    touch(out, "mine\n")
    assert run_manifest("bids", root, out) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "mine\n"
    assert run_manifest("bids", root, out, "--overwrite") == 0
    assert read_rows(out)[0][:2] == ["path", "subject"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ds",
        "m.csv",
        "m.csv.unclassified.txt",
    ]  # no temp left


def test_missing_root_and_root_without_scans(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_manifest("ixi", tmp_path / "nope", tmp_path / "m.csv") == 2
    assert "not a folder" in capsys.readouterr().err
    root = tmp_path / "brats"
    nifti(root / "BraTS2021_01666" / "BraTS2021_01666_t1.nii.gz")  # a validation case only: nothing to list
    assert run_manifest("brats2021", root, tmp_path / "m.csv") == 2
    err = capsys.readouterr().err
    assert "found no BraTS 2021 scans that can be listed" in err and "BraTS seg missing" in err


def test_cli_dataset_choices_match_the_layouts() -> None:
    parser = build_parser()
    data = next(
        a for a in parser._subparsers._group_actions[0].choices["data"]._actions if a.dest == "data_command"
    )
    manifest = data.choices["manifest"]
    choices = next(a.choices for a in manifest._actions if a.dest == "dataset")
    assert sorted(choices) == sorted(LAYOUTS)
