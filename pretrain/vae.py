"""Pretraining entry point for the VAE stage.

Thin on purpose: all logic lives in `brainfm.train`. Runs as `python pretrain/vae.py --config C` or, for
multi-GPU / multi-node / DeepSpeed, `accelerate launch [--config_file configs/accelerate/X.yaml] pretrain/vae.py --config C`.
"""

import sys

from brainfm.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", "vae", *sys.argv[1:]]))
