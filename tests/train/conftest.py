"""One tiny shard set (real ICBM152-derived subjects) per session, tiny pretraining configs on it, a free port."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable
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


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., object]:
    """``tiny_config(mode, shards, out, **overrides)``: configs/pretrain/tiny-<mode>.yaml pointed at ``shards`` and
    ``out``; ``overrides`` maps a section name to the fields replaced in it."""
    from brainfm.config import PretrainConfig, load_config

    def make(mode: str, shards: Path, out: Path, **overrides: dict) -> PretrainConfig:
        config = load_config(REPO / f"configs/pretrain/tiny-{mode}.yaml", PretrainConfig)
        config.data.shard_dir = str(shards)
        config.train.output_dir = str(out)
        for section, values in overrides.items():
            setattr(config, section, dataclasses.replace(getattr(config, section), **values))
        return config

    return make


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """``free_port()``: a TCP port free on 127.0.0.1 right now (for a launcher's rendezvous)."""

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick
