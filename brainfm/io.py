"""File output that never loses a user's file, and the one error type for bad user input.

Every artifact brainfm writes goes to a temporary name beside its destination and is moved into place only when
complete, so a crash or a bad input never leaves a half-written file that a later step would trust.

The ownership rule: brainfm never deletes or overwrites a file it did not create. Each folder brainfm writes into
carries a small manifest (``.brainfm-files.json``) listing the files brainfm put there. Writing into a folder is
allowed when the folder is new or empty, or (for the listed files only) when brainfm made them earlier; a file
that exists and is not listed is never replaced, and the command refuses with one line before doing any work.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_NAME = ".brainfm-files.json"
QFORM_TOLERANCE_MM = 1e-3  # a qform whose voxel corners land further than this from the sform's is not written


class BrainFMInputError(ValueError):
    """A user input (scan, manifest, shard, model folder) that cannot be used; the message is one line
    that names the file and the problem."""

    def __init__(self, path: str | os.PathLike | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)


# ------------------------------------------------------------------------------------------------ ownership
def owned_files(folder: str | os.PathLike) -> set[str]:
    """Relative paths (POSIX) that brainfm wrote into ``folder``, from its manifest; empty when there is none."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return set()
    try:
        listed = json.loads(path.read_bytes()).get("files", [])
    except (OSError, ValueError, AttributeError) as exc:
        raise BrainFMInputError(path, f"unreadable brainfm file manifest ({exc}); leaving the folder alone") from exc
    return {str(name) for name in listed}


def _write_manifest(folder: Path, files: Iterable[str]) -> None:
    with atomic_path(folder / MANIFEST_NAME) as tmp:
        tmp.write_text(json.dumps({"format": "brainfm-files/1", "files": sorted(set(files))}, indent=1) + "\n")


def _relative_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.name != MANIFEST_NAME)


def _check_parent_writable(folder: Path) -> None:
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise BrainFMInputError(existing, "is a file, not a folder; choose another output folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BrainFMInputError(existing, "output folder is not writable")


def check_output_dir(folder: str | os.PathLike, names: Iterable[str] | None = None, *,
                     inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Refuse, in one line and before any work, an output that would lose a user's file.

    ``names=None``: ``folder`` receives a whole artifact (model folder, release, report); it must be new, empty,
    or a folder brainfm wrote earlier. ``names``: only these files are written into ``folder`` (which may hold
    anything else); each must be new or one brainfm wrote there. No output may be one of ``inputs``.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise BrainFMInputError(folder, "exists and is not a folder; choose another output folder")
    _check_parent_writable(folder)
    if not folder.is_dir():
        return folder
    owned = owned_files(folder)
    if names is None:
        if any(folder.iterdir()) and not (folder / MANIFEST_NAME).is_file():
            raise BrainFMInputError(folder, "folder exists, is not empty and was not written by brainfm; "
                                            "choose a new or empty folder (nothing was changed)")
        return folder
    protected = {Path(p).resolve() for p in inputs if p is not None}
    for name in names:
        target = folder / name
        if target.resolve() in protected:
            raise BrainFMInputError(target, "output would overwrite an input of this command; choose another "
                                            "output folder")
        if (target.exists() or target.is_symlink()) and Path(name).as_posix() not in owned:
            raise BrainFMInputError(target, "exists and was not written by brainfm; refusing to overwrite it "
                                            "(choose another output folder)")
    return folder


# ------------------------------------------------------------------------------------------------ writers
@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary FILE path beside ``destination``; rename it over ``destination`` only on success.

    For folders use :func:`atomic_dir`, which never deletes what brainfm did not write. On an exception the
    temporary is removed and ``destination`` is untouched.
    """
    destination = Path(destination)
    if destination.is_dir():
        raise BrainFMInputError(destination, "is a folder; refusing to replace it with a file")
    destination.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(destination.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=f".tmp{suffix}", dir=destination.parent)
    os.close(fd)
    os.unlink(tmp_name)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.is_dir():
            raise BrainFMInputError(destination, "atomic_path writes files; use atomic_dir for folders")
        os.replace(tmp, destination)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``destination``; move its content into place only on success.

    ``destination`` new or empty: the temporary folder is renamed onto it (one atomic step). ``destination``
    written by brainfm earlier: the files brainfm listed there are replaced by the new content once it is
    complete; every other file survives, and a new file that would replace one of them is refused. Any other
    non-empty folder is refused before the body runs.
    """
    destination = Path(destination)
    check_output_dir(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent))
    try:
        yield tmp
        _commit_dir(tmp, destination)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _commit_dir(tmp: Path, destination: Path) -> None:
    new_files = _relative_files(tmp)
    if not destination.exists() or (destination.is_dir() and not any(destination.iterdir())):
        _write_manifest(tmp, new_files)
        os.replace(tmp, destination)
        return
    check_output_dir(destination)  # still ours? (another process may have written into it meanwhile)
    owned = owned_files(destination)
    for name in new_files:
        target = destination / name
        for parent in [*reversed(Path(name).parents)][1:]:
            if (destination / parent).exists() and not (destination / parent).is_dir():
                raise BrainFMInputError(destination / parent, "is a file not written by brainfm; refusing to "
                                                              "replace it with a folder")
        if (target.exists() or target.is_symlink()) and name not in owned:
            raise BrainFMInputError(target, "exists and was not written by brainfm; refusing to overwrite it "
                                            "(nothing was changed)")
    trash = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".old", dir=destination.parent))
    moved_out: list[str] = []
    moved_in: list[str] = []
    try:
        for name in sorted(owned):
            source = destination / name
            if source.is_file() or source.is_symlink():
                (trash / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, trash / name)
                moved_out.append(name)
        for name in new_files:
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, destination / name)
            moved_in.append(name)
        _write_manifest(destination, new_files)
    except BaseException:
        for name in moved_in:  # put the folder back as it was
            (destination / name).unlink(missing_ok=True)
        for name in moved_out:
            os.replace(trash / name, destination / name)
        raise
    finally:
        _remove_empty_dirs(destination, {str(Path(n).parent) for n in moved_out})
        shutil.rmtree(trash, ignore_errors=True)


