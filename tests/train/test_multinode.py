"""Two "machines" on one host: two separate ``accelerate launch --num_machines 2 --machine_rank {0,1}`` launchers
(gloo, CPU, one process each) meeting at 127.0.0.1, for DDP and for DeepSpeed ZeRO-2 through
configs/accelerate/multi-node-zero2.yaml; then a machine lost mid-run (kill -9 of its process group, or frozen).

The one-process reference runs the same global batch in this process: micro-batches of rank 0 then rank 1 (the
ranks' reader shares) accumulated into one optimizer step, each forward drawing from that rank's noise stream.
Every launcher runs in a session of its own and is killed with its whole process tree in ``finally``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from brainfm.config import save_config

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 15  # train.collective_timeout_s of these runs
LAUNCH_TIMEOUT_S = 600

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


# ------------------------------------------------------------------------------------------------ processes
def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, state) of every process, from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(stat.parent.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def _tree(pid: int) -> set[int]:
    """``pid`` and all its descendants."""
    table = _proc_table()
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        found.add(current)
        todo += [p for p, (parent, _, _) in table.items() if parent == current and p not in found]
    return found


def _alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` that still run (zombies are dead: they only wait to be reaped)."""
    table = _proc_table()
    return {p for p in pids if p in table and table[p][2] != "Z"}


class Machine:
    """One "machine": an ``accelerate launch`` for machine ``rank`` of 2, in a session (process group) of its own."""

    def __init__(self, rank: int, port: int, config_path: Path, out: Path, log: Path, deepspeed: bool,
                 extra: tuple[str, ...] = (), precision: str = "no") -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
        if deepspeed:  # NOT ACCELERATE_USE_CPU: it would turn the DeepSpeed launch into plain DDP
            env.pop("ACCELERATE_USE_CPU", None)
            env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
            launcher = ["--config_file", str(REPO / "configs/accelerate/multi-node-zero2.yaml"), "--mixed_precision",
                        precision]
        else:
            env["ACCELERATE_USE_CPU"] = "1"
            launcher = ["--multi_gpu", "--mixed_precision", "no"]
        command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2",
                   "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                   "--main_process_port", str(port), "--dynamo_backend", "no", str(REPO / "pretrain/vae.py"),
                   "--config", str(config_path), "--output-dir", str(out), *extra]
        self.log = log
        with open(log, "w") as handle:
            self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.members: set[int] = {self.proc.pid}

    def snapshot(self) -> set[int]:
        """The launcher and every process it started, as of now."""
        self.members |= _tree(self.proc.pid)
        return set(self.members)

    def wait(self, timeout: float = LAUNCH_TIMEOUT_S) -> int:
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL to the launcher's process group and to every process seen in its tree."""
        with_tree = self.snapshot() if self.proc.poll() is None else set(self.members)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in _alive(with_tree):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)


@contextmanager
def machines(*args: Any, **kwargs: Any) -> Iterator[list[Machine]]:
    """Both machines started; whatever still runs at the end is killed with its tree."""
    started: list[Machine] = []
    try:
        for rank in (0, 1):
            started.append(Machine(rank, *args, log=kwargs["logs"] / f"machine{rank}.log",
                                   **{k: v for k, v in kwargs.items() if k != "logs"}))
        yield started
    finally:
        for machine in started:
            machine.kill()


def run_two(port: int, config_path: Path, out: Path, logs: Path, deepspeed: bool = False,
            extra: tuple[str, ...] = (), precision: str = "no") -> None:
    logs.mkdir(parents=True, exist_ok=True)
    with machines(port, config_path, out, logs=logs, deepspeed=deepspeed, extra=extra, precision=precision) as both:
        codes = [m.wait() for m in both]
        assert codes == [0, 0], "\n".join(m.output()[-3000:] for m in both)


