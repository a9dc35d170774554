"""Multi-process training through ``accelerate launch`` on CPU (gloo): 2-process DDP reads disjoint data in both
pretraining stages; DeepSpeed ZeRO-2 trains, checkpoints and exports. Launch flags as checked in the project's
environment notes (``ACCELERATE_USE_CPU=1`` for DDP on CPU, never for DeepSpeed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from brainfm.config import save_config

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _ddp(script: str, config_path: Path, port: int, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), str(REPO / script), "--config", str(config_path), *extra]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=600)


def _rank_keys(run_dir: Path, steps: list[int]) -> dict[int, set[str]]:
    keys = {}
    for rank in (0, 1):
        lines = [json.loads(x) for x in (run_dir / "logs" / f"samples-rank{rank}.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == steps
        keys[rank] = {k for x in lines for k in x["keys"]}
    return keys


@pytest.fixture(scope="module")
def ddp_vae_run(tiny_shards: Path, tiny_config, free_port, tmp_path_factory: pytest.TempPathFactory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    config = tiny_config("2d", tiny_shards, tmp_path / "out", optim={"max_steps": 3},
                         train={"checkpoint_every": 3, "sample_every": 0}, vae={"adv_warmup_steps": 1})
    save_config(config, tmp_path / "config.yaml")
    result = _ddp("pretrain/vae.py", tmp_path / "config.yaml", free_port())
    assert result.returncode == 0, result.stderr[-3000:]
    return config, tmp_path


def test_two_process_cpu_run_splits_data(ddp_vae_run) -> None:
    import yaml

    config, tmp_path = ddp_vae_run
    run_dir = tmp_path / "out" / "vae"
    state = json.loads((run_dir / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    keys = _rank_keys(run_dir, [1, 2, 3])
    for rank in (0, 1):
        assert len(keys[rank]) == 3 * config.data.batch_size
        assert (run_dir / "checkpoints" / "step-3" / f"data_state_rank{rank}.json").is_file()
    assert not keys[0] & keys[1]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["max_steps"] == 3


def test_two_process_ldm_run_on_the_vae_export(ddp_vae_run, free_port) -> None:
    config, tmp_path = ddp_vae_run
    result = _ddp("pretrain/ldm.py", tmp_path / "config.yaml", free_port(), "--max-steps", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "out" / "ldm"
    assert json.loads((run_dir / "checkpoints" / "step-3" / "trainer_state.json").read_text())["world_size"] == 2
    keys = _rank_keys(run_dir, [1, 2, 3])
    assert not keys[0] & keys[1]
    losses = [json.loads(x)["losses"]["denoiser"] for x in (run_dir / "logs/losses.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and np.all(np.isfinite(losses))
    assert (run_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (run_dir / "model" / "model_index.json").is_file()


def test_zero2_two_cpu_processes(tiny_shards: Path, tmp_path: Path, tiny_config, free_port) -> None:
    from brainfm.models.vae import BrainVAE

    # One DeepSpeed engine holds one model: the VAE stage runs without the discriminator here.
    config = tiny_config("2d", tiny_shards, tmp_path / "out", vae={"adv_weight": 0.0}, optim={"max_steps": 3},
                         train={"checkpoint_every": 2, "sample_every": 0})
    save_config(config, tmp_path / "config.yaml")
    # NOT ACCELERATE_USE_CPU: it would silently turn the DeepSpeed launch into plain multi-CPU DDP.
    # DeepSpeed compiles its CPU ops on first use: TORCH_EXTENSIONS_DIR (if set) reuses a compiled cache.
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")))
    env.pop("ACCELERATE_USE_CPU", None)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file",
               str(REPO / "configs/deepspeed/zero2.json"), "--num_processes", "2", "--num_machines", "1",
               "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(REPO / "pretrain/vae.py"),
               "--config", str(tmp_path / "config.yaml")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=600)
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
