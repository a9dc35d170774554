"""``brainfm adapt``: the arguments and handler of the site adaptation subcommand (its library call is
:func:`brainfm.anomaly.adapt.adapt`); ``brainfm.cli`` adds it to the one parser."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from brainfm.cli_common import add_overrides, load_config_args, load_pipeline
from brainfm.io import BrainFMInputError


def add_adapt(sub: argparse._SubParsersAction) -> None:
    adapt = sub.add_parser(
        "adapt", help="adapt a model to a new site from a few healthy scans: recalibration (and LoRA fine-tuning "
                      "of the latent UNet with --steps), checked on held-out subjects of the site",
    )
    adapt.add_argument("--model", required=True, help="model folder (or Hub repo id) to adapt")
    adapt.add_argument("--healthy", type=Path, required=True,
                       help="the site's healthy scans (at least 3, better 5 or more): a manifest CSV (column 'path'; "
                            "subject, modality, mask, age, sex, site optional) or a folder of scan files")
    adapt.add_argument("--split", default=None,
                       help="use only the manifest rows of this split (e.g. the 'adapt' split of `brainfm demo`)")
    adapt.add_argument("--out", type=Path, required=True, help="adapted model folder to write: new, empty, or one "
                                                               "brainfm wrote")
    adapt.add_argument("--steps", type=int, default=None,
                       help="LoRA fine-tuning steps of the latent UNet before recalibrating; 0 = recalibration only "
                            "(default: the config's, and without --config 0)")
    adapt.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default: the config's lora.rank)")
    adapt.add_argument("--eval", type=Path, default=None, dest="eval_manifest",
                       help="labelled lesion scans (and healthy controls) of the site: evaluated before and after")
    adapt.add_argument("--modality", type=str.upper, default=None,
                       help="modality of scans whose manifest row (or folder) does not say (default: the model's "
                            "only one)")
    adapt.add_argument("--target-fpr", type=float, default=None,
                       help="healthy false-positive rate of the new threshold (default: the model's)")
    adapt.add_argument("--run-dir", type=Path, default=None,
                       help="training run, evaluations and the recorded split (default: <out>-adapt)")
    adapt.add_argument("--resume", default=None, choices=("auto",),
                       help="'auto' = continue the fine-tuning from its newest complete checkpoint")
    adapt.add_argument("--config", type=Path, default=None, help="an adapt config YAML (see configs/adapt/)")
    add_overrides(adapt)
    adapt.set_defaults(handler=run_adapt)


def run_adapt(args: argparse.Namespace) -> int:
    from brainfm.anomaly.adapt import adapt
    from brainfm.train.trainer import end_distributed

    if args.steps is not None and args.steps < 0:
        raise BrainFMInputError(None, f"--steps must be >= 0, got {args.steps}")
    config = load_config_args(args.config, "adapt", args.overrides, **{
        "lora.enabled": None if args.steps is None else args.steps > 0, "lora.rank": args.lora_rank,
        "optim.max_steps": args.steps or None, "calibration.target_fpr": args.target_fpr})
    pipeline = load_pipeline(args.model, None)

    def skipped(path: str, message: str) -> None:
        print(f"brainfm: skipped: {message}", file=sys.stderr)

    try:
        result = adapt(pipeline, args.healthy, args.out, config=config, modality=args.modality, split=args.split,
                       eval_manifest=args.eval_manifest, run_dir=args.run_dir, resume=args.resume, on_skip=skipped)
    finally:
        end_distributed()
    print(result.summary())
    return 0


__all__ = ["add_adapt", "run_adapt"]
