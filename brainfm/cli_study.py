"""``brainfm study {priors,ablate,pooling}``: the arguments and handler of the separate studies (library:
:mod:`brainfm.studies`); ``brainfm.cli`` adds it to the one parser."""

from __future__ import annotations

import argparse
from pathlib import Path

STUDY_HELP = {
    "priors": "conditioning priors (affine / deformable / several templates / none) x z-map normalisation "
              "(voxelwise / regional / global), compared on the validation anatomy only",
    "ablate": "inference settings (t*, steps, ensemble, conditioning, CFG) chosen on the validation anatomy, then "
              "one report on the held-out test anatomy against the strongest baseline",
    "pooling": "one pooled model vs one model per contrast, same steps x batch per contrast, same test scans",
}


def add_study(sub: argparse._SubParsersAction) -> None:
    study = sub.add_parser("study", help="separate studies that write their own tables (not part of the demo); "
                                         "lesions are SIMULATED on real anatomies")
    study.add_argument("name", choices=tuple(STUDY_HELP), help="; ".join(f"{k}: {v}" for k, v in STUDY_HELP.items()))
    study.add_argument("--out", type=Path, required=True,
                       help="study folder (created; re-running resumes; studies priors and ablate share its base "
                            "model in OUT/base)")
    study.add_argument("--settings", type=Path, default=None,
                       help="YAML of study settings (keys of StudySettings; 'demo:' overrides the demo settings)")
    study.add_argument("--quick", action="store_true", help="the demo's quick preset and fewer candidates")
    study.set_defaults(handler=run_study_cmd)


def run_study_cmd(args: argparse.Namespace) -> int:
    from brainfm.studies import run_study
    from brainfm.studies.common import make_study_settings

    study, demo = make_study_settings(args.quick, args.settings)
    run_study(args.name, args.out, study, demo)
    folder = args.out / args.name
    for table in sorted(folder.glob("*.md")):
        print(f"\n{table}:\n{table.read_text(encoding='utf-8')}")
    return 0
