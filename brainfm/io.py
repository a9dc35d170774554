"""Atomic file output and the one error type for bad user input.

Every artifact brainfm writes goes to a temporary name beside its destination and is renamed only when
complete, so a crash or a bad input never leaves a half-written file that a later step would trust.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


class BrainFMInputError(ValueError):
    """A user input (scan, manifest, shard, model folder) that cannot be used; the message is one line
    that names the file and the problem."""

    def __init__(self, path: str | os.PathLike | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``destination``; rename it over ``destination`` only on success.

    Works for files and directories: whatever the caller creates at the yielded path is moved into place.
    On an exception the temporary is removed and nothing appears at ``destination``.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(destination.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=f".tmp{suffix}", dir=destination.parent)
    os.close(fd)
    os.unlink(tmp_name)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if destination.is_dir() and tmp.is_dir():
            shutil.rmtree(destination)
        os.replace(tmp, destination)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def write_json(path: str | os.PathLike, payload: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=json_default) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def json_default(value: Any) -> Any:
    """``json.dumps`` fallback for numpy scalars/arrays and paths."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike, dtype: Any = None) -> None:
    """Write a NIfTI file atomically with the given affine (qform and sform both set)."""
    import nibabel as nib

    data = np.asarray(array)
    if dtype is not None:
        data = data.astype(dtype)
    image = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
