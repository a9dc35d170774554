"""Non-finite guard: abort names the step; skip drops, counts and checkpoints the update, then gives up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from brainfm.train import loop
from brainfm.train.guards import NonFiniteError, NonFiniteGuard, is_finite
from tests.train.conftest import tiny_config


def test_guard_policies() -> None:
    assert is_finite(torch.tensor([1.0, 2.0])) and not is_finite(torch.tensor([1.0, float("nan")]))
    assert not is_finite(float("inf")) and is_finite(None)
    with pytest.raises(NonFiniteError, match="at step 7"):
        NonFiniteGuard("abort", 5).allow_update(7, "loss", False, "nan")
    guard = NonFiniteGuard("skip", 1)
    assert guard.allow_update(1, "loss", True)
    assert not guard.allow_update(2, "loss", False, "nan")
    assert guard.state_dict() == {"skipped": 1, "skipped_steps": [2]}
    with pytest.raises(NonFiniteError, match="more than train.max_nonfinite_skips=1"):
        guard.allow_update(3, "loss", False, "inf")
    restored = NonFiniteGuard("skip", 1)
    restored.load_state_dict({"skipped": 1, "skipped_steps": [2]})
    assert restored.skipped == 1


def _nan_at(step_with_nan: int, monkeypatch: pytest.MonkeyPatch) -> None:
    real = loop.VAETask.losses

    def poisoned(self, accelerator, batch, step):
        losses, parts = real(self, accelerator, batch, step)
        if step == step_with_nan:
            losses["generator"] = losses["generator"] * float("nan")
        return losses, parts

    monkeypatch.setattr(loop.VAETask, "losses", poisoned)


def test_nan_loss_aborts_with_the_step(tiny_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_at(2, monkeypatch)
    config = tiny_config("2d", tiny_shards, tmp_path, vae={"adv_weight": 0.0}, train={"sample_every": 0})
    with pytest.raises(NonFiniteError, match="non-finite generator loss nan at step 2"):
        loop.train("vae", config)


def test_nan_loss_skip_policy_counts_and_keeps_weights(tiny_shards: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_at(2, monkeypatch)
    config = tiny_config("2d", tiny_shards, tmp_path, vae={"adv_weight": 0.0}, optim={"max_steps": 3},
                         train={"sample_every": 0, "checkpoint_every": 1, "keep_checkpoints": 3,
                                "nonfinite_policy": "skip", "max_nonfinite_skips": 1})
    run_dir = loop.train("vae", config)
    records = [json.loads(x) for x in (run_dir / "logs" / "losses.jsonl").read_text().splitlines()]
    assert [r["skipped_updates"] for r in records] == [0, 1, 1]
    state = json.loads((run_dir / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert state["nonfinite_skipped"] == 1
    before = load_file(run_dir / "checkpoints" / "step-1" / "model.safetensors")
    skipped = load_file(run_dir / "checkpoints" / "step-2" / "model.safetensors")
    after = load_file(run_dir / "checkpoints" / "step-3" / "model.safetensors")
    assert all(torch.equal(before[k], skipped[k]) for k in before)  # the NaN step changed nothing
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # training went on


def test_skip_policy_gives_up_after_max_skips(tiny_shards: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_at(1, monkeypatch)
    config = tiny_config("2d", tiny_shards, tmp_path, vae={"adv_weight": 0.0},
                         train={"sample_every": 0, "nonfinite_policy": "skip", "max_nonfinite_skips": 0})
    with pytest.raises(NonFiniteError, match="at step 1: 1 updates skipped"):
        loop.train("vae", config)
