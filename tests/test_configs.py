"""Configs: every shipped file validates and its networks build; the loader's rules (unknown keys, strict numbers,
e-notation, one-line errors with file and key, paths relative to the file, network arguments from constructor
signatures); published protocols; accelerate and deepspeed files use keys their tools know."""

from __future__ import annotations

import dataclasses
import inspect
import json
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from brainfm.config import (
    CONDITIONER_NETWORK,
    CONFIG_KINDS,
    DISCRIMINATOR_NETWORK,
    HEAD_NETWORK,
    UNET_NETWORK,
    VAE_NETWORK,
    ConfigError,
    DataConfig,
    FinetuneConfig,
    PretrainConfig,
    ProtocolConfig,
    TrainConfig,
    from_dict,
    infer_kind,
    load_config,
    merge,
    parse_overrides,
    read_yaml,
    require_data,
    save_config,
    to_dict,
)
from brainfm.config.loader import NetworkArgs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FOLDERS = {"data": "data", "pretrain": "pretrain", "finetune": "finetune", "protocol": "protocols", "adapt": "adapt"}
SHIPPED = [
    (kind, path) for kind, folder in FOLDERS.items() for path in sorted((CONFIGS / folder).glob("*.yaml"))
]
NETWORKS = (VAE_NETWORK, DISCRIMINATOR_NETWORK, UNET_NETWORK, CONDITIONER_NETWORK, HEAD_NETWORK)


def _write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _error(call, *args) -> str:
    with pytest.raises(ConfigError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------ shipped files
@pytest.mark.parametrize(("kind", "path"), SHIPPED, ids=lambda x: x if isinstance(x, str) else x.name)
def test_shipped_configs_validate_and_their_kind_is_inferred(kind: str, path: Path) -> None:
    config = load_config(path, CONFIG_KINDS[kind])
    assert infer_kind(read_yaml(path), CONFIG_KINDS, str(path)) == kind
    # the printed form is a fixed point: loading it again gives the same config
    again = from_dict(CONFIG_KINDS[kind], to_dict(config))
    assert again == config


@pytest.mark.parametrize("path", sorted((CONFIGS / "pretrain").glob("*.yaml")), ids=lambda p: p.name)
def test_pretrain_networks_build_from_their_sections(path: Path) -> None:
    from brainfm.models.conditioning import Conditioner
    from brainfm.models.unet import LatentUNet
    from brainfm.models.vae import BrainVAE, make_discriminator

    config = load_config(path, PretrainConfig)
    dims = config.spatial_dims
    with torch.device("meta"):  # the real constructors, without allocating large-3d's weights
        vae = BrainVAE(spatial_dims=dims, in_channels=1, out_channels=1, **dict(config.vae.network))
        make_discriminator(dims, 1, **dict(config.vae.discriminator))
        LatentUNet(
            spatial_dims=dims,
            latent_channels=vae.config.latent_channels,
            anatomy_channels=3,
            prediction_type=config.ldm.prediction_type,
            **dict(config.ldm.unet),
        )
        Conditioner(**dict(config.ldm.conditioner))
    assert vae.config.channels == list(config.vae.network.channels)
    assert config.train.keep_checkpoints >= 2


@pytest.mark.parametrize("path", sorted((CONFIGS / "finetune").glob("*.yaml")), ids=lambda p: p.name)
def test_finetune_heads_build_from_their_sections(path: Path) -> None:
    from brainfm.finetune.task import make_head

    config = load_config(path, FinetuneConfig)
    head = make_head(config, 2, ("tumour", "ms"))
    assert list(head.config.channels) == list(config.head.network.channels)
    assert head.config.disease_mode == config.head.network.disease_mode


def test_paths_in_shipped_configs_resolve_to_the_repository_folders_the_readme_names() -> None:
    repo = CONFIGS.parent
    tiny = load_config(CONFIGS / "pretrain/tiny-2d.yaml", PretrainConfig)
    assert Path(tiny.data.shard_dir) == repo / "shards/tiny"  # README: "reads shards/tiny"
    assert Path(tiny.train.output_dir) == repo / "runs/tiny-2d"
    semi = load_config(CONFIGS / "finetune/semi-2d.yaml", FinetuneConfig)
    assert Path(semi.data.model) == repo / "demo_out/model"
    assert Path(semi.data.manifest) == repo / "demo_out/cohort/manifest.csv"
    base = load_config(CONFIGS / "pretrain/base-2d.yaml", PretrainConfig)
    assert base.data.shard_dir == "/data/brainfm/shards-1mm"  # absolute paths stay


# ------------------------------------------------------------------------------------------------ loader rules
def test_unknown_keys_are_named_with_the_file_key_path_and_allowed_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, "data: {shard_dir: s}\ntrain: {ema_decy: 0.9, seed: 1}\n")
    message = _error(load_config, path, PretrainConfig)
    assert message.startswith(f"{path}: train: unknown key(s) ['ema_decy']; allowed: [")
    assert "'ema_decay'" in message and "'seed'" in message
    top = _error(from_dict, DataConfig, {"preprocess": {}, "sharding": {}})
    assert top.startswith("config: unknown key(s) ['sharding']; allowed: ['preprocess', 'reader', 'shards']")


