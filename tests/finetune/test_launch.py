"""``accelerate launch finetune/semi_supervised.py`` with 2 CPU processes (gloo): every head of the curve trains on
both ranks from disjoint samples, one trainer after another in each process, and the curve is written."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]




@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_semi_curve_trains_every_head_on_both_ranks(cohort, model_dir, nifti_manifest,
                                                                 tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "configs/finetune/tiny.yaml").read_text())
    config["data"].update(model=str(model_dir), manifest=str(nifti_manifest(cohort, tmp_path)), test_fraction=0.34)
    config["semi"]["labelled_counts"] = [1]  # the head and its scratch baseline: two trainers in each process
    config["optim"]["max_steps"] = 2
    config["train"].update(checkpoint_every=2, sample_every=0)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), str(REPO / "finetune/semi_supervised.py"), "--config", str(tmp_path / "config.yaml"),
               "--output-dir", str(tmp_path / "semi")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for run in ("head-n1", "scratch-n1"):
        run_dir = tmp_path / "semi" / "runs" / run
        assert json.loads((run_dir / "checkpoints" / "step-2" / "trainer_state.json").read_text())["world_size"] == 2
        keys = [{k for line in (run_dir / "logs" / f"samples-rank{rank}.jsonl").read_text().splitlines()
                 for k in json.loads(line)["keys"]} for rank in (0, 1)]
        assert keys[0] and keys[1] and not keys[0] & keys[1], run
        assert (run_dir / "head" / "diffusion_pytorch_model.safetensors").is_file()
    curve = json.loads((tmp_path / "semi" / "curve.json").read_text())
    assert [(p["n_labelled"], p["method"]) for p in curve["points"]] == [(1, "head"), (1, "scratch")]
