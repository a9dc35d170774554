"""Every shipped fine-tuning config validates, and the schema refuses typos and contradictions."""

from __future__ import annotations

from pathlib import Path

import pytest

from brainfm.config import ConfigError, FinetuneConfig, from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "finetune"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_finetune_configs_validate(path: Path) -> None:
    config = load_config(path, FinetuneConfig)
    assert config.train.keep_checkpoints >= 2
    assert all(isinstance(c, int) or c == "all" for c in config.semi.labelled_counts)


def test_finetune_config_rejects_typos_and_contradictions() -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(FinetuneConfig, {"semi": {"labeled_counts": [1]}})
    with pytest.raises(ConfigError, match=r"labelled_counts\[1\]"):
        from_dict(FinetuneConfig, {"semi": {"labelled_counts": [1, "most"]}})
    with pytest.raises(ConfigError, match="unet_features"):
        from_dict(FinetuneConfig, {"lora": {"enabled": True}})
    with pytest.raises(ConfigError, match="ema_decay"):
        from_dict(FinetuneConfig, {"lora": {"enabled": True}, "head": {"unet_features": True},
                                   "train": {"ema_decay": 0.99}})
    with pytest.raises(ConfigError, match="unknown lesion kinds"):
        from_dict(FinetuneConfig, {"cross": {"train_groups": [["glioma"]]}})
