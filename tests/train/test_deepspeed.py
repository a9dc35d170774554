"""DeepSpeed ZeRO-2 through the Accelerate plugin, 2 CPU processes (gloo), fp32: trains, checkpoints, exports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from brainfm.config import save_config
from tests.train.conftest import REPO, tiny_config
from tests.train.test_loop import _free_port


def test_zero2_two_cpu_processes(tiny_shards: Path, tmp_path: Path) -> None:
    from brainfm.models.vae import BrainVAE

    # One DeepSpeed engine holds one model: the VAE stage runs without the discriminator here.
    config = tiny_config("2d", tiny_shards, tmp_path / "out", vae={"adv_weight": 0.0}, optim={"max_steps": 3},
                         train={"checkpoint_every": 2, "sample_every": 0})
    save_config(config, tmp_path / "config.yaml")
    # NOT ACCELERATE_USE_CPU: it would silently turn the DeepSpeed launch into plain multi-CPU DDP.
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=str(REPO / ".torch_extensions"))
    env.pop("ACCELERATE_USE_CPU", None)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file",
               str(REPO / "configs/deepspeed/zero2.json"), "--num_processes", "2", "--num_machines", "1",
               "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(REPO / "pretrain/vae.py"),
               "--config", str(tmp_path / "config.yaml")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "out" / "vae"
    step3 = run_dir / "checkpoints" / "step-3"
    assert (step3 / "pytorch_model").is_dir()  # a DeepSpeed (ZeRO) checkpoint, not a DDP one
    assert not (step3 / "model.safetensors").exists()
    assert json.loads((step3 / "trainer_state.json").read_text())["world_size"] == 2
    losses = [json.loads(x)["losses"]["generator"] for x in (run_dir / "logs/losses.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and np.all(np.isfinite(losses))
    vae = BrainVAE.from_pretrained(str(run_dir / "vae"))
    assert vae.config.scaling_factor != 1.0
