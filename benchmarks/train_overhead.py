"""Overhead of brainfm's training loop over a plain PyTorch loop, and gradient checkpointing's memory saving.

1. Steps/s: the VAE stage of configs/pretrain/tiny-2d.yaml (discriminator off, EMA on, checkpoints and previews
   off) through ``brainfm.train.pretrain.pretrain`` (the ``Trainer``) vs a plain loop with the same BrainVAE, loss,
   AdamW, clipping and the same shard reader and the same EMA (diffusers ``EMAModel``, foreach, as the loop builds it), in this process,
   2 threads each, so the ratio is the loop's machinery (accelerate, guards, logs, checkpoint bookkeeping). Both
   are timed from per-step wall-clock stamps after step 5 (set-up and warm-up excluded); a run's time per step is
   the MEDIAN of its per-step intervals, so a burst of load from other processes on a shared machine does not
   land on one side only; plain and ours alternate for several rounds; the median per-round ratio is reported.
   Target: <= 5%.
2. Peak memory of one forward+backward of the tiny-3d VAE with and without gradient checkpointing, each in a
   fresh process (peak RSS above the RSS just before the step).

Usage: python benchmarks/train_overhead.py [--shards DIR] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_shards(out: Path) -> Path:
    from brainfm.config import DataConfig, load_config
    from brainfm.data.synthetic import SplitPlan, synthesize_cohort
    from brainfm.data.writer import build_shards as build

    manifest = synthesize_cohort(out / "cohort", {"": SplitPlan(n_healthy=6)}, seed=0, resolution=2)
    config = load_config(REPO / "configs/data/tiny.yaml", DataConfig)
    config.shards.split_fractions = {"train": 1.0}
    build(manifest, out / "shards", config)
    return out / "shards"


def tiny_2d(shards: Path, out: Path, steps: int):
    import dataclasses

    from brainfm.config import PretrainConfig, load_config

    config = load_config(REPO / "configs/pretrain/tiny-2d.yaml", PretrainConfig)
    config.data.shard_dir = str(shards)
    config.data.batch_size = 8
    config.vae = dataclasses.replace(config.vae, adv_weight=0.0)
    config.optim = dataclasses.replace(config.optim, max_steps=steps)
    config.train = dataclasses.replace(config.train, output_dir=str(out), checkpoint_every=10**6, sample_every=0,
                                       log_every=10**6)
    return config


def ours_seconds_per_step(shards: Path, work: Path, short: int, long: int) -> float:
    """From the per-step wall-clock stamps the loop writes to logs/losses.jsonl (after each full step)."""
    from brainfm.train.pretrain import pretrain
    from brainfm.train.trainer import LOSS_LOG

    run_dir = pretrain("vae", tiny_2d(shards, work / "ours", long))
    stamps = [json.loads(line)["time"] for line in (run_dir / "logs" / LOSS_LOG).read_text().splitlines()]
    return median_step(stamps, short, long)


def median_step(stamps: list[float], short: int, long: int) -> float:
    """Median interval between consecutive step stamps ``short``..``long`` (1-based step numbers)."""
    return statistics.median(b - a for a, b in zip(stamps[short - 1:long - 1], stamps[short:long], strict=True))


def plain_seconds_per_step(shards: Path, work: Path, short: int, long: int) -> float:
    import torch
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    from brainfm.data.reader import make_dataloader
    from brainfm.models.losses import VAELoss
    from brainfm.models.vae import BrainVAE

    config = tiny_2d(shards, work / "plain", long)
    vae = config.vae
    torch.manual_seed(0)
    model = BrainVAE(spatial_dims=2, **dict(vae.network))
    loss_fn = VAELoss(vae.kl_weight, 0.0, 0.0, None, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, betas=config.optim.betas,
                                  weight_decay=config.optim.weight_decay)
    params = list(model.parameters())
    ema = EMAModel(params, decay=config.train.ema_decay, use_ema_warmup=False, foreach=True)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.optim.warmup_steps, long)
    loader = make_dataloader(shards, "train", mode="2d", batch_size=config.data.batch_size, seed=0,
                             augment=config.data.reader_config())
    stamps = []
    step, epoch = 0, 0
    while step < long:
        loader.set_epoch(epoch)
        for batch in loader:
            recon, mu, sigma = model(batch["image"])
            loss, _ = loss_fn.generator_loss(batch["image"], recon, mu, sigma, None)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            optimizer.step()
            ema.step(params)
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            stamps.append(time.perf_counter())
            if step >= long:
                break
        epoch += 1
    return median_step(stamps, short, long)


MEMORY_CHILD = """
import json, resource, sys, torch
from brainfm.config import PretrainConfig, load_config
from brainfm.models.vae import BrainVAE
from brainfm.models.losses import VAELoss
cfg = load_config(sys.argv[1], PretrainConfig).vae
torch.manual_seed(0)
model = BrainVAE(spatial_dims=3, **dict(cfg.network))
if sys.argv[2] == "1":
    model.enable_gradient_checkpointing()
x = torch.rand(1, 1, 40, 48, 40)
loss_fn = VAELoss(cfg.kl_weight, 0.0, 0.0, None, 3)
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
before = rss_mb()
recon, mu, sigma = model(x)
loss, _ = loss_fn.generator_loss(x, recon, mu, sigma, None)
loss.backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"before_mb": before, "peak_mb": peak}))
"""


def peak_memory_mb(checkpointing: bool) -> dict:
    result = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(REPO / "configs/pretrain/tiny-3d.yaml"),
                             "1" if checkpointing else "0"], capture_output=True, encoding="utf-8", errors="replace", check=True, cwd=REPO)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=Path, default=None, help="tiny shard set (built in a temp dir if absent)")
    parser.add_argument("--steps", type=int, default=20, help="steps timed after the first 5 of each run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved plain/ours rounds")
    args = parser.parse_args()
    import logging

    import torch

    torch.set_num_threads(2)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = args.shards or build_shards(work)
        short, long = 5, 5 + args.steps
        plain, ours = [], []
        for round_ in range(args.rounds):  # interleaved: load from other users hits both sides alike
            plain.append(plain_seconds_per_step(shards, work / f"p{round_}", short, long))
            ours.append(ours_seconds_per_step(shards, work / f"o{round_}", short, long))
    ratios = [o / p for o, p in zip(ours, plain, strict=True)]
    print(f"load average at end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"plain PyTorch loop : {1 / statistics.median(plain):7.2f} steps/s  (rounds: "
          + ", ".join(f"{1 / x:.2f}" for x in plain) + ")")
    print(f"brainfm train loop : {1 / statistics.median(ours):7.2f} steps/s  (rounds: "
          + ", ".join(f"{1 / x:.2f}" for x in ours) + ")")
    print(f"overhead ratio     : {statistics.median(ratios):7.3f}  median of per-round ours/plain seconds per step "
          f"{[round(r, 3) for r in ratios]} (target <= 1.05)")
    off, on = peak_memory_mb(False), peak_memory_mb(True)
    off_delta, on_delta = off["peak_mb"] - off["before_mb"], on["peak_mb"] - on["before_mb"]
    print(f"tiny-3d VAE fwd+bwd peak RSS above start: no checkpointing {off_delta:.0f} MB, "
          f"checkpointing {on_delta:.0f} MB, ratio {on_delta / off_delta:.2f}")
    print(f"(absolute peak RSS {off['peak_mb']:.0f} MB vs {on['peak_mb']:.0f} MB; "
          f"children max {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
