"""brainfm plan: the fake-tensor memory tracker, the strategy arithmetic, the CLI, and the prediction against
the measured peak of real training steps on CPU (benchmarks/plan_memory.py says exactly what is compared)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from brainfm.cli import main
from brainfm.plan import FSDP_MIN_PARAMS, PeakBytes, StrategyMemory, _fake_mode, _module_sizes

REPO = Path(__file__).resolve().parents[1]


def test_tracker_counts_each_storage_once_until_it_is_freed() -> None:
    with _fake_mode():
        tracker = PeakBytes()
        with tracker:
            a = torch.empty(1000)  # 4000 bytes
            view = a.view(10, 100)  # same storage: nothing more
            b = a * 2  # 4000 more
            assert tracker.live == 8000
            del a
            assert tracker.live == 8000  # the view keeps the storage alive
            del view
            assert tracker.live == 4000
            c = torch.empty(500, dtype=torch.bfloat16)  # 1000 bytes
            del b, c
        assert tracker.live == 0
        assert tracker.peaks == {"step": 8000}


def test_fsdp_units_follow_size_based_wrapping() -> None:
    big = FSDP_MIN_PARAMS  # a Linear(1000, big/1000) holds big + big/1000 parameters with its bias
    model = nn.Sequential(nn.Linear(1000, big // 1000), nn.Linear(1000, 2 * big // 1000), nn.Linear(10, 10))
    largest, root = _module_sizes(model)
    assert largest == 2 * big + 2 * big // 1000
    assert root == 110  # the small layer stays with the root


def test_largest_batch_is_the_last_that_fits() -> None:
    memory = StrategyMemory("ddp", resident=1000, step_one=300, per_sample=100, update=700)
    assert memory.bytes_at(1) == 1700  # the update peak dominates small batches
    assert memory.bytes_at(8) == 2000
    assert memory.max_batch(2050) == 8
    assert memory.bytes_at(8) <= 2050 < memory.bytes_at(9)
    assert memory.max_batch(1699) == 0


def test_cli_plan_prints_components_and_strategies(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from brainfm.config import PretrainConfig, load_config
    from brainfm.models.vae import BrainVAE, make_discriminator

    out = tmp_path / "plan.json"
    code = main(["plan", "--config", str(REPO / "configs/pretrain/tiny-2d.yaml"), "--shape", "40x48x40",
                 "--stage", "vae", "--gpus", "4", "--gpu-mem", "16", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "4 GPU(s) x 16 GiB" in printed
    assert [line.split()[0] for line in printed.splitlines() if line.startswith("  ") and line.split()[0] in
            ("ddp", "zero2", "zero3", "fsdp")] == ["ddp", "zero2", "zero3", "fsdp"]
    plan = json.loads(out.read_text())
    (stage,) = plan["stages"]
    config = load_config(REPO / "configs/pretrain/tiny-2d.yaml", PretrainConfig)
    vae = BrainVAE(**dict(config.vae.network), spatial_dims=2, in_channels=1, out_channels=1)
    disc = make_discriminator(2, 1, **dict(config.vae.discriminator))
    counts = {c["name"]: c["params"] for c in stage["components"]}
    assert counts == {"vae": sum(p.numel() for p in vae.parameters()),
                      "discriminator": sum(p.numel() for p in disc.parameters())}
    assert stage["spatial"] == [40, 48]  # 2D: axial slices of the grid
    ddp, zero2, zero3, fsdp = stage["strategies"]
    assert zero2["problem"].startswith("two optimizers") and fsdp["problem"] == ""
    # sharding: FSDP over 4 GPUs holds less per GPU than one replicated DDP copy
    assert fsdp["resident"] < ddp["resident"]


def test_ldm_activations_grow_with_the_batch() -> None:
    """The LDM stage traces (its conditioner holds a frozen table, its VAE is frozen): a second sample adds memory,
    and casting the weights to bf16 under autocast holds less than fp32 weights."""
    import dataclasses

    from brainfm.config import PretrainConfig, load_config
    from brainfm.plan import data_shapes, trace_peak

    config = load_config(REPO / "configs/pretrain/tiny-2d.yaml", PretrainConfig)
    config.train = dataclasses.replace(config.train, mixed_precision="bf16")
    shapes = data_shapes(config, (64, 64, 8))
    one, two = (trace_peak(config, "ldm", shapes, b, keep_grads=False)["step"] for b in (1, 2))
    cast = trace_peak(config, "ldm", shapes, 2, cast_weights=True, keep_grads=False)["step"]
    assert 0 < one < two
    assert cast < two


def test_cli_plan_never_overwrites_a_file_it_did_not_write(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mine = tmp_path / "plan.json"
    mine.write_text("a user's notes")
    code = main(["plan", "--config", str(REPO / "configs/pretrain/tiny-2d.yaml"), "--shape", "40x48x40",
                 "--stage", "vae", "--json", str(mine)])
    assert code == 2 and mine.read_text() == "a user's notes"
    assert "was not written by brainfm" in capsys.readouterr().err


def test_cli_plan_without_grid_names_the_missing_index(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["plan", "--config", str(REPO / "configs/pretrain/tiny-2d.yaml"), "--set",
                 f"data.shard_dir={tmp_path}"])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"brainfm: error: {tmp_path / 'index.json'}: no shard index") and "\n" not in error


@pytest.mark.slow
@pytest.mark.parametrize("case", ["ldm-3d-64-checkpointed", "vae-3d-48"])
def test_prediction_within_25_percent_of_measured_peak(case: str) -> None:
    """Measured: peak RSS growth of 2 real training steps in a fresh process (file-backed pages excluded);
    predicted: brainfm.plan's single-process figure for the same config, shape and batch."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import plan_memory
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    row = plan_memory.run_case(case, "cpu", timeout=300)
    assert row["measured"] > 150 * 2**20, row  # large enough that allocator noise cannot decide the result
    assert 0.75 <= row["ratio"] <= 1.25, row

