"""``brainfm demo``: the whole method end to end on CPU, with every stage resumable.

synthetic cohort (REAL ICBM152 anatomy, SIMULATED subjects and lesions) → WebDataset shards → VAE pretraining →
latent-diffusion pretraining → model folder → healthy calibration (LDM and VAE baseline, same scans) → evaluation
on simulated lesions of every kind plus healthy test scans → report and results table.

Each stage is skipped when its output is complete (the cohort's manifest, the shard index, a stage's export, the
model's config, the calibration, the metrics), so an interrupted demo continues where it stopped. The settings a
demo folder was made with are stored in it; re-running with other settings into the same folder is refused
rather than silently mixing two experiments.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import time
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
from brainfm.evaluation.report import format_number
from brainfm.io import BrainFMInputError, write_json, write_text

log = logging.getLogger(__name__)

SETTINGS_FILE = "demo_settings.json"


QUICK = {"n_healthy": 10, "n_lesion": 4, "n_val": 2, "n_test_healthy": 2, "vae_steps": 40, "ldm_steps": 40,
         "reconstruction": {"t_star": [0.4], "num_inference_steps": 10, "seeds": [0], "batch_size": 48}}


def make_settings(quick: bool = False, settings_path: str | os.PathLike | None = None) -> DemoSettings:
    """Defaults (full demo), then the quick preset, then a YAML file's keys (strict: unknown keys fail). Relative
    paths in the file, including those in its ``pretrain`` overrides, resolve against the file's folder."""
    layers: list[dict[str, Any]] = [to_dict(DemoSettings())]
    if quick:
        layers.append(QUICK)
    if settings_path is not None:
        path = Path(settings_path)
        folder = path.absolute().parent
        override = resolve_paths(DemoSettings, read_yaml(path), folder)
        if isinstance(override.get("pretrain"), dict):
            override["pretrain"] = resolve_paths(PretrainConfig, override["pretrain"], folder)
        layers.append(override)
    return from_dict(DemoSettings, merge(*layers), where=str(settings_path or "demo settings"))


# ------------------------------------------------------------------------------------------------ stages
def _split_manifest(manifest: Path, settings: DemoSettings) -> Path:
    """The cohort with explicit splits, so calibration and test always get the configured number of scans."""
    with manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    healthy = [r for r in rows if not r.get("label")]
    for i, row in enumerate(healthy):
        row["split"] = "val" if i < settings.n_val else "test" if i < settings.n_val + settings.n_test_healthy \
            else "train"
    for row in rows:
        if row.get("label"):
            row["split"] = "test"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    target = manifest.parent / "demo_manifest.csv"
    write_text(target, buffer.getvalue())
    return target


def _stage(name: str, done: bool, timings: dict[str, float]) -> bool:
    if done:
        print(f"[demo] {name}: complete, skipped")
        timings[name] = 0.0
    else:
        print(f"[demo] {name} ...", flush=True)
    return not done


