"""The LDM stage's model folder: ``RUN/ldm/model``, complete and uncalibrated, written through the pipeline.

``brainfm calibrate --run RUN`` (or ``--model RUN/ldm/model``) turns it into a calibrated model folder. The recipe
and the modalities are those of the shards the run trained on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from brainfm.config import PretrainConfig, to_dict


def export_model_folder(vae: nn.Module, unet: nn.Module, conditioner: nn.Module, noise_scheduler: Any,
                        config: PretrainConfig, run_dir: Path) -> Path:
    """Write ``run_dir/model`` with ``BrainFMPipeline.save_pretrained`` (weights as trained: EMA when enabled)."""
    from brainfm.data.shards import load_index
    from brainfm.pipeline import BrainFMPipeline

    index = load_index(config.data.shard_dir)
    pipeline = BrainFMPipeline(
        vae, unet, conditioner, noise_scheduler, recipe=index.get("recipe"),
        modalities=trained_modalities(index, Path(config.data.shard_dir), config.data.train_split),
        provenance={"source_run": str(run_dir.parent.resolve()), "pretrain_config": to_dict(config)},
    )
    return pipeline.save_pretrained(run_dir / "model")


def trained_modalities(index: dict[str, Any], shard_dir: Path, split: str) -> list[str]:
    """The training split's modalities from ``index.json``; shards indexed before it recorded them are read
    once for their samples' ``meta.json``."""
    recorded = index.get("modalities")
    if isinstance(recorded, dict):
        recorded = recorded.get(split, recorded)
    if recorded:
        return sorted(str(m).upper() for m in recorded)
    import webdataset as wds

    found = set()
    for shard in index["splits"].get(split, []):
        samples = wds.DataPipeline(wds.SimpleShardList([str(shard_dir / shard["name"])]), wds.tarfile_to_samples())
        found.update(str(json.loads(sample["meta.json"])["modality"]).upper() for sample in samples)
    return sorted(found)


__all__ = ["export_model_folder", "trained_modalities"]
