"""Fine-tuning entry point: `brainfm finetune semi`.

Thin on purpose: all logic lives in `brainfm.finetune`. Runs as `python finetune/semi_supervised.py --config C` or under
`accelerate launch [--config_file configs/accelerate/X.yaml] finetune/semi_supervised.py --config C`.
"""

import sys

from brainfm.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", "semi", *sys.argv[1:]]))
