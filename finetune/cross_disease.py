"""Fine-tuning entry point: `brainfm finetune cross`.

Thin on purpose: all logic lives in `brainfm.finetune`. Runs as `python finetune/cross_disease.py --config C` or under
`accelerate launch [--config_file configs/accelerate/X.yaml] finetune/cross_disease.py --config C`.
"""

import sys

from brainfm.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", "cross", *sys.argv[1:]]))
