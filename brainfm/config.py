"""Dataclass configs and a YAML loader that rejects unknown keys.

A typo in a config key must fail loudly at start-up rather than silently fall back to a default after hours
of training, so every loader here checks keys against the dataclass fields, recursively, and names the file
and the key path in its error.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or dict that does not match its schema."""


def _convert(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for candidate in non_none:
            try:
                return _convert(value, candidate, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if isinstance(annotation, type) and isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {annotation.__name__}, got {value!r}")
        return from_dict(annotation, value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(args, value, strict=False)))
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, val_type = args if args else (Any, Any)
        return {
            _convert(k, key_type, f"{where}.{k}"): _convert(v, val_type, f"{where}.{k}") for k, v in value.items()
        }
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting keys it does not declare."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-YAML/JSON-friendly dict of a config (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(obj))


def load_config(path: str | Path, cls: type[T]) -> T:
    """Load a YAML file into ``cls``; errors name the file and the offending key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    return from_dict(cls, data, where=str(path))


def save_config(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


# --------------------------------------------------------------------------------------------------------------
# Data: the preprocessing recipe (stored with every shard set and every model) and shard-building settings.
# --------------------------------------------------------------------------------------------------------------

MODALITIES = ("T1", "T2", "FLAIR", "PD", "CT")


@dataclasses.dataclass
class PreprocessConfig:
    """The exact recipe that turns a scan into model input; inference repeats it from the stored copy."""

    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)  # mm, RAS axis order
    shape: tuple[int, int, int] = (96, 112, 96)  # voxels after crop/pad around the brain
    mri_percentiles: tuple[float, float] = (0.5, 99.5)  # clip inside the brain mask, then scale to [0, 1]
    ct_window: tuple[float, float] = (0.0, 80.0)  # Hounsfield window mapped to [0, 1] (brain window)
    mask_threshold: float = 0.5  # for given probabilistic masks
    tissue_priors: tuple[str, ...] = ("gm", "wm")  # template priors brought onto the scan grid
    template_resolution: int = 2  # mm of the nilearn ICBM152 template used for registration/priors

    def __post_init__(self) -> None:
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be positive, got {self.spacing}")
        if any(s < 8 for s in self.shape):
            raise ValueError(f"shape must be at least 8 voxels per axis, got {self.shape}")
        lo, hi = self.mri_percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"mri_percentiles must satisfy 0 <= lo < hi <= 100, got {self.mri_percentiles}")
        if self.ct_window[0] >= self.ct_window[1]:
            raise ValueError(f"ct_window must be (low, high) with low < high, got {self.ct_window}")
        unknown = set(self.tissue_priors) - {"gm", "wm", "csf"}
        if unknown:
            raise ValueError(f"tissue_priors must be among gm, wm, csf; got {sorted(unknown)}")


@dataclasses.dataclass
class ShardConfig:
    max_shard_bytes: int = 256 * 1024 * 1024
    max_samples_per_shard: int = 64
    split_fractions: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1}
    )
    seed: int = 0
    workers: int = 2

    def __post_init__(self) -> None:
        total = sum(self.split_fractions.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must sum to 1, got {total}")
        if self.max_samples_per_shard < 1 or self.max_shard_bytes < 1024:
            raise ValueError("max_samples_per_shard must be >= 1 and max_shard_bytes >= 1024")


@dataclasses.dataclass
class DataConfig:
    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
    shards: ShardConfig = dataclasses.field(default_factory=ShardConfig)