def _remove_empty_dirs(root: Path, relative_dirs: Iterable[str]) -> None:
    """Folders that held only brainfm's replaced files (and are empty now) go; anything with content stays."""
    for relative in sorted(relative_dirs, key=lambda d: -len(Path(d).parts)):
        path = root / relative
        while path != root and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
            path = path.parent


def commit_files(folder: str | os.PathLike, writers: Mapping[str, Callable[[Path], None]], *,
                 inputs: Iterable[str | os.PathLike | None] = ()) -> dict[str, Path]:
    """Write several files into ``folder`` all together or not at all (a hidden staging folder, then renames),
    under the ownership rule of :func:`check_output_dir`; the folder's manifest then lists them."""
    folder = Path(folder)
    inputs = list(inputs)
    check_output_dir(folder, writers, inputs=inputs)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".brainfm-staging-", dir=folder))
    moved: list[Path] = []
    try:
        for name, write in writers.items():
            write(staging / name)
        check_output_dir(folder, writers, inputs=inputs)
        for name in writers:
            target = folder / name
            os.replace(staging / name, target)
            moved.append(target)
        _write_manifest(folder, owned_files(folder) | {Path(n).as_posix() for n in writers})
    except BaseException:
        for target in moved:
            target.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {name: folder / name for name in writers}


def write_json(path: str | os.PathLike, payload: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=json_default) + "\n", encoding="utf-8")


def write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 whatever the locale: reports and tables carry "±", "→" and "—", which an ASCII or Latin-1 locale's
    default encoding cannot write."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def json_default(value: Any) -> Any:
    """``json.dumps`` fallback for numpy scalars/arrays and paths."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ------------------------------------------------------------------------------------------------ NIfTI
def qform_matches(image: Any, affine: np.ndarray, tolerance_mm: float = QFORM_TOLERANCE_MM) -> bool:
    """Does the header's qform (rotation + zooms + offset, no shear) put every grid corner within
    ``tolerance_mm`` of where ``affine`` puts it?"""
    qform = np.asarray(image.get_qform(), dtype=np.float64)
    shape = np.asarray(image.shape[:3], dtype=np.float64) - 1.0
    corners = np.array([[x, y, z, 1.0] for x in (0, shape[0]) for y in (0, shape[1]) for z in (0, shape[2])])
    return float(np.abs(corners @ qform.T - corners @ np.asarray(affine, np.float64).T).max()) <= tolerance_mm


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike, dtype: Any = None) -> None:
    """Write a NIfTI file atomically: the sform holds ``affine`` exactly; the qform holds it too when it can
    (no shear), else its code is 0 so that viewers reading the qform first do not misplace the scan."""
    import nibabel as nib

    data = np.asarray(array)
    if dtype is not None:
        data = data.astype(dtype)
    affine = np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    if not qform_matches(image, affine):
        image.set_qform(None, code=0)
    image.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