@dataclasses.dataclass
class DemoResult:
    out: Path
    report: Path
    metrics: dict[str, Any]
    timings: dict[str, float]
    quality_bar: dict[str, bool | None]

    def summary(self) -> str:
        lines = [results_table(self.metrics), ""]
        for kind, passed in self.quality_bar.items():
            verdict = "n/a" if passed is None else ("yes" if passed else "NO")
            lines.append(f"LDM beats VAE baseline on {kind} (pooled AUPRC and Dice@thr): {verdict}")
        lines.append("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in self.timings.items()))
        lines.append(f"report: {self.report}")
        lines.append("Lesions are SIMULATED on real template anatomy: these numbers say nothing about real patients.")
        return "\n".join(lines)


def run_demo(out: str | os.PathLike, quick: bool = False, settings_path: str | os.PathLike | None = None,
             settings: DemoSettings | None = None) -> DemoResult:
    """Run (or resume) the demo in ``out``; see the module docstring."""
    out = Path(out)
    settings = settings or make_settings(quick, settings_path)
    out.mkdir(parents=True, exist_ok=True)
    stored = out / SETTINGS_FILE
    recorded = to_dict(settings)
    if stored.is_file() and json.loads(stored.read_text()) != json.loads(json.dumps(recorded)):
        raise BrainFMInputError(out, "this demo folder was made with other settings; choose a new --out")
    write_json(stored, recorded)
    data_config = load_config(settings.data_config, DataConfig, overrides=settings.data)
    pretrain = load_config(settings.pretrain_config, PretrainConfig, overrides=merge(
        settings.pretrain, {"data": {"shard_dir": str(out / "shards")}, "train": {"output_dir": str(out / "runs")}}))
    import torch

    threads = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        # Intra-op threads + DataLoader workers must not exceed the cores: oversubscribed small convolutions
        # spin-wait, measured 3.5x slower per VAE step on 2 shared cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - pretrain.data.num_workers))
    try:
        return _run_stages(out, settings, data_config, pretrain)
    finally:
        torch.set_num_threads(threads)


def _run_stages(out: Path, settings: DemoSettings, data_config: DataConfig, pretrain: PretrainConfig) -> DemoResult:
    from brainfm.anomaly.calibrate import calibrate
    from brainfm.anomaly.evaluate import evaluate
    from brainfm.data.synthetic import SplitPlan, synthesize_cohort
    from brainfm.data.writer import build_shards
    from brainfm.pipeline import BrainFMPipeline
    from brainfm.train.pretrain import pretrain as train_stage

    timings: dict[str, float] = {}

    def timed(name: str, started: float) -> None:
        timings[name] = time.perf_counter() - started

    cohort = out / "cohort"
    started = time.perf_counter()
    if _stage("cohort", (cohort / "manifest.csv").is_file(), timings):
        synthesize_cohort(cohort, {"": SplitPlan(n_healthy=settings.n_healthy),
                                   "test": SplitPlan(n_lesion=settings.n_lesion)},
                          seed=settings.seed, resolution=settings.resolution)
        timed("cohort", started)
    manifest = _split_manifest(cohort / "manifest.csv", settings)

    shards = out / "shards"
    started = time.perf_counter()
    if _stage("shards", (shards / "index.json").is_file(), timings):
        report = build_shards(manifest, shards, data_config)
        print(report.summary())
        timed("shards", started)

    runs = out / "runs"
    for stage, steps, export in (("vae", settings.vae_steps, runs / "vae" / "vae" / "config.json"),
                                 ("ldm", settings.ldm_steps, runs / "ldm" / "model" / "model_index.json")):
        started = time.perf_counter()
        if _stage(f"pretrain {stage}", export.is_file(), timings):
            # the stage's steps go into its config, so the run's config.yaml records the steps that ran
            stage_config = dataclasses.replace(pretrain, optim=dataclasses.replace(pretrain.optim, max_steps=steps))
            train_stage(stage, stage_config, resume="auto")
            timed(f"pretrain {stage}", started)

    model_dir = out / "model"  # the training export, with the demo's reconstruction settings, calibrated
    started = time.perf_counter()
    if _stage("calibration", (model_dir / "calibration" / "vae_only" / "calibration.json").is_file(), timings):
        pipeline = BrainFMPipeline.from_pretrained(runs / "ldm" / "model")
        pipeline.set_reconstruction(settings.reconstruction)
        calibrate(pipeline, shards, split="val", config=settings.deviation)
        pipeline.save_pretrained(model_dir)
        timed("calibration", started)

    report_dir = out / "report"
    started = time.perf_counter()
    if _stage("evaluation", (report_dir / "metrics.json").is_file() and (report_dir / "report.md").is_file(),
              timings):
        evaluate(BrainFMPipeline.from_pretrained(model_dir), shards, report_dir, compare_vae=True, split="test")
        timed("evaluation", started)
    metrics = json.loads((report_dir / "metrics.json").read_text())
    write_json(model_dir / "metrics.json", metrics)  # `brainfm release --model` picks it up by default
    return DemoResult(out=out, report=report_dir / "report.md", metrics=metrics, timings=timings,
                      quality_bar=quality_bar(metrics))


# ------------------------------------------------------------------------------------------------ results
def _groups(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"all lesions": result["overall"], **result.get("by_lesion_type", {})}


def quality_bar(metrics: dict[str, Any]) -> dict[str, bool | None]:
    """Per lesion kind: does the LDM beat the VAE baseline in pooled voxel AUPRC AND Dice at the healthy-calibrated
    threshold? None where a number is missing."""
    if "ldm" not in metrics or "vae_baseline" not in metrics:
        return {}
    verdicts: dict[str, bool | None] = {}
    ldm, vae = _groups(metrics["ldm"]), _groups(metrics["vae_baseline"])
    for kind in ldm:
        pairs = [(ldm[kind].get(k), vae.get(kind, {}).get(k)) for k in ("auprc_pooled", "dice_pooled")]
        if any(a is None or b is None for a, b in pairs):
            verdicts[kind] = None
        else:
            verdicts[kind] = all(a > b for a, b in pairs)
    return verdicts


def results_table(metrics: dict[str, Any]) -> str:
    """Plain-text table: one row per method and lesion group, plus healthy false positives."""
    methods = metrics if "overall" not in metrics else {"brainfm": metrics}
    columns = ("auprc_pooled", "auroc_pooled", "dice_pooled", "dice_mean", "dice_oracle", "subject_auroc")
    header = f"{'group':<14}{'method':<14}" + "".join(f"{c:>15}" for c in columns)
    lines = [header, "-" * len(header)]
    groups = list(dict.fromkeys(g for result in methods.values() for g in _groups(result)))
    for group in groups:
        for name, result in methods.items():
            values = _groups(result).get(group)
            if values is None:
                continue
            lines.append(f"{group:<14}{name:<14}" + "".join(f"{format_number(values.get(c), 3):>15}" for c in columns))
    lines.append("")
    for name, result in methods.items():
        healthy = result.get("healthy", {})
        lines.append(f"healthy test scans ({healthy.get('n_scans')}), {name}: flagged fraction of brain pooled "
                     f"{format_number(healthy.get('fp_rate_pooled'), 3)}, worst scan {format_number(healthy.get('fp_rate_per_scan_max'), 3)}")
    return "\n".join(lines)
