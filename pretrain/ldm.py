"""Pretraining entry point for the LDM stage.

Thin on purpose: all logic lives in `brainfm.train`. Runs as `python pretrain/ldm.py --config C` or, for
multi-GPU / multi-node / DeepSpeed, `accelerate launch [--config_file configs/accelerate/X.yaml] pretrain/ldm.py --config C`.
"""

import sys

from brainfm.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", "ldm", *sys.argv[1:]]))
