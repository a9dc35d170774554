"""Model-only outputs of the pretraining stages: safetensors ``save_pretrained`` folders written atomically, and
the preprocessing recipe the model was trained on (inference must repeat it)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from brainfm.config import PretrainConfig
from brainfm.io import atomic_path, write_json


def save_pretrained(model: nn.Module, destination: Path) -> None:
    """``model.save_pretrained`` (safetensors) into a temp folder renamed to ``destination`` when complete."""
    with atomic_path(destination) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)


def copy_data_recipe(config: PretrainConfig, run_dir: Path) -> None:
    """The preprocessing recipe the model was trained on, copied from the shard index: inference must repeat it."""
    from brainfm.data.writer import load_index

    index = load_index(config.data.shard_dir)
    write_json(run_dir / "data_recipe.json", {
        "recipe": index.get("recipe"), "grid_shape": index.get("grid_shape"),
        "anatomy_channels": index.get("anatomy_channels"), "shards_config": index.get("shards_config"),
        "counts": index.get("counts"), "mode": config.data.mode,
    })


__all__ = ["copy_data_recipe", "save_pretrained"]
