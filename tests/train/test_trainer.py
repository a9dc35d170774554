"""The Trainer: gradient checkpointing really recomputes, the non-finite guard in the step, and where messages go
(console: progress bar and warnings; the run's log file: INFO lines, accelerate's checkpoint lines included)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from brainfm.config import save_config
from brainfm.train.guards import NonFiniteError
from brainfm.train.logs import run_logging
from brainfm.train.pretrain import pretrain
from brainfm.train.tasks import vae as vae_task

REPO = Path(__file__).resolve().parents[2]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "losses.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ gradient checkpointing
def test_vae_3d_with_gradient_checkpointing_recomputes_and_reduces_loss(
        tiny_shards: Path, tmp_path: Path, tiny_config, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``train.gradient_checkpointing`` the encoder and decoder run under ``torch.utils.checkpoint`` and the
    encoder's forward runs twice per step (once more in backward, to recompute the activations it did not keep)."""
    from monai.networks.nets import autoencoderkl

    checkpointed: list[str] = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(function, *args, **kwargs):
        checkpointed.append(type(function).__name__)
        return real_checkpoint(function, *args, **kwargs)

    encoder_passes_with_grad = []
    real_forward = autoencoderkl.Encoder.forward

    def counting_forward(self, x):
        if torch.is_grad_enabled():  # training passes only (the scaling factor and previews run without grad)
            encoder_passes_with_grad.append(1)
        return real_forward(self, x)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    monkeypatch.setattr(autoencoderkl.Encoder, "forward", counting_forward)
    config = tiny_config("3d", tiny_shards, tmp_path, train={"gradient_checkpointing": True})
    run_dir = pretrain("vae", config)
    recon = [r["parts"]["recon"] for r in _records(run_dir)]
    assert len(recon) == 4
    assert np.mean(recon[-2:]) < np.mean(recon[:2]), recon
    assert checkpointed == ["Encoder", "Decoder"] * 4
    assert len(encoder_passes_with_grad) == 2 * 4  # forward + recomputation in backward, every step


# ------------------------------------------------------------------------------------------ non-finite guard
def _nan_at(step_with_nan: int, monkeypatch: pytest.MonkeyPatch) -> None:
    real = vae_task.VAETask.losses

    def poisoned(self, accelerator, batch, step):
        losses, parts = real(self, accelerator, batch, step)
        if step == step_with_nan:
            losses["generator"] = losses["generator"] * float("nan")
        return losses, parts

    monkeypatch.setattr(vae_task.VAETask, "losses", poisoned)


