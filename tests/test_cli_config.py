"""`brainfm config check` (every kind, exit codes, one-line errors) and the config handling of `brainfm pretrain`
(a missing shard folder is named at start-up, with the file and the key), run in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from brainfm.cli import main
from brainfm.config import CONFIG_KINDS, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]


def _check(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["config", "check", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _demo_settings(tmp_path: Path) -> Path:
    path = tmp_path / "settings" / "demo.yaml"
    path.parent.mkdir()
    path.write_text("n_train: 10\nn_val: 2\ndata_config: ../data.yaml\npretrain: {optim: {lr: 2e-3}}\n")
    return path


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("data", "configs/data/tiny.yaml"),
        ("pretrain", "configs/pretrain/tiny-2d.yaml"),
        ("finetune", "configs/finetune/semi-2d.yaml"),
        ("adapt", "configs/adapt/lora.yaml"),
        ("demo", None),
    ],
)
def test_check_prints_each_kind_resolved(capsys, tmp_path: Path, kind: str, name: str | None) -> None:
    path = _demo_settings(tmp_path) if name is None else REPO / name
    code, out, err = _check(capsys, str(path))
    assert code == 0 and err == ""
    assert out.splitlines()[0] == f"# {path}: a valid {kind} config"
    printed = yaml.safe_load(out)
    assert printed == to_dict(load_config(path, CONFIG_KINDS[kind]))
    if kind == "pretrain":
        # absolute, resolved against the file's folder
        assert printed["data"]["shard_dir"] == str(REPO / "shards/tiny")
        assert printed["vae"]["network"]["channels"] == [8, 16]
        assert printed["optim"]["lr"] == 0.003  # written 3.0e-3
    if kind == "demo":
        assert printed["data_config"] == str(tmp_path / "data.yaml") and printed["n_train"] == 10
    # the explicit --kind gives the same output
    assert _check(capsys, str(path), "--kind", kind)[1] == out


def test_check_applies_overrides_and_validates_them(capsys) -> None:
    path = str(REPO / "configs/pretrain/tiny-2d.yaml")
    code, out, _ = _check(
        capsys,
        path,
        "--set",
        "optim.lr=1e-4",
        "--set",
        "vae.network.channels=[4,8]",
        "--set",
        "vae.network.norm_num_groups=4",
    )
    printed = yaml.safe_load(out)
    assert code == 0 and printed["optim"]["lr"] == 1e-4 and printed["vae"]["network"]["channels"] == [4, 8]
    code, out, err = _check(capsys, path, "--set", "optim.max_steps=0")
    assert code == 2 and out == ""
    assert (
        err == f"brainfm: error: {path} (with overrides): optim: max_steps and grad_accum must be >= 1, "
        "warmup_steps >= 0\n"
    )


def test_check_refuses_invalid_configs_in_one_line_with_exit_2(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {shard_dir: s}\nvae: {network: {chanels: [8, 16]}}\n")
    code, out, err = _check(capsys, str(bad))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(
        f"brainfm: error: {bad}: vae.network: unknown key(s) ['chanels']; allowed (BrainVAE "
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: {lr: 1e-3\n")
    code, _, err = _check(capsys, str(broken))
    assert code == 2 and err.startswith(f"brainfm: error: {broken}:2: ") and err.count("\n") == 1


def test_check_asks_for_the_kind_when_the_keys_do_not_tell(capsys, tmp_path: Path) -> None:
    path = tmp_path / "optim-only.yaml"
    path.write_text("optim: {lr: 1e-3}\n")
    code, _, err = _check(capsys, str(path))
    assert code == 2
    assert err == (
        f"brainfm: error: {path}: cannot tell the config kind from its top-level keys ['optim'] (could be "
        "pretrain or finetune or adapt); name it with --kind data|pretrain|finetune|demo|protocol|adapt\n"
    )
    code, out, _ = _check(capsys, str(path), "--kind", "finetune")
    assert code == 0 and yaml.safe_load(out)["optim"]["lr"] == 1e-3
    # a typo in a top-level key still picks the kind the other keys fit, so the typo is what gets reported
    typo = tmp_path / "typo.yaml"
    typo.write_text("data: {shard_dir: s}\nvae: {kl_weight: 0.1}\ntrian: {seed: 1}\n")
    assert "unknown key(s) ['trian']" in _check(capsys, str(typo))[2]


def test_check_needs_the_data_only_when_asked(capsys, tmp_path: Path) -> None:
    config = tmp_path / "configs" / "run.yaml"
    config.parent.mkdir()
    config.write_text("data: {shard_dir: ../shards}\nvae: {kl_weight: 1e-6}\n")
    assert _check(capsys, str(config))[0] == 0  # a cluster job is checked before its data is reachable
    code, _, err = _check(capsys, str(config), "--require-data")
    assert code == 2
    assert err == (
        f"brainfm: error: {config}: data.shard_dir: {tmp_path / 'shards'} does not exist (build it with "
        "brainfm data shards)\n"
    )
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "index.json").write_text("{}")
    code, out, _ = _check(capsys, str(config), "--require-data")
    assert code == 0 and out.startswith(f"# {config}: a valid pretrain config (data present)")


def test_pretrain_names_a_missing_shard_folder_at_start_up(capsys, tmp_path: Path) -> None:
    config = tmp_path / "configs" / "run.yaml"
    config.parent.mkdir()
    config.write_text("data: {shard_dir: ../shards/tiny}\ntrain: {output_dir: ../runs}\n")
    (tmp_path / "shards" / "tiny").mkdir(parents=True)
    capsys.readouterr()
    assert main(["pretrain", "vae", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"brainfm: error: {config}: data.shard_dir: {tmp_path / 'shards/tiny'} has no index.json (build "
        "it with brainfm data shards)\n"
    )
    assert not (tmp_path / "runs").exists()  # refused before any run folder was made
