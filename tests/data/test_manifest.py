"""The one manifest reader: columns, relative paths, unique names, rejections with reasons, bad manifests."""

from __future__ import annotations

from pathlib import Path

import pytest

from brainfm.data.manifest import ManifestRow, Rejection, assign_splits, read_manifest, scan_stem
from brainfm.io import BrainFMInputError


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    """Placeholder scan files (the reader checks existence, never content) beside a manifest."""
    for name in ("a.nii.gz", "a_mask.nii.gz", "a_label.nii.gz", "b.nii", "c.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "dicom").mkdir()
    return tmp_path


def test_rows_resolve_paths_and_keep_every_column(cohort):
    absolute = cohort / "b.nii"
    (cohort / "m.csv").write_text(
        "path,subject,dataset,modality,age,sex,site,split,mask,label,lesion_type,scanner\n"
        "a.nii.gz,sub-1,ds1,flair,71.5,F,site1,test,a_mask.nii.gz,a_label.nii.gz,ms,prisma\n"
        f"{absolute},, ,,,,,,,,,\n"
        "dicom,sub-1,,ct,,,,,,,,\n"
    )
    rows, rejected = read_manifest(cohort / "m.csv")
    assert rejected == []
    first, second, third = rows
    assert first == ManifestRow(
        row=2,
        path=cohort / "a.nii.gz",
        subject="sub-1",
        name="sub-1",
        modality="FLAIR",
        split="test",
        dataset="ds1",
        sex="F",
        site="site1",
        age=71.5,
        mask=cohort / "a_mask.nii.gz",
        label=cohort / "a_label.nii.gz",
        lesion_type="ms",
        extra={"scanner": "prisma"},
    )
    assert first.meta == {"age": 71.5, "sex": "F", "site": "site1"}
    assert second.path == absolute and second.subject == second.name == "b" and second.row == 3
    assert second.modality is None and second.dataset is None and second.age is None and second.meta == {}
    assert second.extra == {"scanner": ""}
    # a second scan of sub-1 keeps its subject but gets a unique output name
    assert third.subject == "sub-1" and third.name == "sub-1_row4" and third.modality == "CT"


def test_manifests_are_utf8_with_or_without_a_byte_order_mark(cohort):
    """Spreadsheets save CSV with a byte-order mark, and sites name subjects and sites in their own language: both read the same
    whatever the locale (the rows are decoded as UTF-8, never in the locale's encoding)."""
    text = "path,subject,site\na.nii.gz,sub-Müller,Zürich\n"
    (cohort / "plain.csv").write_bytes(text.encode("utf-8"))
    (cohort / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    for name in ("plain.csv", "bom.csv"):
        rows, rejected = read_manifest(cohort / name)
        assert rejected == [] and len(rows) == 1
        assert (rows[0].path.name, rows[0].subject, rows[0].site) == ("a.nii.gz", "sub-Müller", "Zürich")


def test_default_modality_fills_empty_cells_only(cohort):
    (cohort / "m.csv").write_text("path,modality\na.nii.gz,\nb.nii,T2\n")
    rows, _ = read_manifest(cohort / "m.csv", default_modality="t1")
    assert [r.modality for r in rows] == ["T1", "T2"]
    assert [r.modality for r in read_manifest(cohort / "m.csv")[0]] == [None, "T2"]


def test_unusable_rows_are_rejected_with_reason_and_one_line(cohort):
    (cohort / "m.csv").write_text(
        "path,subject,modality,age,mask\n"
        ",empty,T1,,\n"
        "gone.nii.gz,missing,T1,,\n"
        "a.nii.gz,nomask,T1,,gone_mask.nii.gz\n"
        "a.nii.gz,xray,XR,,\n"
        "a.nii.gz,old,T1,eighty,\n"
        "c.nii.gz,good,T1,80,\n"
    )
    rows, rejected = read_manifest(cohort / "m.csv")
    assert [r.subject for r in rows] == ["good"] and rows[0].row == 7
    assert [(r.row, r.subject, r.reason) for r in rejected] == [
        (2, "empty", "missing_path"),
        (3, "missing", "missing_file"),
        (4, "nomask", "missing_file"),
        (5, "xray", "bad_modality"),
        (6, "old", "bad_metadata"),
    ]
    assert all(isinstance(r, Rejection) and "\n" not in r.message for r in rejected)
    assert rejected[0].message == f"{cohort / 'm.csv'} row 2: empty 'path' cell"
    assert rejected[1].message == f"{cohort / 'gone.nii.gz'}: path file not found: {cohort / 'gone.nii.gz'}"
    assert rejected[2].message.endswith(f"mask file not found: {cohort / 'gone_mask.nii.gz'}")
    assert (
        "unknown modality 'XR'" in rejected[3].message
        and "age 'eighty' is not a number" in rejected[4].message
    )
    assert rejected[1].as_dict() == {
        "row": 3,
        "path": str(cohort / "gone.nii.gz"),
        "subject": "missing",
        "reason": "missing_file",
        "message": rejected[1].message,
    }


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "manifest file not found"),
        ("subject,modality\nsub-1,T1\n", "manifest needs a 'path' column; found ['subject', 'modality']"),
        (b"\xff\xfe\x00garbage", "unreadable manifest CSV"),
    ],
    ids=["missing", "no-path-column", "binary"],
)
def test_bad_manifests_raise_one_line_naming_the_file(tmp_path, content, problem):
    manifest = tmp_path / "m.csv"
    if isinstance(content, bytes):
        manifest.write_bytes(content)
    elif content is not None:
        manifest.write_text(content)
    with pytest.raises(BrainFMInputError) as info:
        read_manifest(manifest)
    assert str(info.value).startswith(f"{manifest}: {problem}") and "\n" not in str(info.value)
    with pytest.raises(BrainFMInputError, match="manifest is a folder"):
        read_manifest(tmp_path)


