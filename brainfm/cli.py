"""The ``brainfm`` command: the only argv parser in the project.

Each subcommand is a small ``_add_<name>`` function that declares its arguments and a ``_run_<name>``
handler that turns them into one library call. Library imports happen inside handlers so ``--help`` is fast.
A subcommand may live in a module of its own (``brainfm.cli_adapt``), declared with the helpers every
subcommand shares (``brainfm.cli_common``); this module still builds the one parser and parses argv.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from brainfm.cli_adapt import add_adapt
from brainfm.cli_common import add_overrides, load_config_args, load_pipeline
from brainfm.cli_latents import add_latents
from brainfm.cli_study import add_study
from brainfm.io import BrainFMInputError

log = logging.getLogger("brainfm")


# ------------------------------------------------------------------------------------------------- data
def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="build the cohort and its WebDataset shards")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    synth = data_sub.add_parser(
        "synth",
        help="write a cohort of healthy subjects and SIMULATED lesions built from real anatomies "
             "(ICBM152, OASIS, pydeface's head, FSL's MNI152), in T1/T1CE/T2/FLAIR/PD/CT",
    )
    synth.add_argument("--out", type=Path, required=True, help="output folder (NIfTI files + manifest.csv)")
    synth.add_argument("--subjects", type=int, default=24,
                       help="healthy subjects with a blank split (the shard writer assigns it by subject)")
    synth.add_argument("--lesion-subjects", type=int, default=None,
                       help="subjects with SIMULATED lesions, split 'test' (default: half of --subjects)")
    synth.add_argument("--test-subjects", type=int, default=0, help="healthy subjects in split 'test'")
    synth.add_argument("--anatomies", default="icbm152",
                       help="comma-separated anatomy sources of the --subjects (icbm152, oasis, pydeface, mni152fsl)")
    synth.add_argument("--test-anatomies", default=None,
                       help="comma-separated anatomies of the 'test' split, held out of every other split "
                            "(default: --anatomies, not held out)")
    synth.add_argument("--protocol", action="append", default=None,
                       help="comma-separated contrasts a subject gets (T1, T1CE, T2, FLAIR, PD, CT); repeat the "
                            "flag to cycle protocols over subjects (default: T1)")
    synth.add_argument("--lesion-kinds", default=None,
                       help="comma-separated SIMULATED lesion kinds (tumour, ms, stroke, svd, metastasis; default all)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--resolution", type=int, choices=(1, 2, 3), default=2, help="voxel size in mm")
    synth.add_argument("--workers", type=int, default=1, help="subjects rendered in parallel processes")
    synth.set_defaults(handler=_run_data_synth)

    anatomies = data_sub.add_parser(
        "anatomies", help="check the real anatomy sources (pinned files, sha256) and derive their label maps once")
    anatomies.set_defaults(handler=_run_data_anatomies)

    shards = data_sub.add_parser("shards", help="preprocess a manifest into WebDataset tar shards")
    shards.add_argument("--manifest", type=Path, required=True, help="cohort CSV (column 'path' required)")
    shards.add_argument("--out", type=Path, required=True, help="output folder for shards and index.json")
    shards.add_argument("--config", type=Path, required=True, help="configs/data/<name>.yaml")
    shards.add_argument("--workers", type=int, default=None,
                        help="parallel preprocessing workers (default: the config's shards.workers)")
    add_overrides(shards)
    shards.set_defaults(handler=_run_data_shards)

    add_latents(data_sub)

    manifest = data_sub.add_parser(
        "manifest", help="write the manifest CSV of a public dataset folder as it is distributed",
    )
    manifest.add_argument("--dataset", required=True,
                          choices=("ixi", "brats2021", "atlas2", "mslub", "wmh2017", "oasis3", "cq500", "bids"),
                          help="layout of --root")
    manifest.add_argument("--root", type=Path, required=True, help="the dataset folder, as downloaded/extracted")
    manifest.add_argument("--out", type=Path, required=True,
                          help="manifest CSV to write (paths relative to its folder when under it); files that "
                               "could not be classified go to <out>.unclassified.txt")
    manifest.add_argument("--overwrite", action="store_true", help="replace an existing --out (and its sidecar)")
    manifest.set_defaults(handler=_run_data_manifest)


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def _run_data_synth(args: argparse.Namespace) -> int:
    from brainfm.data.synthetic import LESION_KINDS, SplitPlan, synthesize_cohort

    anatomies = _names(args.anatomies)
    held_out = _names(args.test_anatomies)
    lesion_subjects = args.subjects // 2 if args.lesion_subjects is None else args.lesion_subjects
    splits = {"": SplitPlan(n_healthy=args.subjects, anatomies=anatomies),
              "test": SplitPlan(n_healthy=args.test_subjects, n_lesion=lesion_subjects,
                                anatomies=held_out or anatomies)}
    try:
        manifest = synthesize_cohort(
            args.out, splits, protocols=[_names(p) for p in (args.protocol or ["T1"])],
            lesion_kinds=_names(args.lesion_kinds) or LESION_KINDS, held_out_anatomies=held_out, seed=args.seed,
            resolution=args.resolution, workers=args.workers,
        )
    except ValueError as exc:
        raise BrainFMInputError(None, str(exc)) from exc
    print(f"wrote {manifest}")
    return 0


def _run_data_anatomies(args: argparse.Namespace) -> int:
    from brainfm.data.anatomies import LABEL_NAMES, SOURCES, VENTRICLES, load_anatomy

    for name in SOURCES:
        anatomy = load_anatomy(name, resolution=3)
        volumes = {label: float((anatomy.labels == k).sum()) * anatomy.voxel_ml for k, label in
                   enumerate(LABEL_NAMES)}
        print(f"{name:10s} brain {anatomy.mask.sum() * anatomy.voxel_ml:6.0f} ml, "
              f"skull {'own' if anatomy.has_skull else 'drawn'}, "
              f"ventricles {volumes[LABEL_NAMES[VENTRICLES]]:4.0f} ml, "
              f"cortical GM {volumes['cortical_gm']:4.0f} ml, WM {volumes['wm']:4.0f} ml")
    return 0


def _run_data_shards(args: argparse.Namespace) -> int:
    from brainfm.data.writer import build_shards

    config = load_config_args(args.config, "data", args.overrides, **{"shards.workers": args.workers})
    report = build_shards(args.manifest, args.out, config)
    print(report.summary())
    return 0 if report.n_accepted > 0 else 1


def _run_data_manifest(args: argparse.Namespace) -> int:
    from brainfm.data.datasets import build_manifest

    report = build_manifest(args.dataset, args.root, args.out, overwrite=args.overwrite)
    print(report.summary())
    return 0


# ------------------------------------------------------------------------------------------------- pretrain
def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    pretrain = sub.add_parser(
        "pretrain",
        help="train the VAE, then the latent diffusion model (runs under `accelerate launch` for multi-GPU/node)",
    )
    pretrain.add_argument("stage", choices=("vae", "ldm"), help="which stage to train")
    pretrain.add_argument("--config", type=Path, required=True, help="configs/pretrain/<name>.yaml")
    pretrain.add_argument("--resume", default=None,
                          help="'auto' = newest complete checkpoint of this run (fresh start if none), or a "
                               "checkpoint folder")
    pretrain.add_argument("--output-dir", type=Path, default=None,
                          help="run folder (default: the config's train.output_dir)")
    pretrain.add_argument("--max-steps", type=int, default=None,
                          help="optimizer steps (default: the config's optim.max_steps)")
    add_overrides(pretrain)
    pretrain.set_defaults(handler=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from brainfm.config import require_data
    from brainfm.train.pretrain import pretrain
    from brainfm.train.trainer import end_distributed

    config = load_config_args(args.config, "pretrain", args.overrides,
                   **{"optim.max_steps": args.max_steps, "train.output_dir": args.output_dir})
    require_data(config, str(args.config))  # a missing shard folder is named now, with the file and the key
    # INFO lines (ours and accelerate's per-file checkpoint lines) go to RUN/logs/train.log, not the console
    try:
        run_dir = pretrain(args.stage, config, resume=args.resume)
    finally:
        end_distributed()
    print(f"pretrain {args.stage}: run folder {run_dir}")
    return 0


# ------------------------------------------------------------------------------------------------- release
def _add_release(sub: argparse._SubParsersAction) -> None:
    release = sub.add_parser(
        "release", help="assemble a Hub release folder (safetensors, configs, model card) and optionally push it"
    )
    release.add_argument("--model", required=True, help="calibrated model folder (or Hub repo id)")
    release.add_argument("--out", type=Path, required=True,
                         help="release folder to write: new, empty, or an earlier release (only its files are "
                              "replaced)")
    release.add_argument("--metrics", type=Path, default=None,
                         help="metrics.json of the evaluation (default: MODEL/metrics.json)")
    release.add_argument("--shards", type=Path, default=None, help="shard folder whose index.json describes the data")
    release.add_argument("--head", type=Path, default=None,
                         help="fine-tuned head run folder to ship as the head component (weights, calibrated "
                              "threshold, LoRA adapters); its metrics.json goes on the head's card")
    release.add_argument("--repo-id", default=None, help="Hub repo id ORG/NAME (used in the card and for --push)")
    release.add_argument("--license", default="apache-2.0", help="licence identifier for the card")
    release.add_argument("--push", action="store_true", help="upload to the Hub (token from HF_TOKEN or login)")
    release.add_argument("--private", action="store_true", help="create the Hub repo as private")
    release.set_defaults(handler=_run_release)


def _run_release(args: argparse.Namespace) -> int:
    from brainfm.hub import build_release
    from brainfm.io import check_output_dir
    from brainfm.pipeline import BrainFMPipeline

    if args.push and not args.repo_id:
        raise BrainFMInputError(None, "--push needs --repo-id ORG/NAME")
    check_output_dir(args.out)
    pipeline = BrainFMPipeline.from_pretrained(args.model)
    head_metrics = None
    if args.head is not None:
        pipeline.load_head(args.head)
        head_metrics = next((p for p in (args.head / "metrics.json", args.head.parent / "metrics.json")
                             if p.is_file()), None)
    summary = build_release(
        pipeline, args.out, metrics_path=args.metrics, shards_dir=args.shards, repo_id=args.repo_id,
        license=args.license, push=args.push, private=args.private, head_metrics_path=head_metrics,
    )
    print(summary.summary())
    return 0


# ------------------------------------------------------------------------------------------------- calibrate
def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    calibrate = sub.add_parser(
        "calibrate",
        help="calibrate a model folder's threshold on healthy scans and write the calibrated model folder",
    )
    source = calibrate.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", default=None, help="model folder (or Hub repo id) to calibrate")
    source.add_argument("--run", type=Path, default=None,
                        help="pretraining output dir: shorthand for --model RUN/ldm/model (written by the LDM stage)")
    calibrate.add_argument("--out", type=Path, required=True,
                           help="calibrated model folder to write: new, empty, or one brainfm wrote (may be --model)")
    calibrate.add_argument("--data", type=Path, required=True,
                           help="healthy calibration scans: a shard folder (uses --split) or a manifest CSV")
    calibrate.add_argument("--split", default="val", help="split of --data to calibrate on")
    calibrate.add_argument("--t-star", type=float, nargs="+", default=None,
                           help="noise level(s) as fractions of T; one ensemble member each (default: the model's)")
    calibrate.add_argument("--steps", type=int, default=None,
                           help="sampler grid over [0, T); only steps <= t* run (default: the model's)")
    calibrate.add_argument("--sampler", choices=("ddim", "dpm++"), default=None, help="default: the model's")
    calibrate.add_argument("--seeds", type=int, nargs="+", default=None, help="ensemble seeds (default: the model's)")
    calibrate.add_argument("--target-fpr", type=float, default=0.01,
                           help="fraction of healthy brain voxels flagged at the calibrated threshold")
    calibrate.add_argument("--baselines", action="store_true",
                           help="also calibrate the intensity and normative-atlas baselines (and the prior-fit "
                                "check) on the same healthy scans, for `brainfm evaluate --baselines`")
    calibrate.add_argument("--atlas-split", default="train",
                           help="split of --data whose healthy scans make the normative atlas (with --baselines)")
    calibrate.set_defaults(handler=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    import dataclasses

    from brainfm.anomaly.calibrate import calibrate
    from brainfm.config import DeviationConfig
    from brainfm.io import check_output_dir
    from brainfm.pipeline import BrainFMPipeline, default_device

    check_output_dir(args.out)
    model = args.model if args.run is None else args.run / "ldm" / "model"
    pipeline = BrainFMPipeline.from_pretrained(model).to(default_device())
    overrides = {key: value for key, value in (("t_star", args.t_star), ("num_inference_steps", args.steps),
                                               ("sampler", args.sampler), ("seeds", args.seeds)) if value is not None}
    if overrides:
        try:
            settings = dataclasses.replace(pipeline.reconstruction, **{
                k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
        except ValueError as exc:
            raise BrainFMInputError(None, f"invalid reconstruction settings: {exc}") from exc
        pipeline.set_reconstruction(settings)
    calibration = calibrate(pipeline, args.data, split=args.split, config=DeviationConfig(target_fpr=args.target_fpr),
                            baselines=args.baselines, atlas_split=args.atlas_split)
    pipeline.save_pretrained(args.out)
    print(f"model folder {args.out}: threshold z > {calibration.threshold:.4f} "
          f"(healthy false-positive target {args.target_fpr:g})")
    return 0


# ------------------------------------------------------------------------------------------------- detect
def _add_detect(sub: argparse._SubParsersAction) -> None:
    detect = sub.add_parser("detect", help="pseudo-healthy reconstruction, deviation map and anomaly mask per scan")
    detect.add_argument("--model", required=True, help="model folder (or Hub repo id)")
    detect.add_argument("--input", type=Path, required=True,
                        help="a NIfTI scan, a DICOM series folder, or a manifest CSV (column 'path')")
    detect.add_argument("--out", type=Path, required=True,
                        help="output folder (maps written on the input's grid); a file there that brainfm did not "
                             "write, such as the input or its mask, is never overwritten: detect refuses instead")
    detect.add_argument("--modality", type=str.upper, default=None,
                        help="T1, T1CE, T2, FLAIR, PD or CT (default: the manifest's column; else CT vs MRI is told "
                             "by the intensities and an MRI takes the model's only MRI contrast). A modality the "
                             "intensities contradict is refused")
    detect.add_argument("--mask", type=Path, default=None,
                        help="brain mask of a single input scan (default: the brain is extracted)")
    detect.add_argument("--t1", type=Path, default=None,
                        help="a co-registered T1 of the same subject: the brain of a single non-T1 input is "
                             "extracted on it (a manifest's 't1' column does the same per row)")
    detect.add_argument("--vae-only", action="store_true", help="VAE-reconstruction baseline instead of the LDM")
    detect.add_argument("--head", type=Path, default=None,
                        help="fine-tuned head run folder (brainfm finetune): also write its probability map and mask "
                             "(a model that ships a head uses it without this option)")
    detect.set_defaults(handler=_run_detect)


def _run_detect(args: argparse.Namespace) -> int:
    from brainfm.anomaly.detect import detect_many
    from brainfm.anomaly.inputs import collect_inputs

    inputs, rejected = collect_inputs(args.input, args.modality, args.mask, args.t1)
    pipeline = load_pipeline(args.model, args.head)
    for rejection in rejected:
        print(f"brainfm: error: {rejection.message}", file=sys.stderr)

    def report(item, exc) -> None:
        print(f"brainfm: error: {exc}", file=sys.stderr)

    results, failures = detect_many(pipeline, inputs, args.out, vae_only=args.vae_only, on_error=report,
                                    rejected=rejected)
    for result in results:
        print(f"{result.name}: score {result.subject_score:.3f} (threshold {result.threshold:.3f}), "
              f"{result.anomalous_fraction:.2%} of brain flagged, {result.seconds:.1f} s")
    n_failed = len(rejected) + len(failures)
    print(f"detect: {len(results)} scan(s) written to {args.out}, {n_failed} failed")
    return 1 if n_failed else 0


# ------------------------------------------------------------------------------------------------- evaluate
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser("evaluate", help="voxel/subject metrics on labelled lesion and healthy scans + report")
    evaluate.add_argument("--model", required=True, help="model folder (or Hub repo id)")
    evaluate.add_argument("--manifest", type=Path, required=True,
                          help="CSV with 'path' and optional modality, mask, label, lesion_type, subject, split, "
                               "label_ignore columns (rows without a label are healthy controls), or a shard folder")
    evaluate.add_argument("--split", default="test",
                          help="evaluate the scans of this split (a manifest in which no row names a split is "
                               "evaluated whole)")
    evaluate.add_argument("--out", type=Path, required=True,
                          help="report folder (metrics.json, report.md, PNGs): new, empty, or an earlier report")
    group = evaluate.add_mutually_exclusive_group()
    group.add_argument("--vae-only", action="store_true", help="evaluate the VAE-reconstruction baseline only")
    group.add_argument("--baselines", action="store_true",
                       help="the LDM beside the VAE, intensity and normative-atlas baselines (and the prior-fit "
                            "check); needs a model calibrated with `brainfm calibrate --baselines`")
    evaluate.add_argument("--head", type=Path, default=None,
                          help="fine-tuned head run folder (brainfm finetune): evaluate it too, at its calibrated "
                               "threshold (a model that ships a head is evaluated with it without this option)")
    evaluate.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from brainfm.anomaly.evaluate import FAILURES, evaluate
    from brainfm.evaluation.report import results_markdown
    from brainfm.io import check_output_dir

    check_output_dir(args.out)
    pipeline = load_pipeline(args.model, args.head)
    result = evaluate(pipeline, args.manifest, args.out, vae_only=args.vae_only, baselines=args.baselines,
                      split=args.split)
    print(results_markdown(result.metrics))
    print(f"report: {result.paths['report_md']}")
    if result.failures:
        for _path, error in result.failures:
            print(f"brainfm: error: {error}", file=sys.stderr)
        print(f"evaluate: {len(result.failures)} scan(s) could not be evaluated ({args.out / FAILURES}); the "
              f"metrics cover the others", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------- report
def _add_report(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser("report", help="tables from an evaluation's metrics.json")
    report_sub = report.add_subparsers(dest="report_command", required=True)
    tables = report_sub.add_parser(
        "tables", help="the results tables (every method, 95 %% intervals, verdicts) as Markdown: printed, or "
                       "written between the results markers of a README")
    tables.add_argument("--metrics", type=Path, required=True, help="metrics.json written by brainfm evaluate/demo")
    tables.add_argument("--run", type=Path, default=None,
                        help="the demo's run.json (cohort, timings); default: run.json beside --metrics, if any")
    tables.add_argument("--readme", type=Path, default=None,
                        help="write the tables between the <!-- brainfm:results:begin --> and <!-- "
                             "brainfm:results:end --> lines of this file instead of printing them")
    tables.add_argument("--adaptation", type=Path, default=None,
                        help="the demo's site adaptation before/after (adaptation.json), appended as its own table; "
                             "default: adaptation.json beside --metrics, if any")
    tables.set_defaults(handler=_run_report_tables)


def _run_report_tables(args: argparse.Namespace) -> int:
    from brainfm.evaluation.report import results_markdown, update_readme
    from brainfm.safety import read_json

    metrics = read_json(args.metrics)
    run_path = args.run or args.metrics.parent / "run.json"
    run = read_json(run_path) if args.run is not None or run_path.is_file() else None
    try:
        text = results_markdown(metrics, run)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BrainFMInputError(args.metrics, f"not an evaluation's metrics.json ({exc})") from exc
    adaptation_path = args.adaptation or args.metrics.parent / "adaptation.json"
    if args.adaptation is not None or adaptation_path.is_file():
        from brainfm.evaluation.adaptation import before_after_markdown

        try:  # the site adaptation's own table: before/after on the same test scans, per lesion kind too
            section = before_after_markdown(read_json(adaptation_path))
        except (KeyError, TypeError, AttributeError) as exc:
            raise BrainFMInputError(adaptation_path, f"not a demo's adaptation.json ({exc})") from exc
        text = text.rstrip("\n") + "\n\n" + section.replace("## Site adaptation", "### Site adaptation", 1)
    if args.readme is None:
        print(text, end="")
        return 0
    changed = update_readme(args.readme, text)
    print(f"{args.readme}: results tables {'updated' if changed else 'already up to date'} from {args.metrics}"
          + (f" and {run_path}" if run else "") + (f" and {adaptation_path}" if adaptation_path.is_file() else ""))
    return 0


# ------------------------------------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo", help="end to end on a synthetic cohort (real anatomies, SIMULATED lesions, tested on an anatomy held "
                     "out of training): data, pretraining, calibration, the LDM beside every baseline with 95 %% "
                     "intervals; resumable per stage",
    )
    demo.add_argument("--out", type=Path, required=True, help="demo folder (stages already complete are skipped)")
    demo.add_argument("--quick", action="store_true", help="a few minutes: fewer subjects, tiny training")
    demo.add_argument("--dims", type=int, choices=(2, 3), default=None,
                      help="2: axial slices (default); 3: 3D VAE and LDM on whole volumes of the same scans")
    demo.add_argument("--settings", type=Path, default=None,
                      help="YAML overriding demo settings (see brainfm.config.DemoSettings; its relative "
                           "paths are relative to the file)")
    demo.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from brainfm.demo import run_demo

    result = run_demo(args.out, quick=args.quick, settings_path=args.settings, dims=args.dims)
    print(result.summary())
    return 0


# ------------------------------------------------------------------------------------------------- finetune
def _add_finetune(sub: argparse._SubParsersAction) -> None:
    finetune = sub.add_parser(
        "finetune",
        help="train lesion heads on the frozen model's [scan, pseudo-healthy, z-map]: label-efficiency curve "
             "(semi) or cross-disease matrix (cross)",
    )
    finetune.add_argument("experiment", choices=("semi", "cross"),
                          help="semi: semi-supervised heads vs number of labelled scans; cross: train disease x "
                               "test disease")
    finetune.add_argument("--config", type=Path, required=True, help="configs/finetune/<name>.yaml")
    finetune.add_argument("--resume", default=None, choices=("auto",),
                          help="'auto' = continue unfinished head runs from their newest complete checkpoint, "
                               "skip finished ones")
    finetune.add_argument("--output-dir", type=Path, default=None,
                          help="output folder (default: <train.output_dir>/<experiment>)")
    add_overrides(finetune)
    finetune.set_defaults(handler=_run_finetune)


def _run_finetune(args: argparse.Namespace) -> int:
    from brainfm.finetune.run import run_cross, run_semi
    from brainfm.train.trainer import end_distributed

    config = load_config_args(args.config, "finetune", args.overrides)
    run = run_semi if args.experiment == "semi" else run_cross
    try:  # one trainer per head, all on the process group of the launch
        payload = run(config, resume=args.resume, output_dir=args.output_dir)
    finally:
        end_distributed()
    report = "curve" if args.experiment == "semi" else "matrix"
    out = args.output_dir or Path(config.train.output_dir) / args.experiment
    print(f"finetune {args.experiment}: {len(payload.get('points', payload.get('rows', [])))} entries; "
          f"wrote {out / (report + '.json')}, .md and .png")
    return 0


# ------------------------------------------------------------------------------------------------- config
def _add_config(sub: argparse._SubParsersAction) -> None:
    config = sub.add_parser("config", help="check a config file before a run is queued")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser(
        "check", help="validate a data, pretrain, finetune, demo, protocol or adapt config and print it resolved (YAML, "
                      "absolute paths); exit 2 with a one-line error if it is invalid",
    )
    check.add_argument("file", type=Path, help="the YAML config")
    check.add_argument("--kind", choices=("data", "pretrain", "finetune", "demo", "protocol", "adapt"), default=None,
                       help="config kind (default: inferred from the top-level keys)")
    check.add_argument("--require-data", action="store_true",
                       help="also check that the data it names exists (shard_dir; model and manifest; demo configs)")
    add_overrides(check)
    check.set_defaults(handler=_run_config_check)


def _run_config_check(args: argparse.Namespace) -> int:
    from brainfm.config import CONFIG_KINDS, dump_yaml, infer_kind, read_yaml, require_data

    kind = args.kind or infer_kind(read_yaml(args.file), CONFIG_KINDS, str(args.file))
    config = load_config_args(args.file, kind, args.overrides)
    if args.require_data:
        require_data(config, str(args.file))
    print(f"# {args.file}: a valid {kind} config" + (" (data present)" if args.require_data else ""))
    print(dump_yaml(config), end="")
    return 0


# ------------------------------------------------------------------------------------------------- plan
def _grid(text: str) -> tuple[int, int, int]:
    try:
        sizes = tuple(int(v) for v in text.lower().replace(",", "x").split("x"))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive sizes like 96x112x96, got {text!r}")
    return sizes  # type: ignore[return-value]


def _add_plan(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser(
        "plan", help="memory plan of a pretraining config: parameters, activations per sample, GiB per GPU under "
                     "DDP / ZeRO-2 / ZeRO-3 / FSDP and the largest batch that fits",
    )
    plan.add_argument("--config", type=Path, required=True, help="configs/pretrain/<name>.yaml")
    plan.add_argument("--gpus", type=int, default=8, help="GPUs in the run (shards ZeRO/FSDP states)")
    plan.add_argument("--gpu-mem", type=float, default=80.0, metavar="GIB", help="memory of one GPU in GiB")
    plan.add_argument("--shape", type=_grid, default=None, metavar="XxYxZ",
                      help="shard grid in voxels (default: grid_shape of the config's shard index.json)")
    plan.add_argument("--stage", choices=("vae", "ldm"), action="append", default=None,
                      help="plan only this stage (repeatable; default both)")
    plan.add_argument("--json", type=Path, default=None, help="also write the plan as JSON here")
    add_overrides(plan)
    plan.set_defaults(handler=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    from brainfm.io import check_output_dir, commit_files, write_json
    from brainfm.plan import plan_memory

    config = load_config_args(args.config, "pretrain", args.overrides)
    if args.json is not None:  # refused before the work, never over a file brainfm did not write
        check_output_dir(args.json.parent, [args.json.name], inputs=[args.config])
    result = plan_memory(config, name=str(args.config), grid=args.shape, gpus=args.gpus, gpu_mem_gib=args.gpu_mem,
                         stages=tuple(args.stage or ("vae", "ldm")))
    print(result.summary())
    if args.json is not None:
        commit_files(args.json.parent, {args.json.name: lambda path: write_json(path, result.to_dict())},
                     inputs=[args.config])
    return 0


# ------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brainfm",
        description="Foundation model for unsupervised anomaly detection in brain MRI and CT.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_data, _add_pretrain, _add_calibrate, add_adapt, _add_release, _add_detect, _add_evaluate,
                _add_report, _add_demo, add_study, _add_finetune, _add_config, _add_plan):
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
        from brainfm.train.trainer import LostPeerError

        if isinstance(exc, LostPeerError):  # a multi-process run lost a process: one line per node
            if os.environ.get("LOCAL_RANK", "0") == "0":
                print(f"brainfm: error: {exc}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
