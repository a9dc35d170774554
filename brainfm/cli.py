"""The ``brainfm`` command: the only argv parser in the project.

Each subcommand is a small ``_add_<name>`` function that declares its arguments and a ``_run_<name>``
handler that turns them into one library call. Library imports happen inside handlers so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from brainfm.io import BrainFMInputError

log = logging.getLogger("brainfm")


# ------------------------------------------------------------------------------------------------- data
def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="build the cohort and its WebDataset shards")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    synth = data_sub.add_parser(
        "synth",
        help="write a cohort of healthy subjects and SIMULATED lesions built from the real ICBM152 template",
    )
    synth.add_argument("--out", type=Path, required=True, help="output folder (NIfTI files + manifest.csv)")
    synth.add_argument("--subjects", type=int, default=24, help="number of healthy subjects")
    synth.add_argument("--lesion-subjects", type=int, default=None,
                       help="number of subjects with simulated lesions (default: half of --subjects)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--resolution", type=int, choices=(1, 2), default=2, help="template resolution in mm")
    synth.add_argument("--ct-fraction", type=float, default=0.0,
                       help="fraction of subjects rendered as CT-like (Hounsfield units) instead of T1")
    synth.set_defaults(handler=_run_data_synth)

    shards = data_sub.add_parser("shards", help="preprocess a manifest into WebDataset tar shards")
    shards.add_argument("--manifest", type=Path, required=True, help="cohort CSV (column 'path' required)")
    shards.add_argument("--out", type=Path, required=True, help="output folder for shards and index.json")
    shards.add_argument("--config", type=Path, required=True, help="configs/data/<name>.yaml")
    shards.add_argument("--workers", type=int, default=None, help="parallel preprocessing workers")
    shards.set_defaults(handler=_run_data_shards)


def _run_data_synth(args: argparse.Namespace) -> int:
    from brainfm.data.synthetic import synthesize_cohort

    manifest = synthesize_cohort(
        args.out,
        n_healthy=args.subjects,
        n_lesion=args.lesion_subjects,
        seed=args.seed,
        resolution=args.resolution,
        ct_fraction=args.ct_fraction,
    )
    print(f"wrote {manifest}")
    return 0


def _run_data_shards(args: argparse.Namespace) -> int:
    from brainfm.config import DataConfig, load_config
    from brainfm.data.shards import build_shards

    config = load_config(args.config, DataConfig)
    report = build_shards(args.manifest, args.out, config, workers=args.workers)
    print(report.summary())
    return 0 if report.n_accepted > 0 else 1


# ------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brainfm",
        description="Foundation model for unsupervised anomaly detection in brain MRI and CT.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_data,):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.handler(args) or 0)
    except BrainFMInputError as exc:
        print(f"brainfm: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # config errors and the like: one line, not a traceback
        from brainfm.config import ConfigError

        if isinstance(exc, ConfigError | FileNotFoundError):
            print(f"brainfm: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
