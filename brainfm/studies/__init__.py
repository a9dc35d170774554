"""Studies that are too large for the default demo and write their own tables (``brainfm study``): the
conditioning-priors and normalisation comparison, the inference-side ablation with one report on the held-out
anatomy, and pooled vs per-contrast models. Each builds on the demo's stage functions; see
:mod:`brainfm.studies.common` for the validation-only selection protocol they share."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from brainfm.config import DemoSettings, StudySettings, to_dict
from brainfm.io import BrainFMInputError, write_json

STUDIES = ("priors", "ablate", "pooling")
SETTINGS_FILE = "study_settings.json"
RUN_FILE = "run.json"


def run_study(name: str, out: str | Path, study: StudySettings, demo: DemoSettings) -> dict[str, Any]:
    """Run (or resume) study ``name`` in ``out``; a study folder made with other settings is refused."""
    if name not in STUDIES:
        raise BrainFMInputError(None, f"unknown study {name!r}; choose from {', '.join(STUDIES)}")
    out = Path(out)
    stored = out / name / SETTINGS_FILE
    recorded = json.loads(json.dumps({"study": to_dict(study), "demo": to_dict(demo)}))
    if stored.is_file() and json.loads(stored.read_bytes()) != recorded:
        raise BrainFMInputError(out / name, "this study folder was made with other settings; choose a new --out")
    stored.parent.mkdir(parents=True, exist_ok=True)
    write_json(stored, recorded)
    started, load = time.perf_counter(), _load()
    if name == "priors":
        from brainfm.studies.priors import run_priors as runner
    elif name == "ablate":
        from brainfm.studies.ablate import run_ablation as runner
    else:
        from brainfm.studies.pooling import run_pooling as runner
    result = runner(out, study, demo)
    # this invocation's wall time and the machine's load (a resumed study counts only what it ran)
    write_json(out / name / RUN_FILE, {"seconds": round(time.perf_counter() - started, 1), "cpu_count": os.cpu_count(),
                                       "load_average": {"start": load, "end": _load()}})
    return result


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


__all__ = ["RUN_FILE", "SETTINGS_FILE", "STUDIES", "run_study"]
