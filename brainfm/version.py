"""The installed package version, in a module of its own so any module can read it without importing
``brainfm/__init__`` (whose lazy ``BrainFMPipeline`` would otherwise make an import cycle)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("brainfm")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
