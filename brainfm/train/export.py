"""The LDM stage's model folder: ``RUN/ldm/model``, complete and uncalibrated, written through the pipeline.

``brainfm calibrate --run RUN`` (or ``--model RUN/ldm/model``) turns it into a calibrated model folder. The recipe
and the modalities are those of the shards the run trained on (both read from the shards' ``index.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from brainfm.config import PretrainConfig, to_dict
from brainfm.data.writer import load_index


def export_model_folder(vae: nn.Module, unet: nn.Module, conditioner: nn.Module, noise_scheduler: Any,
                        config: PretrainConfig, run_dir: Path) -> Path:
    """Write ``run_dir/model`` with ``BrainFMPipeline.save_pretrained`` (weights as trained: EMA when enabled)."""
    from brainfm.pipeline import BrainFMPipeline

    index = load_index(config.data.shard_dir)
    pipeline = BrainFMPipeline(
        vae, unet, conditioner, noise_scheduler, recipe=index.get("recipe"),
        modalities=index["modalities"].get(config.data.train_split, []),
        provenance={"source_run": str(run_dir.parent.resolve()), "pretrain_config": to_dict(config)},
    )
    return pipeline.save_pretrained(run_dir / "model")


__all__ = ["export_model_folder"]
