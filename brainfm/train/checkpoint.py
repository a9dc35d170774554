"""Atomic, keep-k training checkpoints and model-only exports.

A checkpoint is ``RUN/checkpoints/step-N/``. It is written into ``step-N.tmp-<token>/`` through
``accelerator.save_state`` (models, optimizers, LR scheduler, grad scaler, EMA, guard, RNG state of every rank),
plus one data-reader state file per rank and the trainer state; a ``COMPLETE`` marker is written LAST and only
then is the folder renamed to ``step-N``. Resume considers only ``step-N`` folders that hold the marker, so a
crash at any point of a write can never produce a checkpoint that resume would pick. Old checkpoints are pruned
only after the new one is complete (unlike accelerate's ``total_limit``, which deletes first).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from brainfm.io import BrainFMInputError

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def is_complete(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MARKER).is_file()


def complete_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint, oldest first; temp and unmarked folders are ignored."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str | None, run_dir: str | os.PathLike) -> Path | None:
    """``None`` → fresh run; ``"auto"`` → newest complete checkpoint if any; a path → that checkpoint, which must
    be complete."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    folder = Path(resume)
    if not folder.is_dir():
        raise BrainFMInputError(folder, "checkpoint folder not found")
    if not is_complete(folder):
        raise BrainFMInputError(folder, f"checkpoint has no {MARKER} marker (interrupted write); not resuming from it")
    return folder


def read_trainer_state(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / TRAINER_STATE
    try:
        return json.loads(path.read_bytes())
    except (OSError, json.JSONDecodeError) as exc:
        raise BrainFMInputError(path, f"unreadable trainer state ({exc})") from exc


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


class CheckpointManager:
    """Writes, prunes and loads checkpoints of one run for every process of an ``accelerate.Accelerator``."""

    def __init__(self, accelerator: Any, run_dir: str | os.PathLike, keep: int) -> None:
        if keep < 2:
            raise ValueError(f"keep must be >= 2, got {keep}")
        self.accelerator = accelerator
        self.run_dir = Path(run_dir)
        self.root = checkpoint_root(run_dir)
        self.keep = keep
        # One token per run start, agreed by all ranks, so every process writes into the same temp folder.
        from accelerate.utils import broadcast_object_list

        token = [f"{os.getpid()}-{int(time.time())}"]
        if accelerator.num_processes > 1:
            broadcast_object_list(token, from_process=0)
        self.token = token[0]

    def save(self, step: int, trainer_state: dict[str, Any], data_state: dict[str, Any] | None) -> Path:
        """Collective: every rank must call it. Returns the final folder ``step-N``."""
        acc = self.accelerator
        final = self.root / f"step-{step}"
        tmp = self.root / f"step-{step}.tmp-{self.token}"
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        # Per-rank data position: accelerate saves custom objects from the main process only.
        _write_synced(tmp / f"data_state_rank{acc.process_index}.json", json.dumps(data_state))
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = dict(trainer_state, step=step, world_size=acc.num_processes)
            _write_synced(tmp / TRAINER_STATE, json.dumps(state, indent=2))
            self._commit(tmp, final, step)
            self.prune()
        acc.wait_for_everyone()
        return final

    def _commit(self, tmp: Path, final: Path, step: int) -> None:
        """Marker last, then the rename: the only two moments at which a checkpoint becomes visible."""
        _fsync_dir(tmp)
        _write_synced(tmp / MARKER, json.dumps({"step": step, "time": time.time()}) + "\n")
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (e.g. after a resume at exactly this step)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        log.info("checkpoint %s complete", final)

    def prune(self) -> None:
        """Keep the newest ``keep`` complete checkpoints; remove temp folders of earlier, crashed writes."""
        complete = complete_checkpoints(self.run_dir)
        for _, folder in complete[: -self.keep]:
            shutil.rmtree(folder, ignore_errors=True)
        for child in self.root.iterdir():
            if ".tmp-" in child.name and not child.name.endswith(self.token):
                shutil.rmtree(child, ignore_errors=True)

    def load(self, folder: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Collective: restore everything ``save`` wrote; returns ``(trainer_state, this rank's data state)``."""
        acc = self.accelerator
        state = read_trainer_state(folder)
        if int(state.get("world_size", 1)) != acc.num_processes:
            raise BrainFMInputError(
                folder,
                f"checkpoint was written by {state.get('world_size')} processes, this run has {acc.num_processes}; "
                "the per-rank data position cannot be mapped",
            )
        acc.load_state(str(folder))
        data_file = folder / f"data_state_rank{acc.process_index}.json"
        try:
            data_state = json.loads(data_file.read_bytes())
        except (OSError, json.JSONDecodeError) as exc:
            raise BrainFMInputError(data_file, f"unreadable data-reader state ({exc})") from exc
        return state, data_state
