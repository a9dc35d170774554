"""Data-parallel scaling on one config: samples/s at 1 process, 2 processes on one machine, and 2 "machines" of
one process each (two `accelerate launch --num_machines 2` launchers meeting at 127.0.0.1), in one run.

Weak scaling: every process keeps the config's micro-batch, so the global batch doubles with 2 processes. A run's
throughput is its global batch / the MEDIAN interval between consecutive optimizer steps after the warm-up steps
(the wall-clock stamps the trainer writes to logs/losses.jsonl), so set-up, the first steps and the final
checkpoint are excluded and a burst of load from other processes on a shared machine does not decide it.
Efficiency = samples/s with N processes / (N x samples/s with 1 process). Each process runs with 1 thread
(OMP_NUM_THREADS=1), gloo on CPU; with fewer free cores than processes the ratio measures the machine, not us.

Usage: python benchmarks/scaling.py [--shards DIR] [--steps 40] [--warmup 5] [--batch 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LAUNCH_TIMEOUT_S = 1200


def build_shards(out: Path) -> Path:
    from brainfm.config import DataConfig, load_config
    from brainfm.data.synthetic import SplitPlan, synthesize_cohort
    from brainfm.data.writer import build_shards as build

    manifest = synthesize_cohort(out / "cohort", {"": SplitPlan(n_healthy=8)}, seed=0, resolution=2)
    config = load_config(REPO / "configs/data/tiny.yaml", DataConfig)
    config.shards.split_fractions = {"train": 1.0}
    build(manifest, out / "shards", config)
    return out / "shards"


def write_config(shards: Path, work: Path, steps: int, batch: int) -> Path:
    """configs/pretrain/tiny-2d.yaml, VAE stage without the discriminator, no previews, one checkpoint at the end."""
    import dataclasses

    from brainfm.config import PretrainConfig, load_config, save_config

    config = load_config(REPO / "configs/pretrain/tiny-2d.yaml", PretrainConfig)
    config.data.shard_dir = str(shards)
    config.data.batch_size = batch
    config.vae = dataclasses.replace(config.vae, adv_weight=0.0)
    config.optim = dataclasses.replace(config.optim, max_steps=steps)
    config.train = dataclasses.replace(config.train, checkpoint_every=10**6, sample_every=0, log_every=10**6,
                                       collective_timeout_s=300.0)
    path = work / "config.yaml"
    save_config(config, path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(commands: list[list[str]], env: dict[str, str], logs: list[Path]) -> None:
    """Start every command in a session of its own; wait for all; kill every group left on any failure."""
    procs = []
    try:
        for command, log in zip(commands, logs, strict=True):
            with open(log, "w") as handle:
                procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        codes = [p.wait(timeout=LAUNCH_TIMEOUT_S) for p in procs]
        if any(codes):
            raise RuntimeError(f"exit codes {codes}:\n" + "\n".join(log.read_text()[-2000:] for log in logs))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def run(setup: str, config: Path, out: Path) -> Path:
    """One training run of ``setup`` ("1 process", "2 processes", "2 machines"); returns the stage's run folder."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    script = [str(REPO / "pretrain/vae.py"), "--config", str(config), "--output-dir", str(out)]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--num_processes", "2"]
    out.mkdir(parents=True, exist_ok=True)
    if setup == "1 process":
        _launch([[sys.executable, *script]], env, [out / "run.log"])
    elif setup == "2 processes":
        env["ACCELERATE_USE_CPU"] = "1"
        _launch([[*launch, "--num_machines", "1", "--main_process_port", str(_free_port()), *script]], env,
                [out / "run.log"])
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        port = str(_free_port())
        commands = [[*launch, "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                     "--main_process_port", port, *script] for rank in (0, 1)]
        _launch(commands, env, [out / f"machine{rank}.log" for rank in (0, 1)])
    return out / "vae"


def throughput(run_dir: Path, warmup: int) -> dict[str, Any]:
    """Global batch / median step interval after ``warmup`` steps, with the run's recorded world size."""
    compute = json.loads((run_dir / "compute.json").read_text())
    stamps = [json.loads(line)["time"] for line in (run_dir / "logs" / "losses.jsonl").read_text().splitlines()]
    intervals = [b - a for a, b in zip(stamps[warmup:-1], stamps[warmup + 1:], strict=True)]
    step_s = statistics.median(intervals)
    return {"processes": compute["world_size"], "machines": compute["hardware"]["machines"],
            "global_batch": compute["global_batch"], "seconds_per_step": step_s,
            "samples_per_s": compute["global_batch"] / step_s, "steps_timed": len(intervals)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, default=None, help="shard folder (default: a tiny one is built)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch per process")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.steps < args.warmup + 3:
        parser.error("--steps must exceed --warmup by at least 3")
    with tempfile.TemporaryDirectory(prefix="brainfm-scaling-") as tmp:
        work = Path(tmp)
        shards = args.shards or build_shards(work / "data")
        config = write_config(shards, work, args.steps, args.batch)
        rows = {}
        for setup in ("1 process", "2 processes", "2 machines"):
            rows[setup] = throughput(run(setup, config, work / setup.replace(" ", "-")), args.warmup)
    base = rows["1 process"]["samples_per_s"]
    for row in rows.values():
        row["efficiency"] = row["samples_per_s"] / (row["processes"] * base)
    print(f"configs/pretrain/tiny-2d.yaml VAE stage, micro-batch {args.batch} per process, {args.steps} steps "
          f"(median step after {args.warmup}), {os.cpu_count()} CPU cores, 1 thread per process")
    print(f"{'setup':<14} {'processes':>9} {'machines':>8} {'samples/s':>10} {'efficiency':>10}")
    for setup, row in rows.items():
        print(f"{setup:<14} {row['processes']:>9} {row['machines']:>8} {row['samples_per_s']:>10.1f} "
              f"{row['efficiency']:>10.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
