"""The README's quick start runs as written: every fenced command of its "Quick start" section, in order, at the
tiny size those commands already use, in a scratch folder holding a copy of ``configs/`` (the commands' relative
paths resolve there as they do from the repository root).

Each ``brainfm`` line's arguments go to ``brainfm.cli:main``, the ``brainfm`` console script's entry point, in this
process: a fresh interpreter per line paid the imports (MONAI, transformers, scipy: ~10 s on a loaded 2-core box)
nine times over. The Python block runs in a fresh interpreter, as a user's script would."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def quick_start_blocks() -> list[tuple[str, str]]:
    """(language, body) of each fenced block between "## Quick start" and the next "## " heading."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(bash|python)\n(.*?)```", section, flags=re.DOTALL)


def test_quick_start_lists_every_stage_once() -> None:
    commands = [shlex.split(line, comments=True) for kind, body in quick_start_blocks() if kind == "bash"
                for line in body.splitlines() if shlex.split(line, comments=True)]
    assert all(c[0] == "brainfm" for c in commands)
    stages = [" ".join(c[1:3]) if c[1] in ("data", "pretrain", "report") else c[1] for c in commands]
    assert stages == ["data synth", "data shards", "pretrain vae", "pretrain ldm", "calibrate", "detect", "evaluate",
                      "report tables", "release"]
    assert [kind for kind, _ in quick_start_blocks()] == ["bash", "python"]


@pytest.mark.slow
def test_readme_quick_start_runs_as_written(tmp_path, monkeypatch) -> None:
    from brainfm.cli import main

    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)  # the commands' relative paths, as from the repository root
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    for kind, body in quick_start_blocks():
        if kind == "python":
            run = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, env=env, capture_output=True,
                                 encoding="utf-8", errors="replace")
            assert run.returncode == 0, run.stderr[-2000:]
            assert "voxels flagged" in run.stdout
            continue
        for line in body.splitlines():
            args = shlex.split(line, comments=True)
            if not args:
                continue
            assert main(args[1:]) == 0, line  # its stderr is in pytest's captured output
    assert (tmp_path / "release" / "model_index.json").is_file()
    assert (tmp_path / "model" / "calibration" / "baselines" / "baselines.json").is_file()
    assert "normative atlas" in (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
