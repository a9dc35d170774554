"""bf16 mixed precision end to end on CPU (the tiny VAE and LDM train, losses finite and close to fp32, exports
fp32), and fp16 refused at start-up with one line instead of a silent fp32 run (accelerate) or a late error
(DeepSpeed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from brainfm.cli import main
from brainfm.config import ConfigError, save_config
from brainfm.train.pretrain import pretrain
from brainfm.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
BF16_TOLERANCE = 0.05  # relative, per step: bf16 keeps 8 bits of mantissa (~0.4 % per rounding), a few steps drift


def _losses(run_dir: Path) -> list[dict[str, float]]:
    lines = (run_dir / "logs" / "losses.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["losses"] for line in lines]


def _dtypes(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as handle:
        return {str(handle.get_slice(k).get_dtype()) for k in handle.keys()}


BOTH_STAGES = ("import sys; from brainfm.config import PretrainConfig, load_config; "
               "from brainfm.train.pretrain import pretrain; config = load_config(sys.argv[1], PretrainConfig); "
               "pretrain('vae', config); pretrain('ldm', config)")


@pytest.fixture(scope="module")
def runs(tiny_shards: Path, tiny_config, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny 2D VAE (discriminator from step 3) and LDM, 4 steps each, in fp32 (here) and in bf16 (in a fresh
    process: accelerate fixes a process's precision with its first Accelerator)."""
    out = {}
    for precision in ("no", "bf16"):
        root = tmp_path_factory.mktemp(f"precision-{precision}")
        config = tiny_config("2d", tiny_shards, root, optim={"max_steps": 4},
                             train={"mixed_precision": precision, "sample_every": 0, "checkpoint_every": 4})
        if precision == "no":
            pretrain("vae", config)
            pretrain("ldm", config)
        else:
            save_config(config, root / "config.yaml")
            env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
            done = subprocess.run([sys.executable, "-c", BOTH_STAGES, str(root / "config.yaml")], env=env,
                                  capture_output=True, encoding="utf-8", errors="replace", timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
        out[f"vae-{precision}"], out[f"ldm-{precision}"] = root / "vae", root / "ldm"
    return out


@pytest.mark.parametrize("stage", ["vae", "ldm"])
def test_bf16_trains_close_to_fp32_and_exports_fp32(runs, stage) -> None:
    full, half = _losses(runs[f"{stage}-no"]), _losses(runs[f"{stage}-bf16"])
    assert len(half) == len(full) == 4
    for ours, reference in zip(half, full, strict=True):
        assert ours.keys() == reference.keys()
        for name, value in ours.items():
            assert np.isfinite(value) and abs(value - reference[name]) <= BF16_TOLERANCE * abs(reference[name]), (
                name, half, full)
    print(stage, "fp32", full, "bf16", half)
    assert half != full  # bf16 really ran: the losses are not the fp32 ones
    export = runs[f"{stage}-bf16"] / ("vae" if stage == "vae" else "model/unet")
    assert _dtypes(export / "diffusion_pytorch_model.safetensors") == {"F32"}


def test_fp16_on_cpu_is_refused_at_start_up(tiny_shards, tiny_config, tmp_path, capsys) -> None:
    config = tiny_config("2d", tiny_shards, tmp_path, train={"mixed_precision": "fp16"})
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        Trainer(config, tmp_path / "run")
    save_config(config, tmp_path / "config.yaml")
    assert main(["pretrain", "vae", "--config", str(tmp_path / "config.yaml")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["brainfm: error: train.mixed_precision: fp16 needs a GPU and this run is on the CPU; use bf16 "
                     "or no"]
    assert not (tmp_path / "run").exists()