def test_single_scan_record_and_stems(tmp_path):
    row = ManifestRow.single(tmp_path / "sub-01_T1w.nii.gz", modality="t1", mask=tmp_path / "m.nii.gz")
    assert (row.name, row.subject, row.modality, row.mask, row.label, row.meta) == (
        "sub-01_T1w",
        "sub-01_T1w",
        "T1",
        tmp_path / "m.nii.gz",
        None,
        {},
    )
    assert [scan_stem(p) for p in ("x/a.NII.GZ", "b.nii", "series_dir", "c.dcm", ".nii.gz")] == [
        "a",
        "b",
        "series_dir",
        "c",
        "scan",
    ]


FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}  # configs/data/tiny.yaml


def test_splits_are_by_subject_and_deterministic(tmp_path):
    rows = ["path,subject,split"]
    for s in range(150):
        for scan in range(2):
            (tmp_path / f"s{s}_{scan}.nii.gz").touch()
            rows.append(f"s{s}_{scan}.nii.gz,subj{s},{'val' if s == 7 and scan == 1 else ''}")
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(rows) + "\n")
    read, rejected = read_manifest(manifest)
    assert not rejected and len(read) == 300
    entries = assign_splits(read, FRACTIONS, 0, manifest)
    by_subject: dict[str, set[str]] = {}
    for entry in entries:
        by_subject.setdefault(entry.subject, set()).add(entry.split)
    assert all(len(splits) == 1 for splits in by_subject.values())  # no subject in two splits
    assert by_subject["subj7"] == {"val"}  # the explicit split wins for all of the subject's scans
    share = {k: sum(s == {k} for s in by_subject.values()) / 150 for k in FRACTIONS}
    assert 0.45 < share["train"] < 0.75 and 0.1 < share["val"] < 0.33 and 0.1 < share["test"] < 0.33
    splits = [e.split for e in entries]
    assert [e.split for e in assign_splits(read, FRACTIONS, 0, manifest)] == splits
    assert [e.split for e in assign_splits(read, FRACTIONS, 1, manifest)] != splits  # the seed matters
    (tmp_path / "bad.csv").write_text("path,subject,split\ns0_0.nii.gz,x,train\ns0_1.nii.gz,x,test\n")
    with pytest.raises(BrainFMInputError, match="subject 'x' is listed in splits 'train' and 'test'"):
        assign_splits(read_manifest(tmp_path / "bad.csv")[0], FRACTIONS, 0, tmp_path / "bad.csv")
    (tmp_path / "dot.csv").write_text("path,split\ns0_0.nii.gz,tr.ain\n")
    with pytest.raises(BrainFMInputError, match=r"dot\.csv: row 2: split 'tr.ain' must use only"):
        assign_splits(read_manifest(tmp_path / "dot.csv")[0], FRACTIONS, 0, tmp_path / "dot.csv")
