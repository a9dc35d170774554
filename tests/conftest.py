"""Shared fixtures: offline hub, deterministic CPU torch, and real template-derived data."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mni_t1_2mm():
    """The real ICBM152 2009a T1 template at 2 mm (nilearn ships it; no download)."""
    from nilearn.datasets import load_mni152_template

    return load_mni152_template(resolution=2)


@pytest.fixture(autouse=True)
def _seed_everything():
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    yield