def test_nan_loss_aborts_with_the_step(tiny_shards: Path, tmp_path: Path, tiny_config,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_at(2, monkeypatch)
    config = tiny_config("2d", tiny_shards, tmp_path, vae={"adv_weight": 0.0}, train={"sample_every": 0})
    with pytest.raises(NonFiniteError, match="non-finite generator loss nan at step 2"):
        pretrain("vae", config)


def test_nan_loss_skip_policy_counts_and_keeps_weights(tiny_shards: Path, tmp_path: Path, tiny_config,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_at(2, monkeypatch)
    config = tiny_config("2d", tiny_shards, tmp_path, vae={"adv_weight": 0.0}, optim={"max_steps": 3},
                         train={"sample_every": 0, "checkpoint_every": 1, "keep_checkpoints": 3,
                                "nonfinite_policy": "skip", "max_nonfinite_skips": 1})
    run_dir = pretrain("vae", config)
    records = _records(run_dir)
    assert [r["skipped_updates"] for r in records] == [0, 1, 1]
    state = json.loads((run_dir / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert state["nonfinite_skipped"] == 1 and state["task"] == "pretrain-vae"
    before = load_file(run_dir / "checkpoints" / "step-1" / "model.safetensors")
    skipped = load_file(run_dir / "checkpoints" / "step-2" / "model.safetensors")
    after = load_file(run_dir / "checkpoints" / "step-3" / "model.safetensors")
    assert all(torch.equal(before[k], skipped[k]) for k in before)  # the NaN step changed nothing
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # training went on
    # the skip warning reached the run's log file too
    assert "skipping update at step 2: non-finite generator" in (run_dir / "logs" / "train.log").read_text()


def test_skip_policy_gives_up_after_max_skips(tiny_shards: Path, tmp_path: Path, tiny_config,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_at(1, monkeypatch)
    config = tiny_config("2d", tiny_shards, tmp_path, vae={"adv_weight": 0.0},
                         train={"sample_every": 0, "nonfinite_policy": "skip", "max_nonfinite_skips": 0})
    with pytest.raises(NonFiniteError, match="at step 1: 1 updates skipped"):
        pretrain("vae", config)


# ------------------------------------------------------------------------------------------ messages
def test_run_logging_sends_info_to_the_file_and_only_warnings_to_the_console(tmp_path: Path) -> None:
    console: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            console.append(record)

    root = logging.getLogger()
    collect = Collect(logging.DEBUG)
    root.addHandler(collect)
    accelerate_logger = logging.getLogger("accelerate")
    before = (accelerate_logger.level, accelerate_logger.propagate, list(accelerate_logger.handlers))
    try:
        with run_logging(tmp_path / "logs", rank=0) as path:
            logging.getLogger("accelerate.checkpointing").info("Model weights saved in /x/model.safetensors")
            logging.getLogger("brainfm.train.checkpoint").info("checkpoint step-2 complete")
            logging.getLogger("brainfm.train.guards").warning("skipping update at step 3")
            logging.getLogger("accelerate.accelerator").warning("a warning from accelerate")
        logging.getLogger("accelerate.checkpointing").warning("after the run")
    finally:
        root.removeHandler(collect)
    assert path == tmp_path / "logs" / "train.log"
    text = path.read_text()
    for line in ("INFO accelerate.checkpointing: Model weights saved", "INFO brainfm.train.checkpoint: checkpoint",
                 "WARNING brainfm.train.guards: skipping update", "WARNING accelerate.accelerator: a warning"):
        assert line in text, text
    assert "after the run" not in text  # the routing ends with the run
    assert [(r.name, r.levelname) for r in console] == [
        ("brainfm.train.guards", "WARNING"), ("accelerate.accelerator", "WARNING"),
        ("accelerate.checkpointing", "WARNING")]
    assert (accelerate_logger.level, accelerate_logger.propagate, list(accelerate_logger.handlers)) == before


@pytest.mark.slow
def test_console_of_a_cli_run_has_no_info_lines_and_the_log_file_has_them(tiny_shards: Path, tmp_path: Path,
                                                                          tiny_config) -> None:
    config = tiny_config("2d", tiny_shards, tmp_path, vae={"adv_weight": 0.0},
                         train={"sample_every": 0, "checkpoint_every": 1})
    save_config(config, tmp_path / "config.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "brainfm.cli", "pretrain", "vae", "--config",
                             str(tmp_path / "config.yaml"), "--output-dir", str(tmp_path / "out"), "--max-steps", "2"],
                            cwd=REPO, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    assert "pretrain vae: 100%" in result.stderr  # the progress bar
    assert "pretrain vae: run folder" in result.stdout
    assert "INFO" not in console and "accelerate.checkpointing" not in console, console[-3000:]
    log_text = (tmp_path / "out" / "vae" / "logs" / "train.log").read_text()
    saved_files = [line for line in log_text.splitlines() if " INFO accelerate." in line]
    assert len(saved_files) >= 2 * 4, log_text  # per checkpoint: state folder, model, optimizer, scheduler, RNG...
    assert sum("INFO brainfm.train.checkpoint: checkpoint" in line for line in log_text.splitlines()) == 2
    assert "latent scaling factor" in log_text  # our own INFO lines from the export
