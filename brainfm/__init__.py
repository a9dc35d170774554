"""brainfm: a foundation model for unsupervised anomaly detection in brain MRI and CT."""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("brainfm")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+source"

__all__ = ["BrainFMPipeline", "__version__"]


def __getattr__(name: str) -> Any:
    """Import heavy objects (torch, diffusers) on first use, so ``import brainfm`` and ``brainfm --help`` stay fast."""
    if name == "BrainFMPipeline":
        from brainfm.pipeline import BrainFMPipeline

        return BrainFMPipeline
    raise AttributeError(f"module 'brainfm' has no attribute {name!r}")
