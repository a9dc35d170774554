"""What training leaves in its run folders: weights through ``save_pretrained`` (safetensors, atomic: the VAE
stage's ``RUN/vae``, a fine-tuned head and its LoRA adapters), the LDM stage's complete, uncalibrated model
folder ``RUN/ldm/model`` (written through :class:`~brainfm.pipeline.BrainFMPipeline`, the one owner of model
folders), and ``data_recipe.json``, the shards' preprocessing recipe and counts (inference must repeat the recipe;
the model folder carries it too).

``brainfm calibrate --run RUN`` (or ``--model RUN/ldm/model``) turns the LDM stage's folder into a calibrated
model folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from brainfm.config import PretrainConfig, to_dict
from brainfm.data.writer import load_index
from brainfm.io import atomic_dir, write_json

MODEL_SUBDIR = "model"


def save_pretrained(model: nn.Module, destination: Path) -> None:
    """``model.save_pretrained`` (safetensors) into a temp folder moved to ``destination`` when complete."""
    with atomic_dir(destination) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)


def export_model_folder(vae: nn.Module, unet: nn.Module, conditioner: nn.Module, noise_scheduler: Any,
                        config: PretrainConfig, run_dir: Path) -> Path:
    """Write ``run_dir/model`` with ``BrainFMPipeline.save_pretrained`` (weights as given: the trainer passes
    the EMA copy). Recipe and modalities are those of the shards the run trained on (their ``index.json``)."""
    from brainfm.pipeline import BrainFMPipeline

    index = load_index(config.data.shard_dir)
    pipeline = BrainFMPipeline(
        vae, unet, conditioner, noise_scheduler, recipe=index.get("recipe"),
        modalities=index["modalities"].get(config.data.train_split, []),
        provenance={"source_run": str(run_dir.parent.resolve()), "pretrain_config": to_dict(config),
                    "training_compute": _training_compute(run_dir.parent)},
    )
    return pipeline.save_pretrained(run_dir / MODEL_SUBDIR)


def _training_compute(run: Path) -> dict[str, Any]:
    """Each stage's compute record (totals and hardware), carried by the model folder into its card."""
    from brainfm.train.compute import read_compute, summary

    records = {stage: read_compute(run / stage) for stage in ("vae", "ldm")}
    return {stage: summary(record) for stage, record in records.items() if record is not None}


def copy_data_recipe(config: PretrainConfig, run_dir: Path) -> None:
    """The preprocessing recipe the model was trained on, copied from the shard index: inference must repeat it."""
    index = load_index(config.data.shard_dir)
    write_json(run_dir / "data_recipe.json", {
        "recipe": index.get("recipe"), "grid_shape": index.get("grid_shape"),
        "anatomy_channels": index.get("anatomy_channels"), "shards_config": index.get("shards_config"),
        "counts": index.get("counts"), "mode": config.data.mode,
    })


__all__ = ["MODEL_SUBDIR", "copy_data_recipe", "export_model_folder", "save_pretrained"]
