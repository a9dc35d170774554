"""How close `brainfm plan` is to real memory: measured peak of real training steps vs the planner's prediction.

Each case runs in a FRESH process (``--measure``): it builds the stage's networks as the trainer does, AdamW per
objective, the EMA copy (diffusers ``EMAModel``, foreach), and runs 2 training steps on real tensors with the
real losses (``brainfm.diffusion.objective.diffusion_loss`` for the LDM, ``VAELoss`` + discriminator for the
VAE), clipping, AdamW and EMA updates. What is compared:

- measured, CPU: peak resident set size (``VmHWM``, reset with ``/proc/self/clear_refs`` after the imports)
  minus the resident size just before the networks are built, minus the growth of file-backed pages (library
  code run for the first time, ~25 MB: not tensor memory). glibc is told to serve every allocation of 64 KiB
  or more with its own mmap (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the RSS at once. Kernel
  workspaces that bypass torch's allocator (oneDNN weight reorders) are measured but not predicted.
- measured, CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocated bytes before the build.
- predicted: the single-process figure of ``brainfm.plan`` for the same config, shape and batch = weights and
  buffers + the traced peak of the same two steps on fake tensors (no allocation).

Usage: python benchmarks/plan_memory.py [--device cpu|cuda] [--case NAME ...]   (prints one JSON line per case)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> (config, --set overrides, stage, grid X x Y x Z, batch). Reduced shapes: seconds on one CPU core, yet
# hundreds of MB, so a few MB of allocator noise do not decide the comparison.
CASES: dict[str, tuple[str, list[str], str, tuple[int, int, int], int]] = {
    "ldm-2d-128": ("tiny-2d", ["ldm.unet.channels=[32,64]", "ldm.unet.norm_num_groups=16"], "ldm",
                   (128, 128, 8), 4),
    "vae-3d-48": ("tiny-3d", ["vae.adv_weight=0.01"], "vae", (48, 48, 48), 2),
    "ldm-3d-64-checkpointed": ("tiny-3d", ["train.gradient_checkpointing=true", "ldm.unet.channels=[32,64]",
                                           "ldm.unet.norm_num_groups=16"], "ldm", (64, 64, 64), 2),
}
GPU_CASES: dict[str, tuple[str, list[str], str, tuple[int, int, int], int]] = {
    "ldm-base-2d": ("base-2d", [], "ldm", (192, 224, 192), 8),
    "ldm-base-3d": ("base-3d", [], "ldm", (96, 112, 96), 2),
}


def _config(name: str, overrides: list[str]) -> Any:
    from brainfm.config import PretrainConfig, load_config, parse_overrides

    return load_config(REPO / "configs" / "pretrain" / f"{name}.yaml", PretrainConfig,
                       overrides=parse_overrides(overrides))


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(case: tuple, device: str) -> int:
    """Bytes the training steps of ``case`` added at their peak (see the module docstring)."""
    import torch
    from diffusers.training_utils import EMAModel

    from brainfm import plan
    from brainfm.diffusion.objective import diffusion_loss
    from brainfm.diffusion.schedulers import make_scheduler

    torch.set_num_threads(1)
    torch.manual_seed(0)
    name, overrides, stage, grid, batch_size = case
    config = _config(name, overrides)
    shapes = plan.data_shapes(config, grid)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS
        before = _status("VmRSS")
        file_before = _status("RssFile")
    networks = {k: m.to(device) for k, m in plan.build_networks(config, stage, shapes).items()}
    if config.train.gradient_checkpointing:
        networks["vae" if stage == "vae" else "unet"].enable_gradient_checkpointing()
    groups = plan._optimizer_groups(stage, networks)
    optimizers = [torch.optim.AdamW(g, lr=1e-4) for g in groups]
    ema_params = [p for m in plan._ema_modules(stage, networks) for p in m.parameters()]
    ema = None
    if config.train.ema_decay is not None:
        ema = EMAModel(ema_params, decay=config.train.ema_decay, use_ema_warmup=False, foreach=True)
    ldm = config.ldm
    scheduler = make_scheduler(ldm.noise_scheduler, ldm.num_train_timesteps, ldm.beta_schedule, ldm.prediction_type)
    precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.train.mixed_precision)
    for _ in range(2):
        batch = plan.make_batch(shapes, batch_size, latents=stage == "ldm" and ldm.cache_latents)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.autocast(device, dtype=precision or torch.float32, enabled=precision is not None):
            if stage == "vae":
                losses = plan.step_losses(config, stage, networks, batch)
            else:  # the trainer's objective, not the planner's copy of it
                with torch.no_grad():
                    latents = batch.get("latents")
                    if latents is None:
                        latents = networks["vae (frozen)"].encode_latent(batch["image"]).float()
                conditioner = networks["conditioner"]
                tokens = conditioner.tokenize(batch["meta"], None)
                anatomy = torch.cat([batch["mask"], batch["anatomy"]], dim=1)
                losses = [diffusion_loss(networks["unet"], conditioner, latents, anatomy, tokens, scheduler,
                                         cond_drop_prob=ldm.cond_drop_prob)]
        for loss in losses:
            loss.backward()
        del losses, batch
        for optimizer, group in zip(optimizers, groups, strict=True):
            torch.nn.utils.clip_grad_norm_(group, 1.0, foreach=True)
            optimizer.step()
        if ema is not None:
            ema.step(ema_params)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
    if cuda:
        return torch.cuda.max_memory_allocated() - before
    return _status("VmHWM") - before - (_status("RssFile") - file_before)


def predict(case: tuple) -> dict[str, Any]:
    from brainfm import plan

    name, overrides, stage, grid, batch_size = case
    config = _config(name, overrides)
    shapes = plan.data_shapes(config, grid)
    return {"predicted": plan.single_process_bytes(config, stage, shapes, batch_size)}


def run_case(name: str, device: str = "cpu", timeout: float = 300) -> dict[str, Any]:
    """Measure in a fresh process, predict in this one; ``ratio`` = predicted / measured."""
    cases = {**CASES, **GPU_CASES}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, __file__, "--measure", name, "--device", device], env=env,
                            capture_output=True, encoding="utf-8", errors="replace", timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"measuring {name} failed: {result.stderr[-2000:]}")
    measured = int(result.stdout.strip().splitlines()[-1])
    out = {"case": name, "device": device, "measured": measured, **predict(cases[name])}
    out["ratio"] = out["predicted"] / measured
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--case", nargs="*", default=None, choices=sorted({**CASES, **GPU_CASES}),
                        help="cases to run (default: all for the device)")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: the fresh process
    args = parser.parse_args()
    cases = {**CASES, **GPU_CASES}
    if args.measure is not None:
        print(measure(cases[args.measure], args.device))
        return 0
    names = args.case or list(CASES if args.device == "cpu" else {**CASES, **GPU_CASES})
    for name in names:
        row = run_case(name, args.device)
        print(json.dumps({**row, "measured_mib": round(row["measured"] / 2**20, 1),
                          "predicted_mib": round(row["predicted"] / 2**20, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
