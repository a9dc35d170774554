"""Checkpoints: atomic (a crash mid-write is never resumed from), keep-k, and exact resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from brainfm.config import save_config
from brainfm.io import BrainFMInputError
from brainfm.train import checkpoint as ckpt
from brainfm.train.pretrain import pretrain

REPO = Path(__file__).resolve().parents[2]


def test_crash_during_checkpoint_write_is_never_resumed(tiny_shards: Path, tmp_path: Path, tiny_config,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config("2d", tiny_shards, tmp_path, vae={"adv_weight": 0.0}, train={"sample_every": 0})
    real_write = ckpt._write_synced

    def crash_at_step_4(path: Path, text: str) -> None:
        if "step-4.tmp-" in str(path) and path.name.startswith("data_state"):
            raise OSError("disk full (simulated) while writing the step-4 checkpoint")
        real_write(path, text)

    monkeypatch.setattr(ckpt, "_write_synced", crash_at_step_4)
    with pytest.raises(OSError, match="simulated"):
        pretrain("vae", config)
    run_dir = tmp_path / "vae"
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names[0] == "step-2" and len(names) == 2 and names[1].startswith("step-4.tmp-")
    assert (run_dir / "checkpoints" / names[1] / "model.safetensors").is_file()  # the write was mid-way
    assert ckpt.resolve_resume("auto", run_dir) == run_dir / "checkpoints" / "step-2"
    with pytest.raises(BrainFMInputError, match="COMPLETE"):
        ckpt.resolve_resume(str(run_dir / "checkpoints" / names[1]), run_dir)
    with pytest.raises(BrainFMInputError, match="--resume auto"):
        pretrain("vae", config)  # a fresh start must not silently overwrite a run

    monkeypatch.setattr(ckpt, "_write_synced", real_write)
    pretrain("vae", config, resume="auto")
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step-4", "step-6"]  # keep 2; step-2 pruned only after step-6 was complete; temp removed
    records = [json.loads(x) for x in (run_dir / "logs" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert json.loads((run_dir / "checkpoints" / "step-6" / "trainer_state.json").read_text())["step"] == 6


HARNESS = """
import sys, time
from brainfm.train.tasks import vae
real = vae.VAETask.losses
def slow(self, accelerator, batch, step):
    if step >= 3:
        time.sleep(2.0)  # room to kill the process after the step-2 checkpoint
    return real(self, accelerator, batch, step)
if sys.argv[1] == "slow":
    vae.VAETask.losses = slow
from brainfm.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _run(mode: str, config_path: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-c", HARNESS, mode, "pretrain", "vae", "--config", str(config_path),
                             "--output-dir", str(out), *extra], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, encoding="utf-8", errors="replace")


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(tiny_shards: Path, tmp_path: Path, tiny_config) -> None:
    config = tiny_config("2d", tiny_shards, tmp_path, train={"sample_every": 0})  # adversarial from step 3
    save_config(config, tmp_path / "config.yaml")
    reference = _run("fast", tmp_path / "config.yaml", tmp_path / "reference")
    victim = _run("slow", tmp_path / "config.yaml", tmp_path / "victim")
    marker = tmp_path / "victim" / "vae" / "checkpoints" / "step-2" / ckpt.MARKER
    deadline = time.time() + 400
    while not marker.exists():
        assert victim.poll() is None, victim.stderr.read()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "victim" / "vae" / "vae").exists()  # it really died before the end
    resumed = _run("fast", tmp_path / "config.yaml", tmp_path / "victim", "--resume", "auto")
    for proc in (resumed, reference):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]

    def losses(run: str) -> list[dict]:
        lines = (tmp_path / run / "vae" / "logs" / "losses.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "time"} for x in lines]

    assert [r["step"] for r in losses("victim")] == [1, 2, 3, 4, 5, 6]
    assert losses("victim") == losses("reference")  # bit-identical per-step losses, discriminator included
    for name in ("checkpoints/step-6/model.safetensors", "checkpoints/step-6/model_1.safetensors",
                 "vae/diffusion_pytorch_model.safetensors"):
        ours = load_file(tmp_path / "victim" / "vae" / name)
        theirs = load_file(tmp_path / "reference" / "vae" / name)
        assert ours.keys() == theirs.keys()
        assert all((ours[k] == theirs[k]).all() for k in ours), name
