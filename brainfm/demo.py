"""``brainfm demo``: the whole method end to end on CPU, with every stage resumable.

synthetic cohort (REAL anatomies, SIMULATED subjects and lesions; training, validation and test subjects from
different anatomies, the test anatomy held out of training, validation and the conditioning priors) → WebDataset
shards → VAE pretraining → latent-diffusion pretraining → model folder → healthy calibration of the LDM and every
baseline (VAE, intensity, normative atlas from the training scans, the prior-fit check) and the small-lesion
post-processing chosen on validation lesions → evaluation of every method on the held-out anatomy's simulated
lesions and healthy scans, with 95 % intervals → report, metrics and ``run.json`` (what ran, how long, the load).
``dims=3`` (``brainfm demo --dims 3``) runs the same stages on the same cohort and test scans with a 3D VAE and a 3D
LDM on whole volumes (``configs/pretrain/demo-3d.yaml``).

One function per stage (``stage_*``): each is skipped when its output is complete (the cohort's manifest, the
shard index, a stage's export, the calibrated model, the metrics), so an interrupted demo continues where it
stopped, and a later stage (more contrasts, site adaptation) slots in as one more function. The settings a demo
folder was made with are stored in it; re-running with other settings into the same folder is refused rather than
silently mixing two experiments.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from brainfm.config import (
    DataConfig,
    DemoSettings,
    PretrainConfig,
    from_dict,
    load_config,
    merge,
    read_yaml,
    resolve_paths,
    to_dict,
)
from brainfm.io import BrainFMInputError, commit_files, write_json

log = logging.getLogger(__name__)

SETTINGS_FILE = "demo_settings.json"
TIMINGS_FILE = "timings.json"
PEAK_RSS_FILE = "peak_rss.json"
RUN_FILE = "run.json"


QUICK = {"n_train": 6, "n_val": 2, "n_val_lesion": 3, "n_test_healthy": 2, "n_test_lesion": 6, "vae_steps": 40,
         "ldm_steps": 40, "adapt_steps": 20,
         "reconstruction": {"t_star": [0.4], "num_inference_steps": 10, "seeds": [0], "batch_size": 48}}
# `--dims 3`: whole volumes on the same cohort, shards and test scans as the 2D demo (the quick preset applies on top)
DIMS_3 = {"dims": 3, "pretrain_config": str(Path(__file__).resolve().parents[1] / "configs/pretrain/demo-3d.yaml"),
          "vae_steps": 500, "ldm_steps": 800}


def make_settings(quick: bool = False, settings_path: str | os.PathLike | None = None,
                  dims: int | None = None) -> DemoSettings:
    """Defaults (full 2D demo), the 3D preset when ``dims`` (or the file's ``dims``) is 3, then the quick preset,
    then a YAML file's keys (strict: unknown keys fail). Relative paths in the file, including those in its
    ``pretrain`` overrides, resolve against the file's folder."""
    override: dict[str, Any] = {}
    if settings_path is not None:
        path = Path(settings_path)
        folder = path.absolute().parent
        override = resolve_paths(DemoSettings, read_yaml(path), folder)
        if isinstance(override.get("pretrain"), dict):
            override["pretrain"] = resolve_paths(PretrainConfig, override["pretrain"], folder)
        if dims is not None and override.get("dims", dims) != dims:
            raise BrainFMInputError(path, f"says dims: {override['dims']} but --dims {dims} was given")
    dims = dims or override.get("dims") or 2
    layers: list[dict[str, Any]] = [to_dict(DemoSettings())]
    if dims == 3:
        layers.append(DIMS_3)
    if quick:
        layers.append(QUICK)
    layers.append(override)
    return from_dict(DemoSettings, merge(*layers), where=str(settings_path or "demo settings"))


@dataclasses.dataclass
class DemoResult:
    out: Path
    report: Path
    metrics: dict[str, Any]
    timings: dict[str, float]

    def summary(self) -> str:
        from brainfm.evaluation.report import results_markdown

        run = json.loads((self.report.parent / RUN_FILE).read_bytes())
        lines = [results_markdown(self.metrics, run)]
        if (adaptation := self.report.parent / ADAPTATION_FILE).is_file():
            from brainfm.evaluation.adaptation import before_after_line

            lines.append(before_after_line(json.loads(adaptation.read_bytes())))
        lines.append("stage seconds (this invocation): " + ", ".join(f"{k} {v:.0f}" for k, v in self.timings.items()))
        lines.append(f"report: {self.report}; README tables: brainfm report tables --metrics "
                     f"{self.report.parent / 'metrics.json'} --readme README.md")
        lines.append("Lesions are SIMULATED on real template anatomy: these numbers say nothing about real patients.")
        return "\n".join(lines)


@dataclasses.dataclass
class DemoContext:
    """What every stage reads: the folder, the settings and the two configs they resolve to."""

    out: Path
    settings: DemoSettings
    data_config: DataConfig
    pretrain: PretrainConfig

    @property
    def manifest(self) -> Path:
        return self.out / "cohort" / "manifest.csv"

    @property
    def shards(self) -> Path:
        return self.out / "shards"

    @property
    def reconstructions(self) -> Path:  # the evaluation's test reconstructions, read back by site adaptation
        return self.out / "reconstructions"

    @property
    def model(self) -> Path:  # the training export with the demo's reconstruction settings, calibrated
        return self.out / "model"

    @property
    def report(self) -> Path:
        return self.out / "report"


def run_demo(out: str | os.PathLike, quick: bool = False, settings_path: str | os.PathLike | None = None,
             settings: DemoSettings | None = None, dims: int | None = None) -> DemoResult:
    """Run (or resume) the demo in ``out``; see the module docstring. ``dims=3`` trains the 3D VAE and LDM on
    whole volumes of the same cohort (``configs/pretrain/demo-3d.yaml``)."""
    ctx = make_context(out, settings or make_settings(quick, settings_path, dims))
    import torch

    threads = torch.get_num_threads()
    try:
        return run_stages(ctx)
    finally:
        torch.set_num_threads(threads)


PRETRAIN_STAGES = ("pretrain vae", "pretrain ldm")  # their DataLoader workers run beside the intra-op threads


def stage_threads(ctx: DemoContext, stage: str) -> int | None:
    """Intra-op threads for a stage (None: ``OMP_NUM_THREADS`` decides). Training: the cores less its DataLoader
    workers (oversubscribed small convolutions spin-wait, measured 3.5x slower per VAE step on 2 shared cores);
    every other stage has the cores to itself (the shard writer's worker processes run one thread each)."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    cores = os.cpu_count() or 1
    return max(1, cores - ctx.pretrain.data.num_workers) if stage in PRETRAIN_STAGES else cores


def make_context(out: str | os.PathLike, settings: DemoSettings) -> DemoContext:
    """The demo folder (created) with its settings recorded, and the configs they resolve to; a folder made with
    other settings is refused rather than silently mixing two experiments (studies build on this too), and so are
    settings whose training config trains models of other dimensions than ``settings.dims``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_config = load_config(settings.data_config, DataConfig, overrides=settings.data)
    pretrain = load_config(settings.pretrain_config, PretrainConfig, overrides=merge(
        settings.pretrain, {"data": {"shard_dir": str(out / "shards")}, "train": {"output_dir": str(out / "runs")}}))
    if pretrain.spatial_dims != settings.dims:
        raise BrainFMInputError(settings.pretrain_config, f"trains {pretrain.spatial_dims}D models but the demo "
                                                          f"settings say dims: {settings.dims}")
    stored = out / SETTINGS_FILE
    recorded = to_dict(settings)
    if stored.is_file() and json.loads(stored.read_bytes()) != json.loads(json.dumps(recorded)):
        raise BrainFMInputError(out, "this demo folder was made with other settings; choose a new --out")
    write_json(stored, recorded)
    return DemoContext(out, settings, data_config, pretrain)


# ------------------------------------------------------------------------------------------------ stages
def stage_cohort(ctx: DemoContext) -> None:
    """Training, validation and test subjects, each split from its own anatomies (test: held out)."""
    from brainfm.data.synthetic import SplitPlan, synthesize_cohort

    s = ctx.settings
    splits = {
        "train": SplitPlan(n_healthy=s.n_train, anatomies=s.train_anatomies),
        "val": SplitPlan(n_healthy=s.n_val, n_lesion=s.n_val_lesion, anatomies=s.val_anatomies),
        "test": SplitPlan(n_healthy=s.n_test_healthy, n_lesion=s.n_test_lesion, anatomies=s.test_anatomies),
    }
    if s.n_adapt:  # the site-adaptation stage's healthy scans: the held-out anatomy, other subjects than the test's
        splits["adapt"] = SplitPlan(n_healthy=s.n_adapt, anatomies=s.test_anatomies)
    synthesize_cohort(ctx.out / "cohort", splits, protocols=s.protocols, lesion_kinds=s.lesion_kinds,
                      held_out_anatomies=s.test_anatomies, held_out_splits=("test", "adapt"), seed=s.seed,
                      resolution=s.resolution, workers=min(2, os.cpu_count() or 1))


def stage_shards(ctx: DemoContext) -> None:
    from brainfm.data.writer import build_shards

    print(build_shards(ctx.manifest, ctx.shards, ctx.data_config).summary())


def stage_pretrain(ctx: DemoContext, stage: str) -> None:
    from brainfm.train.pretrain import pretrain as train_stage

    steps = ctx.settings.vae_steps if stage == "vae" else ctx.settings.ldm_steps
    # the stage's steps go into its config, so the run's config.yaml records the steps that ran
    config = dataclasses.replace(ctx.pretrain, optim=dataclasses.replace(ctx.pretrain.optim, max_steps=steps))
    train_stage(stage, config, resume="auto")


def stage_calibrate(ctx: DemoContext) -> None:
    """Calibrate the LDM and every baseline on the validation anatomy's healthy scans (the atlas from the
    training scans); its small-lesion validation scans choose the small-lesion post-processing."""
    from brainfm.anomaly.calibrate import calibrate
    from brainfm.pipeline import BrainFMPipeline

    pipeline = BrainFMPipeline.from_pretrained(ctx.out / "runs" / "ldm" / "model")
    pipeline.set_reconstruction(ctx.settings.reconstruction)
    calibrate(pipeline, ctx.shards, split="val", config=ctx.settings.deviation, baselines=True, atlas_split="train")
    pipeline.save_pretrained(ctx.model)


def stage_evaluate(ctx: DemoContext) -> None:
    from brainfm.anomaly.evaluate import evaluate
    from brainfm.pipeline import BrainFMPipeline

    evaluate(BrainFMPipeline.from_pretrained(ctx.model), ctx.shards, ctx.report, baselines=True, split="test",
             reuse_dir=ctx.reconstructions)
    metrics = json.loads((ctx.report / "metrics.json").read_bytes())
    write_json(ctx.model / "metrics.json", metrics)  # `brainfm release --model` picks it up by default


ADAPTED_METHOD = "ldm_site_adapted"  # the adapted model's results beside the others in report/metrics.json
ADAPTATION_FILE = "adaptation.json"  # report/: before/after of the site adaptation (written last: stage complete)


def stage_adapt(ctx: DemoContext) -> None:
    """Site adaptation (:func:`brainfm.anomaly.adapt.adapt`) of the calibrated model to the held-out anatomy from
    the cohort's ``adapt`` split (its healthy subjects, none a test subject): recalibration, after ``adapt_steps``
    LoRA steps when set; then the test split evaluated again. The adapted model's results join report/metrics.json
    as :data:`ADAPTED_METHOD`, report.md gains the before/after section, report/adaptation.json holds both."""
    from brainfm.anomaly.adapt import adapt
    from brainfm.anomaly.evaluate import evaluate
    from brainfm.config import AdaptConfig
    from brainfm.evaluation.adaptation import before_after, before_after_markdown
    from brainfm.pipeline import BrainFMPipeline

    s = ctx.settings
    training = {"lora": {"enabled": True}, "optim": {"max_steps": s.adapt_steps}} if s.adapt_steps else {}
    config = from_dict(AdaptConfig, merge(to_dict(AdaptConfig()), s.adapt, training), where="demo settings: adapt")
    model = ctx.out / "model-adapted"
    started = time.perf_counter()
    result = adapt(BrainFMPipeline.from_pretrained(ctx.model), ctx.manifest, model, config=config, split="adapt",
                   run_dir=ctx.out / "adaptation", progress=False)
    seconds = time.perf_counter() - started  # what a site pays: the adaptation, not the test evaluation after it
    # without LoRA steps the networks are the foundation's: its test reconstructions are read back, not rerun
    evaluation = evaluate(BrainFMPipeline.from_pretrained(model), ctx.shards, ctx.out / "report-adapted",
                          split="test", progress=False, reuse_dir=ctx.reconstructions)
    commit_files(model, {"metrics.json": lambda target: write_json(target, evaluation.metrics)})
    metrics = json.loads((ctx.report / "metrics.json").read_bytes())
    metrics[ADAPTED_METHOD] = evaluation.metrics["ldm"]
    summary = {"method": ADAPTED_METHOD, "model": model.name, "seconds": round(seconds, 1), "record": result.record,
               "test": before_after(metrics["ldm"], metrics[ADAPTED_METHOD])}
    report = (ctx.report / "report.md").read_text(encoding="utf-8")
    report = report.split("\n## Site adaptation", 1)[0].rstrip("\n") + "\n\n" + before_after_markdown(summary)
    commit_files(ctx.report, {"metrics.json": lambda target: write_json(target, metrics),
                              "report.md": lambda target: target.write_text(report, encoding="utf-8"),
                              ADAPTATION_FILE: lambda target: write_json(target, summary)})


STAGES: tuple[tuple[str, Callable[[DemoContext], bool], Callable[[DemoContext], None]], ...] = (
    ("cohort", lambda c: c.manifest.is_file(), stage_cohort),
    ("shards", lambda c: (c.shards / "index.json").is_file(), stage_shards),
    ("pretrain vae", lambda c: (c.out / "runs" / "vae" / "vae" / "config.json").is_file(),
     lambda c: stage_pretrain(c, "vae")),
    ("pretrain ldm", lambda c: (c.out / "runs" / "ldm" / "model" / "model_index.json").is_file(),
     lambda c: stage_pretrain(c, "ldm")),
    ("calibration", lambda c: (c.model / "calibration" / "baselines" / "baselines.json").is_file(), stage_calibrate),
    ("evaluation", lambda c: (c.report / "metrics.json").is_file() and (c.report / "report.md").is_file(),
     stage_evaluate),
    ("site adaptation", lambda c: not c.settings.n_adapt or (c.report / ADAPTATION_FILE).is_file(), stage_adapt),
)


def run_stages(ctx: DemoContext) -> DemoResult:
    """Every stage in order, skipping complete ones; each completed stage's seconds go to ``timings.json`` and its
    peak resident memory (this process's, in MB) to ``peak_rss.json``."""
    import torch

    timings: dict[str, float] = {}
    load_before = _load()
    recorded_path, peaks_path = ctx.out / TIMINGS_FILE, ctx.out / PEAK_RSS_FILE
    recorded = json.loads(recorded_path.read_bytes()) if recorded_path.is_file() else {}
    peaks = json.loads(peaks_path.read_bytes()) if peaks_path.is_file() else {}
    for name, done, run in STAGES:
        if done(ctx):
            print(f"[demo] {name}: complete, skipped")
            timings[name] = 0.0
            continue
        print(f"[demo] {name} ...", flush=True)
        if (threads := stage_threads(ctx, name)) is not None:
            torch.set_num_threads(threads)
        reset = _reset_peak_rss()
        started = time.perf_counter()
        run(ctx)
        timings[name] = recorded[name] = time.perf_counter() - started
        peaks[name] = _peak_rss_mb(reset)
        write_json(recorded_path, recorded)
        write_json(peaks_path, peaks)
    write_run(ctx, recorded, load_before, peaks)
    metrics = json.loads((ctx.report / "metrics.json").read_bytes())
    return DemoResult(out=ctx.out, report=ctx.report / "report.md", metrics=metrics, timings=timings)


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter of this process (Linux: ``clear_refs`` 5), so the next reading is one
    stage's peak; False where that is not possible (the reading is then the process's peak so far)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb(reset: bool) -> float | None:
    """Peak resident memory in MB since the last reset (``VmHWM``), else of the whole process (``ru_maxrss``)."""
    if reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    scale = 1 / 1024 if os.uname().sysname == "Linux" else 1 / 2**20  # kB on Linux, bytes on macOS
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, 1)


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def write_run(ctx: DemoContext, timings: dict[str, float], load_before: list[float] | None,
              peak_rss_mb: dict[str, float | None] | None = None) -> None:
    """``report/run.json``: what the demo ran (cohort, anatomies, steps), how long each stage took when it ran and
    the machine's load, for the README's tables (``brainfm report tables``)."""
    s = ctx.settings
    total = sum(timings.values())
    description = (
        f"`brainfm demo` ({s.n_train} healthy training subjects from {'+'.join(s.train_anatomies)}; calibration on "
        f"{s.n_val} healthy and small-lesion choice on {s.n_val_lesion} SIMULATED-lesion subjects from "
        f"{'+'.join(s.val_anatomies)}; test on {s.n_test_lesion} SIMULATED-lesion and {s.n_test_healthy} healthy "
        f"subjects of the held-out anatomy {'+'.join(s.test_anatomies)}; one pooled model of "
        f"{', '.join(sorted({m for p in s.protocols for m in p}))} (each subject scanned with "
        f"{' or '.join('+'.join(p) for p in s.protocols)}) at {s.resolution} mm, "
        f"{'2D models on axial slices' if s.dims == 2 else '3D models on whole volumes'}; VAE "
        f"{s.vae_steps} and LDM {s.ldm_steps} steps; t* {list(s.reconstruction.t_star)}, "
        f"{s.reconstruction.num_inference_steps}-step grid, {len(s.reconstruction.seeds)} seed(s); threshold at "
        f"{s.deviation.target_fpr:.0%} healthy FPR; "
        + (f"site adaptation to the held-out anatomy on {s.n_adapt} of its healthy subjects (none a test subject; "
           f"{s.adapt_steps} LoRA steps, then recalibration); " if s.n_adapt else "")
        + f"{os.cpu_count()} CPU cores, load average "
        f"{load_before} at the start, {_load()} at the end).")
    run = {
        "description": description,
        "wall_time": f"{int(total // 60)} min {int(total % 60)} s",
        "stages": ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()),
        "timings_s": timings, "peak_rss_mb": peak_rss_mb or {}, "dims": s.dims, "cpu_count": os.cpu_count(),
        "load_average": {"start": load_before, "end": _load()},
        "settings": to_dict(s),
    }
    commit_files(ctx.report, {RUN_FILE: lambda target: write_json(target, run)})  # recorded as brainfm's file
