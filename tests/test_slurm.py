"""scripts/slurm_multinode.sh under a faked SLURM allocation of 2 nodes x 4 GPUs: the dry run prints one launch
command per node, and the real path (srun faked as "run the command once per node with its SLURM_NODEID") runs
exactly those commands."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_multinode.sh"

FAKE_SCONTROL = """#!{python}
import re, sys
# `scontrol show hostnames LIST` for the forms used here: "a,b" and "prefix[07-08]"
assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
for part in sys.argv[3].split(","):
    m = re.fullmatch(r"(.*)\\[(\\d+)-(\\d+)\\]", part)
    if m is None:
        print(part)
        continue
    width = len(m.group(2))
    for i in range(int(m.group(2)), int(m.group(3)) + 1):
        print(f"{{m.group(1)}}{{i:0{{width}}d}}")
"""

FAKE_SRUN = """#!/usr/bin/env bash
# one task per node, in order; srun's own options are dropped
while [[ "$1" == --* ]]; do shift; done
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node "$@" || exit $?
done
"""

FAKE_PYTHON = """#!{python}
import json, os, sys
print(json.dumps({{"argv": sys.argv[1:], "omp": os.environ.get("OMP_NUM_THREADS"),
                  "offline": os.environ.get("HF_HUB_OFFLINE"), "cwd": os.getcwd()}}))
"""


@pytest.fixture
def fake_slurm(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN), ("python", FAKE_PYTHON)):
        path = bin_dir / name
        path.write_text(text.format(python=sys.executable) if "{python}" in text else text)
        path.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GPUS_PER_NODE", "MAIN_PORT"))}
    env.pop("OMP_NUM_THREADS", None)
    env.update({
        "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "123456",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "PYTHON": str(bin_dir / "python"),
    })
    return env


EXTRA = ["--set", "train.output_dir=/shared/runs/a b", "--max-steps", "10"]


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=60)


def _expected(rank: int, python: str) -> list[str]:
    return [
        python, "-m", "accelerate.commands.launch",
        "--config_file", "configs/accelerate/multi-node-zero2.yaml",
        "--num_machines", "2", "--num_processes", "8",
        "--main_process_ip", "gpu07", "--main_process_port", str(20000 + 123456 % 20000),
        "--rdzv_backend", "static", "--machine_rank", str(rank),
        "pretrain/ldm.py", "--config", "configs/pretrain/large-3d.yaml", "--resume", "auto", *EXTRA,
    ]


def test_dry_run_prints_each_nodes_launch_command(fake_slurm: dict[str, str]) -> None:
    result = _run(fake_slurm, "--dry-run", "ldm", "configs/pretrain/large-3d.yaml", *EXTRA)
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.strip().splitlines()
    assert header.startswith("# 2 node(s) x 4 process(es), main process gpu07:23456")
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        host, command = line.split(":", 1)
        assert host == f"gpu0{7 + rank}"
        assert shlex.split(command) == _expected(rank, fake_slurm["PYTHON"])


def test_real_launch_runs_the_dry_run_commands(fake_slurm: dict[str, str]) -> None:
    result = _run(fake_slurm, "ldm", "configs/pretrain/large-3d.yaml", *EXTRA)
    assert result.returncode == 0, result.stderr
    launched = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [entry["argv"] for entry in launched] == [_expected(r, fake_slurm["PYTHON"])[1:] for r in (0, 1)]
    assert all(e["omp"] == "8" and e["offline"] == "1" for e in launched)
    assert {e["cwd"] for e in launched} == {fake_slurm["SLURM_SUBMIT_DIR"]}


def test_gpus_per_node_from_typed_slurm_variable(fake_slurm: dict[str, str]) -> None:
    del fake_slurm["SLURM_GPUS_ON_NODE"]
    fake_slurm["SLURM_GPUS_PER_NODE"] = "h100:4"
    result = _run(fake_slurm, "--dry-run", "vae", "C.yaml")
    assert result.returncode == 0, result.stderr
    assert all("--num_processes 8" in line for line in result.stdout.splitlines()[1:])


@pytest.mark.parametrize(("change", "message"), [
    ({"SLURM_JOB_NODELIST": None}, "SLURM_JOB_NODELIST is not set"),
    ({"SLURM_NNODES": "3"}, "names 2 host(s) but SLURM_NNODES=3"),
])
def test_inconsistent_slurm_environment_is_one_error_line(
    fake_slurm: dict[str, str], change: dict[str, str | None], message: str
) -> None:
    for key, value in change.items():
        if value is None:
            del fake_slurm[key]
        else:
            fake_slurm[key] = value
    result = _run(fake_slurm, "--dry-run", "ldm", "C.yaml")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slurm_multinode.sh: error: ") and message in lines[0]
