"""Every config of brainfm, in one place: pydantic dataclasses with unknown keys forbidden.

A typo in a config key must fail at start-up, not silently fall back to a default after hours of training. The
schemas are grouped by job (``data``, ``training``, ``anomaly``, ``experiments``; ``networks`` names the
constructors whose arguments a network section holds); ``loader`` reads, merges, path-resolves and validates
config files with one-line errors naming the file and the key path. Import everything from ``brainfm.config``.
The classes stay standard dataclasses for ``dataclasses.replace`` / ``dataclasses.fields``.
"""

from __future__ import annotations

from brainfm.config.anomaly import DeviationConfig, ReconstructionConfig
from brainfm.config.data import MODALITIES, DataConfig, PreprocessConfig, ReaderConfig, ShardConfig
from brainfm.config.experiments import (
    HEALTHY_DATASETS,
    LESION_DATASETS,
    DemoSettings,
    ProtocolConfig,
    ProtocolDataSection,
    ProtocolThresholdSection,
    PublishedResult,
)
from brainfm.config.loader import (
    ConfigError,
    dump_yaml,
    from_dict,
    infer_kind,
    load_config,
    merge,
    parse_overrides,
    read_yaml,
    require_data,
    resolve_paths,
    save_config,
    to_dict,
)
from brainfm.config.networks import (
    CONDITIONER_NETWORK,
    DISCRIMINATOR_NETWORK,
    HEAD_NETWORK,
    UNET_NETWORK,
    VAE_NETWORK,
)
from brainfm.config.studies import StudySettings
from brainfm.config.training import (
    AdaptCalibrationSection,
    AdaptConfig,
    AdaptDataSection,
    CrossSection,
    FinetuneConfig,
    FinetuneDataSection,
    HeadSection,
    LDMStageConfig,
    LoRASection,
    OptimConfig,
    PretrainConfig,
    PretrainDataSection,
    SemiSection,
    TrainConfig,
    VAEStageConfig,
)

# The kinds of config file `brainfm config check` knows, by the name its --kind takes.
CONFIG_KINDS: dict[str, type] = {
    "data": DataConfig,
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "demo": DemoSettings,
    "protocol": ProtocolConfig,
    "adapt": AdaptConfig,
}

__all__ = [
    "AdaptCalibrationSection",
    "AdaptConfig",
    "AdaptDataSection",
    "CONDITIONER_NETWORK",
    "CONFIG_KINDS",
    "DISCRIMINATOR_NETWORK",
    "HEAD_NETWORK",
    "HEALTHY_DATASETS",
    "LESION_DATASETS",
    "MODALITIES",
    "UNET_NETWORK",
    "VAE_NETWORK",
    "ConfigError",
    "CrossSection",
    "DataConfig",
    "DemoSettings",
    "DeviationConfig",
    "FinetuneConfig",
    "FinetuneDataSection",
    "HeadSection",
    "LDMStageConfig",
    "LoRASection",
    "OptimConfig",
    "PreprocessConfig",
    "PretrainConfig",
    "PretrainDataSection",
    "ProtocolConfig",
    "ProtocolDataSection",
    "ProtocolThresholdSection",
    "PublishedResult",
    "ReaderConfig",
    "ReconstructionConfig",
    "SemiSection",
    "ShardConfig",
    "StudySettings",
    "TrainConfig",
    "VAEStageConfig",
    "dump_yaml",
    "from_dict",
    "infer_kind",
    "load_config",
    "merge",
    "parse_overrides",
    "read_yaml",
    "require_data",
    "resolve_paths",
    "save_config",
    "to_dict",
]
