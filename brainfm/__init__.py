"""brainfm: a foundation model for unsupervised anomaly detection in brain MRI and CT."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("brainfm")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
