"""The two pretraining stages on the shared :class:`~brainfm.train.trainer.Trainer`: ``pretrain("vae", ...)`` then
``pretrain("ldm", ...)`` (which reads the VAE stage's export)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from brainfm.config import PretrainConfig
from brainfm.train.stream import probe_batch
from brainfm.train.tasks.ldm import LDMTask
from brainfm.train.tasks.vae import VAETask
from brainfm.train.trainer import Trainer

Stage = Literal["vae", "ldm"]


def run_dir_for(config: PretrainConfig, stage: Stage) -> Path:
    """A stage's run folder: ``<train.output_dir>/<stage>``."""
    return Path(config.train.output_dir) / stage


def pretrain(stage: Stage, config: PretrainConfig, *, resume: str | None = None) -> Path:
    """Train one stage for ``optim.max_steps`` steps into ``<train.output_dir>/<stage>``; returns that run folder
    holding ``checkpoints/``, ``logs/``, ``config.yaml`` and the exports (``vae/`` for the VAE stage; ``model/``,
    the complete uncalibrated model folder, for the LDM stage)."""
    if stage not in ("vae", "ldm"):
        raise ValueError(f"stage must be 'vae' or 'ldm', got {stage!r}")
    run_dir = run_dir_for(config, stage)
    probe = probe_batch(config)  # read before the trainer seeds: it must not shift the initial weights
    trainer = Trainer(config, run_dir)
    task: VAETask | LDMTask
    if stage == "vae":
        task = VAETask(config, probe)
    else:
        vae_path = Path(config.ldm.vae_path) if config.ldm.vae_path else run_dir_for(config, "vae") / "vae"
        acc = trainer.accelerator
        task = LDMTask(config, probe, vae_path, config.train.seed * 1000 + acc.process_index)
        task.to(acc.device)
    return trainer.fit(task, resume=resume)


__all__ = ["Stage", "pretrain", "run_dir_for"]
