"""End-to-end tiny pretraining runs on template-derived shards: loss goes down, exports load, logs exist."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from brainfm.train.loop import train
from tests.train.conftest import REPO, tiny_config


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "losses.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def vae_run_2d(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vae2d")
    return train("vae", tiny_config("2d", tiny_shards, out))


def test_vae_2d_reduces_loss_and_exports(vae_run_2d: Path) -> None:
    from brainfm.models.vae import BrainVAE

    records = _records(vae_run_2d)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    recon = [r["parts"]["recon"] for r in records]
    assert np.mean(recon[-2:]) < 0.8 * np.mean(recon[:2]), recon
    assert "discriminator" not in records[1]["losses"] and "discriminator" in records[2]["losses"]  # warm-up 2
    vae = BrainVAE.from_pretrained(str(vae_run_2d / "vae"))
    factor = vae.config.scaling_factor
    assert np.isfinite(factor) and factor > 0 and factor != 1.0
    # the stored factor makes training latents unit-variance (it was computed from them)
    from brainfm.data.reader import make_dataloader

    batch = next(iter(make_dataloader(_shard_dir(vae_run_2d), "train", mode="2d", batch_size=16)))
    z = vae.encode_latent(batch["image"])
    assert 0.5 < float(z.std()) < 2.0
    steps = sorted(p.name for p in (vae_run_2d / "checkpoints").iterdir())
    assert steps == ["step-4", "step-6"]  # keep_checkpoints: 2
    assert (vae_run_2d / "samples" / "step-0000003.png").stat().st_size > 0
    assert list((vae_run_2d / "logs").rglob("events.out.tfevents.*"))
    recipe = json.loads((vae_run_2d / "data_recipe.json").read_text())
    assert recipe["recipe"] and recipe["mode"] == "2d"


def _shard_dir(run_dir: Path) -> str:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["shard_dir"]


def test_ldm_2d_trains_on_the_vae_export(vae_run_2d: Path, tiny_shards: Path) -> None:
    from brainfm.models.conditioning import Conditioner
    from brainfm.models.unet import LatentUNet

    out = vae_run_2d.parent
    config = tiny_config("2d", tiny_shards, out, optim={"max_steps": 8}, train={"checkpoint_every": 8})
    run_dir = train("ldm", config)
    losses = [r["losses"]["denoiser"] for r in _records(run_dir)]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    unet = LatentUNet.from_pretrained(str(run_dir / "unet"))
    conditioner = Conditioner.from_pretrained(str(run_dir / "conditioner"))
    assert unet.config.anatomy_channels == 3  # brain mask + GM + WM priors
    assert unet.config.latent_channels == 2
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(str(run_dir / "scheduler"))
    assert scheduler.config.num_train_timesteps == 100
    context = conditioner(conditioner.tokenize([{"modality": "T1", "age": 50.0}], torch.tensor([0.5])))
    prediction = unet(torch.zeros(1, 2, 20, 24), 10, torch.zeros(1, 3, 40, 48), context)
    assert prediction.shape == (1, 2, 20, 24) and torch.isfinite(prediction).all()
    # RUN/ldm/model: the complete, uncalibrated model folder `brainfm calibrate --run` starts from
    import json

    from brainfm.data.preprocess import recipe_from_dict
    from brainfm.pipeline import BrainFMPipeline

    pipeline = BrainFMPipeline.from_pretrained(run_dir / "model")
    index = json.loads((tiny_shards / "index.json").read_text())
    assert pipeline.recipe == recipe_from_dict(index["recipe"], "index.json") and pipeline.modalities == ("T1",)
    assert pipeline.calibration is None and pipeline.config.provenance["source_run"] == str(out.resolve())
    assert all(torch.equal(v, pipeline.unet.state_dict()[k]) for k, v in unet.state_dict().items())
    assert pipeline.vae.config.scaling_factor == json.loads((vae_run_2d / "vae" / "config.json").read_text())[
        "scaling_factor"]


def test_vae_3d_with_gradient_checkpointing_reduces_loss(tiny_shards: Path, tmp_path: Path) -> None:
    config = tiny_config("3d", tiny_shards, tmp_path, train={"gradient_checkpointing": True})
    run_dir = train("vae", config)
    recon = [r["parts"]["recon"] for r in _records(run_dir)]
    assert len(recon) == 4
    assert np.mean(recon[-2:]) < np.mean(recon[:2]), recon


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_cpu_run_splits_data(tiny_shards: Path, tmp_path: Path) -> None:
    import yaml

    from brainfm.config import save_config

    config = tiny_config("2d", tiny_shards, tmp_path / "out", optim={"max_steps": 3},
                         train={"checkpoint_every": 3, "sample_every": 0}, vae={"adv_warmup_steps": 1})
    save_config(config, tmp_path / "config.yaml")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(_free_port()), str(REPO / "pretrain/vae.py"), "--config", str(tmp_path / "config.yaml")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "out" / "vae"
    state = json.loads((run_dir / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    keys = {}
    for rank in (0, 1):
        lines = [json.loads(x) for x in (run_dir / "logs" / f"samples-rank{rank}.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == [1, 2, 3]
        keys[rank] = {k for x in lines for k in x["keys"]}
        assert len(keys[rank]) == 3 * config.data.batch_size
        assert (run_dir / "checkpoints" / "step-3" / f"data_state_rank{rank}.json").is_file()
    assert not keys[0] & keys[1]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["max_steps"] == 3