# ------------------------------------------------------------------------------------------------ runs
def _losses(run: Path) -> list[float]:
    records = [json.loads(x) for x in (run / "logs" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    return [r["losses"]["generator"] for r in records]


def _rank_keys(run: Path) -> list[set[str]]:
    keys = []
    for rank in (0, 1):
        lines = [json.loads(x) for x in (run / "logs" / f"samples-rank{rank}.jsonl").read_text().splitlines()]
        keys.append({k for x in lines for k in x["keys"]})
    return keys


def _ddp_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model.safetensors"))


def _zero_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint (``pytorch_model/``), gathered from its ZeRO partitions."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))  # its "latest" names pytorch_model/


def _checkpoint_log_lines(run: Path, step: int) -> int:
    """How many times any process logged committing ``step-N`` (rank logs together)."""
    text = "".join(p.read_text() for p in (run / "logs").glob("train*.log"))
    return sum(1 for line in text.splitlines() if line.endswith(f"checkpoints/step-{step} complete"))


@pytest.fixture(scope="module")
def setup(tiny_shards: Path, tiny_config, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The config (VAE stage, no discriminator so DeepSpeed can hold it: one optimizer), saved to a file."""
    root = tmp_path_factory.mktemp("multinode")
    config = tiny_config("2d", tiny_shards, root / "unused", vae={"adv_weight": 0.0}, optim={"max_steps": 6},
                         train={"checkpoint_every": 2, "keep_checkpoints": 3, "sample_every": 0,
                                "collective_timeout_s": float(TIMEOUT_S)})
    save_config(config, root / "config.yaml")
    return {"root": root, "config": config, "config_path": root / "config.yaml"}


@pytest.fixture(scope="module")
def ddp_run(setup, free_port) -> Path:
    """Two machines, DDP, 6 steps: the uninterrupted run."""
    run_two(free_port(), setup["config_path"], setup["root"] / "ddp", setup["root"] / "ddp-logs")
    return setup["root"] / "ddp" / "vae"


class _RankPairStream:
    """Rank 0's, then rank 1's batch of a 2-process run, alternately; before each, the global torch RNG is set to
    that rank's stream (rank r was seeded with train.seed + r), so each forward draws the noise it drew there."""

    def __init__(self, config: Any) -> None:
        from brainfm.train.stream import BatchStream, make_loader

        self.streams = [BatchStream(make_loader(config, config.data.train_split, rank=r, world_size=2))
                        for r in (0, 1)]
        self.rng = [torch.get_rng_state(), torch.Generator().manual_seed(config.train.seed + 1).get_state()]
        self.loaded = 0  # whose RNG state the global generator holds now (rank 0's after the trainer's seeding)
        self.turn = 0

    def next(self) -> dict[str, Any]:
        rank, self.turn = self.turn, 1 - self.turn
        if rank != self.loaded:
            self.rng[self.loaded] = torch.get_rng_state()
            torch.set_rng_state(self.rng[rank])
            self.loaded = rank
        return self.streams[rank].next()

    def state_dict(self) -> dict[str, Any]:
        return {"streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for stream, saved in zip(self.streams, state["streams"], strict=True):
            stream.load_state_dict(saved)


@pytest.fixture(scope="module")
def reference_losses(setup) -> list[float]:
    """One process, the same global batch per step: rank 0's and rank 1's batches as 2 accumulated micro-batches."""
    from brainfm.train.stream import probe_batch
    from brainfm.train.tasks.vae import VAETask
    from brainfm.train.trainer import Trainer

    class ReferenceTask(VAETask):
        def make_stream(self, accelerator: Any) -> _RankPairStream:
            return _RankPairStream(self.config)

    config = setup["config"]
    config = dataclasses.replace(config, optim=dataclasses.replace(config.optim, grad_accum=2))
    run = setup["root"] / "reference" / "vae"
    probe = probe_batch(config)
    trainer = Trainer(config, run)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.fit(ReferenceTask(config, probe))
    finally:
        torch.set_num_threads(previous)
    return _losses(run)


# ------------------------------------------------------------------------------------------------ item 1
def test_two_machines_ddp_split_data_match_one_process_and_checkpoint_once(ddp_run: Path, reference_losses,
                                                                           setup) -> None:
    batch = setup["config"].data.batch_size
    state = json.loads((ddp_run / "checkpoints" / "step-6" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    keys = _rank_keys(ddp_run)
    assert len(keys[0]) == len(keys[1]) == 6 * batch and not keys[0] & keys[1]  # disjoint shares
    np.testing.assert_allclose(_losses(ddp_run), reference_losses, rtol=1e-5, atol=1e-7)
    compute = json.loads((ddp_run / "compute.json").read_text())
    assert compute["world_size"] == 2 and compute["distributed_type"] == "MULTI_CPU"
    assert compute["hardware"]["machines"] == 2 and compute["hardware"]["processes"] == 2
    assert compute["global_batch"] == 2 * batch and compute["samples"] == 6 * 2 * batch
    assert sorted(p.name for p in (ddp_run / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]
    for step in (2, 4, 6):
        folder = ddp_run / "checkpoints" / f"step-{step}"
        assert (folder / "COMPLETE").is_file()
        assert {p.name for p in folder.glob("data_state_rank*.json")} == {"data_state_rank0.json",
                                                                         "data_state_rank1.json"}
        assert len(list(folder.glob("model*.safetensors"))) == 1
        assert _checkpoint_log_lines(ddp_run, step) == 1  # committed by one process, once


def test_two_machines_deepspeed_zero2_through_the_multinode_config(setup, reference_losses, free_port) -> None:
    root = setup["root"]
    run_two(free_port(), setup["config_path"], root / "zero2", root / "zero2-logs", deepspeed=True)
    run = root / "zero2" / "vae"
    step6 = run / "checkpoints" / "step-6"
    assert (step6 / "COMPLETE").is_file() and (step6 / "pytorch_model").is_dir()  # a ZeRO checkpoint
    assert json.loads((step6 / "trainer_state.json").read_text())["world_size"] == 2
    keys = _rank_keys(run)
    assert len(keys[0]) == len(keys[1]) > 0 and not keys[0] & keys[1]
    np.testing.assert_allclose(_losses(run), reference_losses, rtol=1e-5, atol=1e-7)
    for step in (2, 4, 6):
        assert _checkpoint_log_lines(run, step) == 1
    # resume: both machines relaunched with --resume auto after the newest checkpoint is gone
    resumed = root / "zero2-resumed"
    shutil.copytree(root / "zero2", resumed)
    shutil.rmtree(resumed / "vae" / "checkpoints" / "step-6")
    run_two(free_port(), setup["config_path"], resumed, root / "zero2-resumed-logs", deepspeed=True,
            extra=("--resume", "auto"))
    np.testing.assert_allclose(_losses(resumed / "vae"), _losses(run), rtol=1e-6, atol=0)
    final, expected = _zero_weights(resumed / "vae" / "checkpoints" / "step-6"), _zero_weights(step6)
    assert final.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=0, atol=1e-7)


def test_two_machines_deepspeed_bf16_casts_inputs_and_keeps_the_ema_in_fp32(setup, reference_losses,
                                                                             free_port) -> None:
    """DeepSpeed casts the module to bf16 but not the batch (the trainer autocasts the task's losses), and an EMA
    of bf16 weights would never move at decay 0.999+ (the trainer keeps it in fp32)."""
    from safetensors.torch import load_file

    root = setup["root"]
    config = dataclasses.replace(setup["config"], train=dataclasses.replace(setup["config"].train,
                                                                            mixed_precision="bf16"))
    save_config(config, root / "config-bf16.yaml")
    run_two(free_port(), root / "config-bf16.yaml", root / "bf16", root / "bf16-logs", deepspeed=True,
            precision="bf16")
    run = root / "bf16" / "vae"
    np.testing.assert_allclose(_losses(run), reference_losses, rtol=2e-2)  # bf16 rounding, same trajectory
    assert json.loads((run / "compute.json").read_text())["precision"] == "bf16"
    step6 = run / "checkpoints" / "step-6"
    assert json.loads((step6 / "trainer_state.json").read_text())["world_size"] == 2
    states = [torch.load(f, weights_only=True) for f in sorted(step6.glob("custom_checkpoint_*.pkl"))]
    (ema,) = [state for state in states if "shadow_params" in state]
    assert {t.dtype for t in ema["shadow_params"]} == {torch.float32}
    exported = load_file(str(run / "vae" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in exported.values()} == {torch.float32}


# ------------------------------------------------------------------------------------------------ item 2
def _wait_for(path: Path, machines_: list[Machine], timeout: float = LAUNCH_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or any(m.proc.poll() is not None for m in machines_):
            raise AssertionError(f"{path} never appeared:\n" + "\n".join(m.output()[-2000:] for m in machines_))
        time.sleep(0.05)


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if "brainfm: error:" in line]
    assert len(lines) == 1, output[-3000:]
    return lines[0][lines[0].index("brainfm: error:"):]


def test_machine_killed_mid_run_other_stops_and_relaunch_resumes_to_same_result(setup, ddp_run: Path,
                                                                               free_port) -> None:
    root = setup["root"]
    out, logs = root / "killed", root / "killed-logs"
    logs.mkdir()
    with machines(free_port(), setup["config_path"], out, logs=logs, deepspeed=False) as (first, second):
        _wait_for(out / "vae" / "checkpoints" / "step-2" / "COMPLETE", [first, second])
        doomed = first.snapshot()  # machine 0: rank 0 and the rendezvous store
        assert len(doomed) >= 2  # the launcher and its worker
        os.killpg(first.proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        first.proc.wait(timeout=30)
        deadline = killed_at + 10
        while _alive(doomed) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(doomed), f"processes of the killed machine survive: {_alive(doomed)}"
        code = second.wait(timeout=TIMEOUT_S + 60)
        exited_after = time.monotonic() - killed_at
    assert code != 0
    assert exited_after < TIMEOUT_S + 60
    message = _one_error_line(second.output())
    assert "lost contact with the other processes" in message and "--resume auto" in message
    assert not (out / "vae" / "checkpoints" / "step-6").exists()  # it was stopped mid-run
    # both machines relaunched: from the last complete checkpoint to the uninterrupted run's result
    run_two(free_port(), setup["config_path"], out, root / "relaunch-logs", extra=("--resume", "auto"))
    np.testing.assert_allclose(_losses(out / "vae"), _losses(ddp_run), rtol=1e-6, atol=0)
    final = _ddp_weights(out / "vae" / "checkpoints" / "step-6")
    expected = _ddp_weights(ddp_run / "checkpoints" / "step-6")
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=0, atol=1e-7)


def test_frozen_machine_is_given_up_after_the_collective_timeout(setup, free_port) -> None:
    root = setup["root"]
    out, logs = root / "frozen", root / "frozen-logs"
    logs.mkdir()
    with machines(free_port(), setup["config_path"], out, logs=logs, deepspeed=False) as (first, second):
        _wait_for(out / "vae" / "checkpoints" / "step-2" / "COMPLETE", [first, second])
        frozen = second.snapshot()
        for pid in frozen:  # a machine that stops answering without closing its connections
            os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        code = first.wait(timeout=TIMEOUT_S + 60)
        waited = time.monotonic() - stopped_at
    assert code != 0
    assert TIMEOUT_S - 1 <= waited < TIMEOUT_S + 60, waited
    message = _one_error_line(first.output())
    assert f"collective_timeout_s={TIMEOUT_S}" in message and "Timed out" in message
