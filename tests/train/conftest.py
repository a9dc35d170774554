"""One tiny shard set (real ICBM152-derived subjects) per session, and tiny pretraining configs on it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from brainfm.config import DataConfig, load_config
    from brainfm.data.synthetic import SplitPlan, synthesize_cohort
    from brainfm.data.writer import build_shards

    root = tmp_path_factory.mktemp("train-data")
    manifest = synthesize_cohort(root / "cohort", {"": SplitPlan(n_healthy=6)}, seed=0, resolution=2)
    config = load_config(REPO / "configs/data/tiny.yaml", DataConfig)
    config.shards.split_fractions = {"train": 1.0}  # every subject trains: the test needs two shards (two ranks)
    build_shards(manifest, root / "shards", config)
    return root / "shards"


def tiny_config(mode: str, shards: Path, out: Path, **overrides: dict):
    """configs/pretrain/tiny-<mode>.yaml pointed at ``shards`` and ``out``; ``overrides`` per section."""
    from brainfm.config import PretrainConfig, load_config

    config = load_config(REPO / f"configs/pretrain/tiny-{mode}.yaml", PretrainConfig)
    config.data.shard_dir = str(shards)
    config.train.output_dir = str(out)
    for section, values in overrides.items():
        setattr(config, section, dataclasses.replace(getattr(config, section), **values))
    return config