def test_yaml_e_notation_loads_as_floats(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "data: {shard_dir: s}\noptim: {lr: 3e-3}\nvae: {kl_weight: 1e-6, perceptual_weight: 5E-4,"
        " perceptual_weights_path: w.safetensors}\n",
    )
    config = load_config(path, PretrainConfig)
    assert config.optim.lr == 0.003 and isinstance(config.optim.lr, float)
    assert config.vae.kl_weight == 1e-6 and config.vae.perceptual_weight == 5e-4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'optim: {lr: "3e-3"}',
            "optim.lr: expected a valid number, got '3e-3'",
        ),  # a quoted string stays a string
        ('data: {shard_dir: s, batch_size: "8"}', "data.batch_size: expected a valid integer, got '8'"),
        ("data: {shard_dir: s, batch_size: true}", "data.batch_size: expected a valid integer, got True"),
        ("optim: {max_steps: 2.5}", "optim.max_steps: expected a valid integer, got 2.5"),
        ("data: {shard_dir: s, augment: 1}", "data.augment: expected a valid boolean, got 1"),
        (
            "train: {mixed_precision: fp8}",
            "train.mixed_precision: expected one of 'no', 'bf16' or 'fp16', got 'fp8'",
        ),
        ("optim: {betas: [0.9]}", "optim.betas: too few values (no item [1])"),
        ("vae: {network: {channels: 8}}", "vae.network.channels: expected a list, got 8"),
        ("train: {keep_checkpoints: 1}", "train: keep_checkpoints must be >= 2, got 1"),
    ],
)
def test_values_of_the_wrong_type_are_refused_in_one_line(tmp_path: Path, text: str, expected: str) -> None:
    if "shard_dir" not in text:
        text += "\ndata: {shard_dir: s}"
    path = _write(tmp_path, text + "\n")
    assert _error(load_config, path, PretrainConfig) == f"{path}: {expected}"


def test_integers_fill_float_fields_and_lists_fill_tuples() -> None:
    config = from_dict(PretrainConfig, {"data": {"shard_dir": "s"}, "optim": {"lr": 1, "betas": [0, 0.5]}})
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.optim.betas == (0.0, 0.5)


def test_several_problems_are_listed_on_one_line() -> None:
    allowed = sorted(f.name for f in dataclasses.fields(TrainConfig))
    message = _error(from_dict, PretrainConfig, {"optim": {"lr": "x"}, "train": {"seeed": 0}})
    assert message == (
        f"config: train: unknown key(s) ['seeed']; allowed: {allowed}; data: required, not set; "
        "optim.lr: expected a valid number, got 'x'"
    )


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        (
            "data:\n  shard_dir: [a, b\n  mode: 2d\n",
            3,
            "did not find expected ',' or ']' (while parsing a flow sequence started on line 2)",
        ),
        (
            "optim:\n  lr: 1\n lr: 2\n",
            3,
            "did not find expected key (while parsing a block mapping started on line 1)",
        ),
        (
            "optim: {lr: 1}\noptim: {lr: 2}\n",
            2,
            "found duplicate key optim (while constructing a mapping started on line 1)",
        ),
    ],
)
def test_yaml_syntax_errors_are_one_line_with_file_and_line(
    tmp_path: Path, text: str, line: int, problem: str
) -> None:
    path = _write(tmp_path, text)
    assert _error(load_config, path, PretrainConfig) == f"{path}:{line}: {problem}"


def test_missing_file_and_non_mapping_top_level(tmp_path: Path) -> None:
    assert (
        _error(load_config, tmp_path / "nope.yaml", DataConfig)
        == f"{tmp_path / 'nope.yaml'}: config file not found"
    )
    path = _write(tmp_path, "- a\n- b\n")
    assert (
        _error(load_config, path, DataConfig) == f"{path}: the top level must be a mapping of keys, got list"
    )


