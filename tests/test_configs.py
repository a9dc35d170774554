"""Every shipped config still validates: pretrain → PretrainConfig (and its model kwargs fit the networks),
data → DataConfig, accelerate → keys accelerate knows, deepspeed → valid JSON with a ZeRO section,
protocols → ProtocolConfig whose pretrain config exists and matches."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import yaml

from brainfm.config import ConfigError, DataConfig, PretrainConfig, ProtocolConfig, from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted((CONFIGS / "pretrain").glob("*.yaml")), ids=lambda p: p.name)
def test_pretrain_configs_validate(path: Path) -> None:
    from brainfm.models.conditioning import ConditionEncoder
    from brainfm.models.unet import LatentUNet

    config = load_config(path, PretrainConfig)
    unet_args = set(inspect.signature(LatentUNet.__init__).parameters)
    encoder_args = set(inspect.signature(ConditionEncoder.__init__).parameters)
    assert set(config.ldm.unet) <= unet_args - {"spatial_dims", "latent_channels", "anatomy_channels"}
    assert set(config.ldm.encoder) <= encoder_args
    assert config.ldm.unet.get("cross_attention_dim", 64) == config.ldm.encoder.get("cross_attention_dim", 64)
    assert config.train.keep_checkpoints >= 2


def test_pretrain_config_rejects_typos_and_bad_values() -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(PretrainConfig, {"train": {"ema_decy": 0.9}})
    with pytest.raises(ConfigError, match="keep_checkpoints must be >= 2"):
        from_dict(PretrainConfig, {"train": {"keep_checkpoints": 1}})
    with pytest.raises(ConfigError, match="attention_levels"):
        from_dict(PretrainConfig, {"vae": {"channels": [8, 16], "attention_levels": [False], "norm_num_groups": 8}})
    with pytest.raises(ConfigError, match="not one of"):
        from_dict(PretrainConfig, {"train": {"mixed_precision": "fp8"}})


@pytest.mark.parametrize("path", sorted((CONFIGS / "data").glob("*.yaml")), ids=lambda p: p.name)
def test_data_configs_validate(path: Path) -> None:
    load_config(path, DataConfig)


@pytest.mark.parametrize("path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_use_known_keys(path: Path) -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    data = yaml.safe_load(path.read_text())
    known = set(inspect.signature(ClusterConfig).parameters)
    assert set(data) <= known, set(data) - known
    config = ClusterConfig.from_yaml_file(str(path))  # accelerate's own loader
    assert config.num_processes >= 1
    ds = data.get("deepspeed_config", {})
    if "deepspeed_config_file" in ds:
        assert (CONFIGS.parent / ds["deepspeed_config_file"]).is_file()
        assert "mixed_precision" not in data  # accelerate refuses it next to a DeepSpeed config file


@pytest.mark.parametrize("path", sorted((CONFIGS / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_configs_are_valid(path: Path) -> None:
    data = json.loads(path.read_text())
    assert data["zero_optimization"]["stage"] in (2, 3)
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = DeepSpeedZeroConfig(**data["zero_optimization"])  # DeepSpeed's own (pydantic) schema, strict
    assert int(zero.stage) == data["zero_optimization"]["stage"]
    assert data["train_micro_batch_size_per_gpu"] == "auto"  # filled from the pretrain config at start-up
    assert "fp16" not in data or data["fp16"]["enabled"] in ("auto", False)


PROTOCOLS = sorted((CONFIGS / "protocols").glob("*.yaml"))


def test_there_are_protocols() -> None:
    assert {p.stem for p in PROTOCOLS} >= {"ixi-t2-brats21-2d", "ixi-t1-atlas2-2d", "ixi-t2-mslub-2d",
                                           "ixi-t1-wmh2017-2d"}


@pytest.mark.parametrize("path", PROTOCOLS, ids=lambda p: p.name)
def test_protocol_configs_validate(path: Path) -> None:
    from brainfm.data.datasets import LAYOUTS

    protocol = load_config(path, ProtocolConfig)
    assert protocol.name == path.stem
    assert {protocol.train.dataset, protocol.evaluate.dataset} <= set(LAYOUTS)
    pretrain = load_config(CONFIGS.parent / protocol.pretrain_config, PretrainConfig)
    assert pretrain.data.mode == protocol.mode
    assert all(s % 8 == 0 for s in protocol.preprocess.shape[: 2 if protocol.mode == "2d" else 3])
    assert protocol.published, "a protocol lists the published numbers it is compared with"
    assert all(r.threshold in ("greedy_dice_lesion_val", "healthy_fpr", "best_on_test") for r in protocol.published)


def test_protocol_config_rejects_bad_protocols() -> None:
    base = {"name": "p", "description": "d", "mode": "2d", "pretrain_config": "configs/pretrain/tiny-2d.yaml",
            "preprocess": {"spacing": [2.0, 2.0, 2.0], "shape": [96, 96, 80]}, "threshold": {},
            "train": {"dataset": "ixi", "manifest": "a.csv", "modality": "T2"},
            "evaluate": {"dataset": "brats2021", "manifest": "b.csv", "modality": "T2"}}
    assert from_dict(ProtocolConfig, base).threshold.reported == ("healthy_fpr", "greedy_dice_lesion_val")
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(ProtocolConfig, {**base, "thresholds": {}})
    with pytest.raises(ConfigError, match="differ"):
        from_dict(ProtocolConfig, {**base, "evaluate": {**base["evaluate"], "modality": "T1"}})
    with pytest.raises(ConfigError, match="healthy cohort"):
        from_dict(ProtocolConfig, {**base, "train": {**base["train"], "dataset": "brats2021"}})
    with pytest.raises(ConfigError, match="not one of"):
        from_dict(ProtocolConfig, {**base, "train": {**base["train"], "dataset": "adni"}})
    with pytest.raises(ConfigError, match="percentages"):
        from_dict(ProtocolConfig, {**base, "published": [{"method": "m", "dice": 0.45, "auprc": 145.0,
                                                          "threshold": "greedy_dice_lesion_val", "source": "s"}]})
    with pytest.raises(ConfigError, match="not one of"):
        from_dict(ProtocolConfig, {**base, "threshold": {"reported": ["oracle"]}})
    with pytest.raises(ConfigError, match="lesion_val_fraction"):
        from_dict(ProtocolConfig, {**base, "threshold": {"lesion_val_fraction": 1.0}})
