"""``brainfm data latents``: the arguments and handler of latent shard writing (its library call is
:func:`brainfm.data.latents.write_latent_shards`); ``brainfm.cli`` adds it to the ``data`` subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_latents(data_sub: argparse._SubParsersAction) -> None:
    latents = data_sub.add_parser(
        "latents", help="encode image shards with a trained VAE into latent shards (posterior mean and std) that "
                        "the LDM stage reads with ldm.latent_dir; resumable")
    latents.add_argument("--vae", type=Path, required=True, help="the VAE export (RUN/vae/vae)")
    latents.add_argument("--shards", type=Path, required=True, help="the image shard folder it was trained on")
    latents.add_argument("--out", type=Path, required=True, help="output folder for latent shards and index.json")
    latents.add_argument("--splits", default="train", help="comma-separated splits to encode (default: train)")
    latents.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                         help="storage type of mean and std (float16 halves the disk; the LDM computes in float32)")
    latents.add_argument("--tiled", action="store_true",
                         help="memory-bounded VAE encoder (same values) for volumes too large to encode whole")
    latents.set_defaults(handler=run_latents)


def run_latents(args: argparse.Namespace) -> int:
    from brainfm.data.latents import write_latent_shards

    splits = tuple(part.strip() for part in args.splits.split(",") if part.strip())
    report = write_latent_shards(args.vae, args.shards, args.out, splits=splits, dtype=args.dtype, tiled=args.tiled)
    print(report.summary())
    return 0


__all__ = ["add_latents", "run_latents"]