# ------------------------------------------------------------------------------------------------ paths
def test_relative_paths_resolve_against_the_config_files_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    path = _write(
        tmp_path,
        "data: {shard_dir: ../shards}\nvae: {perceptual_weight: 0.1, perceptual_weights_path:"
        " /abs/w.safetensors}\nldm: {vae_path: ~/vae}\ntrain: {output_dir: runs/x}\n",
        name="configs/sub/run.yaml",
    )
    config = load_config(Path("configs/sub/run.yaml"), PretrainConfig)
    assert config.data.shard_dir == str(tmp_path / "configs/shards")
    assert config.train.output_dir == str(tmp_path / "configs/sub/runs/x")
    assert config.vae.perceptual_weights_path == "/abs/w.safetensors"
    assert config.ldm.vae_path == str(Path("~/vae").expanduser())
    url = _write(tmp_path, "data: {shard_dir: 'pipe:aws s3 cp s3://b/x -'}\n", name="url.yaml")
    assert load_config(url, PretrainConfig).data.shard_dir == "pipe:aws s3 cp s3://b/x -"
    # overrides are typed at the shell: their relative paths are relative to the working directory
    moved = load_config(path, PretrainConfig, overrides={"data": {"shard_dir": "here"}, "optim": {"lr": 0.5}})
    assert moved.data.shard_dir == str(tmp_path / "here") and moved.optim.lr == 0.5
    assert moved.train.output_dir == config.train.output_dir


def test_code_built_configs_keep_their_paths_and_are_saved_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = from_dict(PretrainConfig, {"data": {"shard_dir": "shards"}, "train": {"output_dir": "runs"}})
    assert config.data.shard_dir == "shards"  # relative to the working directory, like any path in Python
    assert dataclasses.replace(config.train, output_dir="elsewhere").output_dir == "elsewhere"
    save_config(config, tmp_path / "saved/config.yaml")
    saved = yaml.safe_load((tmp_path / "saved/config.yaml").read_text())
    assert saved["data"]["shard_dir"] == str(tmp_path / "shards")
    # the saved file means the same wherever it is read from
    reloaded = load_config(tmp_path / "saved/config.yaml", PretrainConfig)
    assert reloaded.data.shard_dir == str(tmp_path / "shards") and reloaded.train.output_dir == str(
        tmp_path / "runs"
    )
    assert reloaded.vae == config.vae and reloaded.optim == config.optim


def test_shard_dir_is_required_and_a_missing_folder_is_named_with_file_and_key(tmp_path: Path) -> None:
    assert _error(load_config, _write(tmp_path, "optim: {lr: 0.1}\n"), PretrainConfig).endswith(
        ": data: required, not set"
    )
    path = _write(tmp_path, "data: {shard_dir: ../shards/tiny}\n", name="configs/tiny.yaml")
    # loading does not need the data: a cluster job is checked anywhere
    config = load_config(path, PretrainConfig)
    shards = tmp_path / "shards/tiny"
    assert _error(require_data, config, str(path)) == (
        f"{path}: data.shard_dir: {shards} does not exist (build it with brainfm data shards)"
    )
    shards.mkdir(parents=True)
    assert _error(require_data, config, str(path)) == (
        f"{path}: data.shard_dir: {shards} has no index.json (build it with brainfm data shards)"
    )
    (shards / "index.json").write_text("{}")
    require_data(config, str(path))


# ------------------------------------------------------------------------------------------------ networks
@pytest.mark.parametrize("network", NETWORKS, ids=lambda n: n.name)
def test_network_sections_take_exactly_their_constructors_arguments(network: NetworkArgs) -> None:
    cls = network._load(network.name)
    parameters = inspect.signature(cls.__init__).parameters
    real = {name: p.default for name, p in parameters.items() if name != "self"}
    accepted = {k: v for k, v in real.items() if k not in network.filled_by_caller}
    model = network.model()
    assert set(model.model_fields) == set(accepted)
    as_lists = {
        k: list(v) if isinstance(v, tuple) else v for k, v in accepted.items()
    }  # as config.json holds them
    assert dict(model.model_validate(accepted)) == as_lists == dict(network.default())  # every real argument
    with pytest.raises(Exception, match="Extra inputs"):
        model.model_validate({"chanels": [8]})
    for filled in network.filled_by_caller:
        assert filled in real  # excluded names are real arguments, set by the trainer from the data


