"""brainfm.io: no writer deletes or overwrites a file brainfm did not write; NIfTI qform never contradicts the sform."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brainfm.io import (
    MANIFEST_NAME,
    BrainFMInputError,
    atomic_dir,
    check_output_dir,
    commit_files,
    owned_files,
    save_nifti,
    write_json,
)

NAMES = st.sampled_from(["a.json", "b.txt", "notes.md", "vae", "calibration", "x.nii.gz", "README.md"])
TREES = st.dictionaries(
    st.lists(NAMES, min_size=1, max_size=3).map(lambda parts: "/".join(parts)),
    st.binary(min_size=0, max_size=16),
    min_size=1,
    max_size=6,
)


def _write_tree(root: Path, tree: dict[str, bytes]) -> dict[str, bytes]:
    """Write what can be written (a name used as both file and folder keeps the first); returns what was."""
    written: dict[str, bytes] = {}
    for name, payload in tree.items():
        path = root / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                continue
            path.write_bytes(payload)
            written[name] = payload
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            continue
    return written


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and p.name != MANIFEST_NAME}


def _dir_writer(content: dict[str, bytes]):
    def write(destination: Path) -> None:
        with atomic_dir(destination) as tmp:
            _write_tree(tmp, content)
    return write


def _files_writer(content: dict[str, bytes]):
    def write(destination: Path) -> None:
        commit_files(destination, {name.replace("/", "_"): (lambda target, p=payload: target.write_bytes(p))
                                   for name, payload in content.items()})
    return write


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=TREES, first=TREES, second=TREES, whole_folder=st.booleans(), user_first=st.booleans())
def test_unrelated_files_always_survive(user, first, second, whole_folder, user_first):
    """Whatever a folder holds (user files before brainfm's first write, or added into a folder brainfm wrote),
    writing brainfm output into it never changes a file brainfm did not write: each write is refused with one
    line, or it succeeds and every unrelated file is unchanged."""
    writer = _dir_writer if whole_folder else _files_writer
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "out"
        root.mkdir()
        before = _write_tree(root, user) if user_first else {}
        outcomes = []
        for step, content in enumerate((first, second)):
            if step == 1 and not user_first:
                before = _write_tree(root, {k: v for k, v in user.items() if not (root / k).exists()})
            try:
                writer(content)(root)
                outcomes.append("written")
            except BrainFMInputError as exc:
                assert "\n" not in str(exc)
                outcomes.append("refused")
            current = _files(root)
            for name, payload in before.items():
                assert current.get(name) == payload, name
            assert not [p for p in Path(tmp).iterdir() if p.name != "out"]  # no temporary left beside it
        if not user_first:
            assert outcomes[0] == "written"  # an empty folder always takes brainfm's output


def test_whole_folder_writes_replace_only_brainfms_own_files(tmp_path):
    out = tmp_path / "model"
    _dir_writer({"vae/config.json": b"1", "old.json": b"old"})(out)
    assert owned_files(out) == {"vae/config.json", "old.json"}
    (out / "notes.txt").write_text("mine")
    (out / "vae" / "mine.txt").write_text("also mine")
    _dir_writer({"vae/config.json": b"2", "new.json": b"new"})(out)
    assert _files(out) == {"vae/config.json": b"2", "new.json": b"new", "notes.txt": b"mine",
                           "vae/mine.txt": b"also mine"}
    assert owned_files(out) == {"vae/config.json", "new.json"}
    # a new file that would replace a user's file: refused, nothing changed
    with pytest.raises(BrainFMInputError, match=r"notes\.txt: exists and was not written by brainfm"):
        _dir_writer({"notes.txt": b"brainfm"})(out)
    assert (out / "notes.txt").read_text() == "mine" and (out / "new.json").read_bytes() == b"new"


def test_a_folder_brainfm_did_not_write_is_refused_before_any_work(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "data.csv").write_text("x")
    ran = []
    with pytest.raises(BrainFMInputError, match="not empty and was not written by brainfm"):
        with atomic_dir(out):
            ran.append(True)
    assert not ran and (out / "data.csv").read_text() == "x"
    with pytest.raises(BrainFMInputError, match="exists and is not a folder"):
        check_output_dir(out / "data.csv")
    with pytest.raises(BrainFMInputError, match="is a file, not a folder"):
        check_output_dir(out / "data.csv" / "below")
    empty = tmp_path / "empty"
    empty.mkdir()
    _dir_writer({"a.json": b"{}"})(empty)  # an empty folder is fine
    assert _files(empty) == {"a.json": b"{}"}


def test_file_writes_never_touch_inputs_or_foreign_files(tmp_path):
    scan, mask = tmp_path / "scan.nii.gz", tmp_path / "scan_mask.nii.gz"
    scan.write_bytes(b"scan")
    mask.write_bytes(b"mask")
    with pytest.raises(BrainFMInputError, match="scan_mask.nii.gz: exists and was not written by brainfm"):
        commit_files(tmp_path, {"scan_mask.nii.gz": lambda t: t.write_bytes(b"anomaly")})
    assert mask.read_bytes() == b"mask"
    commit_files(tmp_path, {"scan_zmap.nii.gz": lambda t: t.write_bytes(b"z")})
    commit_files(tmp_path, {"scan_zmap.nii.gz": lambda t: t.write_bytes(b"z2")})  # its own output: replaced
    assert (tmp_path / "scan_zmap.nii.gz").read_bytes() == b"z2" and owned_files(tmp_path) == {"scan_zmap.nii.gz"}
    with pytest.raises(BrainFMInputError, match="would overwrite an input"):
        check_output_dir(tmp_path, ["scan_zmap.nii.gz"], inputs=[tmp_path / "scan_zmap.nii.gz"])


def test_atomic_path_never_replaces_a_folder(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "keep").write_text("x")
    with pytest.raises(BrainFMInputError, match="is a folder"):
        write_json(tmp_path / "dir", {"a": 1})
    assert (tmp_path / "dir" / "keep").read_text() == "x"
    write_json(tmp_path / "f.json", {"a": 1})
    assert json.loads((tmp_path / "f.json").read_text()) == {"a": 1}
    assert sorted(os.listdir(tmp_path)) == ["dir", "f.json"]


def test_qform_is_written_only_when_it_represents_the_affine(tmp_path):
    """A sheared affine used to get a qform (code 1) up to 0.3 mm off, which ITK-based viewers then use."""
    data = np.zeros((40, 48, 40), np.float32)
    sheared = np.array([[2.0, 0.3, 0.0, -90.0], [0.0, 2.0, 0.0, -126.0], [0.0, 0.0, 2.0, -72.0], [0, 0, 0, 1]])
    save_nifti(data, sheared, tmp_path / "sheared.nii.gz")
    header = nib.load(tmp_path / "sheared.nii.gz").header
    assert int(header["qform_code"]) == 0 and int(header["sform_code"]) == 1
    np.testing.assert_allclose(header.get_sform(), sheared, atol=1e-6)
    theta = np.deg2rad(10.0)
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    oblique = np.eye(4)
    oblique[:3, :3] = rotation @ np.diag([1.0, 1.2, 3.0])
    oblique[:3, 3] = [-80.0, -110.0, -60.0]
    save_nifti(data, oblique, tmp_path / "oblique.nii.gz")
    header = nib.load(tmp_path / "oblique.nii.gz").header
    assert int(header["qform_code"]) == 1 and int(header["sform_code"]) == 1
    np.testing.assert_allclose(header.get_qform(), oblique, atol=1e-4)
    np.testing.assert_allclose(header.get_sform(), oblique, atol=1e-4)
