"""brainfm: a foundation model for unsupervised anomaly detection in brain MRI and CT."""

from typing import Any

from brainfm.version import __version__

__all__ = ["BrainFMPipeline", "__version__"]


def __getattr__(name: str) -> Any:
    """Import heavy objects (torch, diffusers) on first use, so ``import brainfm`` and ``brainfm --help`` stay fast."""
    if name == "BrainFMPipeline":
        from brainfm.pipeline import BrainFMPipeline

        return BrainFMPipeline
    raise AttributeError(f"module 'brainfm' has no attribute {name!r}")