def test_a_misspelled_network_argument_names_the_allowed_ones() -> None:
    message = _error(
        from_dict, PretrainConfig, {"data": {"shard_dir": "s"}, "ldm": {"unet": {"chanels": [8]}}}
    )
    assert message.startswith(
        "config: ldm.unet: unknown key(s) ['chanels']; allowed (LatentUNet arguments; "
        "spatial_dims, latent_channels, anatomy_channels, prediction_type come from the data): ["
    )
    assert "'channels'" in message and "'spatial_dims'" not in message.split("): ")[1]
    # in_channels comes from the data: it is not configurable
    in_channels = {"data": {"shard_dir": "s"}, "vae": {"network": {"in_channels": 2}}}
    assert "unknown key(s) ['in_channels']" in _error(from_dict, PretrainConfig, in_channels)
    head = _error(from_dict, FinetuneConfig, {"head": {"network": {"disease_mode": "all"}}})
    assert head == "config: head.network.disease_mode: expected one of 'none', 'outputs' or 'film', got 'all'"


def test_network_schema_follows_the_constructor_signature() -> None:
    class Toy:
        def __init__(self, spatial_dims: int, width: int = 4, levels: tuple[int, ...] = (1, 2)) -> None:
            pass

    toy = NetworkArgs("Toy", {"Toy": Toy}.get, ("spatial_dims",), __name__)
    assert toy.default().width == 4
    assert toy.model().model_validate({"width": 8, "levels": (3,)}).levels == [3]
    with pytest.raises(Exception, match="valid integer"):
        toy.model().model_validate_json('{"width": true}', strict=True)


def test_cross_network_constraints_are_checked_at_load() -> None:
    message = _error(
        from_dict, PretrainConfig, {"data": {"shard_dir": "s"}, "ldm": {"unet": {"cross_attention_dim": 32}}}
    )
    assert message == (
        "config: ldm: unet.cross_attention_dim (32) must equal conditioner.cross_attention_dim (64): "
        "the UNet attends to the conditioner's tokens"
    )
    assert "network.attention_levels needs one entry per level (2)" in _error(
        from_dict,
        PretrainConfig,
        {
            "data": {"shard_dir": "s"},
            "vae": {"network": {"channels": [8, 16], "attention_levels": [True], "norm_num_groups": 8}},
        },
    )


def test_configs_with_networks_pickle_and_replace() -> None:
    config = load_config(CONFIGS / "pretrain/tiny-2d.yaml", PretrainConfig)
    assert pickle.loads(pickle.dumps(config)) == config  # e.g. into spawned dataloader workers
    changed = dataclasses.replace(config.vae, network={"channels": [4, 8], "norm_num_groups": 4})
    assert changed.network.channels == [4, 8] and changed.network.latent_channels == 4  # BrainVAE's default
    assert [f.name for f in dataclasses.fields(PretrainConfig)] == ["data", "vae", "ldm", "optim", "train"]


# ------------------------------------------------------------------------------------------------ merging
def test_overrides_merge_deep_and_parse_as_yaml() -> None:
    assert parse_overrides(["optim.lr=1e-4", "vae.network.channels=[4,8]", "ldm.vae_path=null"]) == {
        "optim": {"lr": 1e-4},
        "vae": {"network": {"channels": [4, 8]}},
        "ldm": {"vae_path": None},
    }
    base = {"optim": {"lr": 0.1, "max_steps": 5}, "train": {"seed": 1}}
    assert merge(base, {"optim": {"lr": 0.2}}) == {"optim": {"lr": 0.2, "max_steps": 5}, "train": {"seed": 1}}
    assert base["optim"]["lr"] == 0.1  # inputs are not modified
    assert _error(parse_overrides, ["optim.lr"]) == "override 'optim.lr': expected KEY.PATH=VALUE"


def test_demo_settings_resolve_paths_against_their_file(tmp_path: Path) -> None:
    from brainfm.demo import QUICK, make_settings

    path = _write(
        tmp_path,
        "data_config: ../data.yaml\npretrain: {ldm: {vae_path: vae}, optim: {lr: 2e-3}}\nn_train: 12\n",
        name="settings/demo.yaml",
    )
    settings = make_settings(quick=True, settings_path=path)
    assert settings.data_config == str(tmp_path / "data.yaml")
    assert settings.pretrain == {"ldm": {"vae_path": str(tmp_path / "settings/vae")}, "optim": {"lr": 2e-3}}
    assert settings.n_train == 12 and settings.n_test_lesion == QUICK["n_test_lesion"]  # the quick preset, then the file
    assert Path(settings.pretrain_config).is_file()  # the default: the repository's demo config
    bad = _write(tmp_path, "n_trian: 12\n", name="bad.yaml")
    assert _error(make_settings, False, bad).startswith(f"{bad}: unknown key(s) ['n_trian']; allowed: [")


