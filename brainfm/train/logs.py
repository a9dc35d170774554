"""Where a run's messages go, and its per-step JSON-lines logs.

During a run the console shows the progress bar (with the losses) and warnings; INFO lines — ours and
accelerate's, which names every file of every checkpoint (about ten lines per save) — go to the run's log file
``RUN/logs/train.log`` (``train-rank<k>.log`` for the other ranks), whatever the console's verbosity.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from brainfm.io import atomic_path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ROUTED = ("accelerate", "brainfm")  # loggers whose INFO goes to the run's log file only


class _ToConsole(logging.Handler):
    """Hands records at or above its level to the root logger's handlers (the console the application set up)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger().handle(record)


def log_file_name(rank: int) -> str:
    return "train.log" if rank == 0 else f"train-rank{rank}.log"


@contextlib.contextmanager
def run_logging(logs_dir: Path, rank: int) -> Iterator[Path]:
    """Route the ``accelerate`` and ``brainfm`` loggers for the duration of a run; restores them afterwards.

    INFO and above go to the run's log file (appended: a resumed run continues it); the console receives warnings
    only, or every ``brainfm`` record when the application runs at DEBUG (``brainfm -v``).
    """
    logs_dir.mkdir(parents=True, exist_ok=True)
    path = logs_dir / log_file_name(rank)
    verbose = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    saved: list[tuple[logging.Logger, int, bool, list[logging.Handler]]] = []
    for name in ROUTED:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate, list(logger.handlers)))
        console = _ToConsole(logging.DEBUG if verbose and name == "brainfm" else logging.WARNING)
        logger.handlers = [file_handler, console]
        logger.setLevel(file_handler.level)
        logger.propagate = False
    try:
        yield path
    finally:
        for logger, level, propagate, handlers in saved:
            logger.handlers = handlers
            logger.setLevel(level)
            logger.propagate = propagate
        file_handler.close()


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records written after the checkpoint we resume from (the killed run's lost steps)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= last_step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def flat_hparams(config: Any) -> dict[str, Any]:
    """``section.key`` → scalar (lists and dicts as JSON) for the tracker's hyper-parameter table."""
    from brainfm.config import to_dict

    flat: dict[str, Any] = {}
    for section, values in to_dict(config).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, int | float | str | bool) else json.dumps(value)
    return flat


__all__ = ["LOG_FORMAT", "log_file_name", "run_logging", "truncate_jsonl", "flat_hparams"]