# ------------------------------------------------------------------------------------------------ tools' configs
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


# ------------------------------------------------------------------------------------------------ protocols
PROTOCOLS = sorted((CONFIGS / "protocols").glob("*.yaml"))


def test_there_are_protocols() -> None:
    assert {p.stem for p in PROTOCOLS} >= {
        "ixi-t2-brats21-2d",
        "ixi-t1-atlas2-2d",
        "ixi-t2-mslub-2d",
        "ixi-t1-wmh2017-2d",
    }


@pytest.mark.parametrize("path", PROTOCOLS, ids=lambda p: p.name)
def test_protocol_configs_validate(path: Path) -> None:
    from brainfm.data.datasets import LAYOUTS

    protocol = load_config(path, ProtocolConfig)
    assert protocol.name == path.stem
    assert {protocol.train.dataset, protocol.evaluate.dataset} <= set(LAYOUTS)
    assert Path(protocol.train.manifest) == CONFIGS.parent / "manifests" / f"{protocol.train.dataset}.csv"
    pretrain = load_config(protocol.pretrain_config, PretrainConfig)  # resolved against the protocol's folder
    assert pretrain.data.mode == protocol.mode
    assert all(s % 8 == 0 for s in protocol.preprocess.shape[: 2 if protocol.mode == "2d" else 3])
    assert protocol.published, "a protocol lists the published numbers it is compared with"
    assert all(
        r.threshold in ("greedy_dice_lesion_val", "healthy_fpr", "best_on_test") for r in protocol.published
    )


def test_protocol_config_rejects_bad_protocols() -> None:
    base = {
        "name": "p",
        "description": "d",
        "mode": "2d",
        "pretrain_config": "configs/pretrain/tiny-2d.yaml",
        "preprocess": {"spacing": [2.0, 2.0, 2.0], "shape": [96, 96, 80]},
        "threshold": {},
        "train": {"dataset": "ixi", "manifest": "a.csv", "modality": "T2"},
        "evaluate": {"dataset": "brats2021", "manifest": "b.csv", "modality": "T2"},
    }
    assert from_dict(ProtocolConfig, base).threshold.reported == ("healthy_fpr", "greedy_dice_lesion_val")
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(ProtocolConfig, {**base, "thresholds": {}})
    with pytest.raises(ConfigError, match="differ"):
        from_dict(ProtocolConfig, {**base, "evaluate": {**base["evaluate"], "modality": "T1"}})
    with pytest.raises(ConfigError, match="healthy cohort"):
        from_dict(ProtocolConfig, {**base, "train": {**base["train"], "dataset": "brats2021"}})
    with pytest.raises(ConfigError, match="train.dataset: expected one of"):
        from_dict(ProtocolConfig, {**base, "train": {**base["train"], "dataset": "adni"}})
    published = {
        "method": "m",
        "dice": 0.45,
        "auprc": 145.0,
        "threshold": "greedy_dice_lesion_val",
        "source": "s",
    }
    with pytest.raises(ConfigError, match="percentages"):
        from_dict(ProtocolConfig, {**base, "published": [published]})
    with pytest.raises(ConfigError, match=r"threshold.reported\[0\]: expected one of"):
        from_dict(ProtocolConfig, {**base, "threshold": {"reported": ["oracle"]}})
    with pytest.raises(ConfigError, match="lesion_val_fraction"):
        from_dict(ProtocolConfig, {**base, "threshold": {"lesion_val_fraction": 1.0}})


@pytest.mark.parametrize("path", sorted((CONFIGS / "demo").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_demo_settings_change_only_what_they_name(path: Path) -> None:
    """A demo settings file is the default demo with its own keys changed (and nothing else moved by it)."""
    from brainfm.demo import make_settings

    named = read_yaml(path)
    default, changed = to_dict(make_settings()), to_dict(make_settings(settings_path=path))
    assert {key for key in default if default[key] != changed[key]} == set(named)
    assert all(changed[key] == value for key, value in named.items())
