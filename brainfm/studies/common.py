"""What every study shares: its settings, the demo-built cohort and models, derived shard folders, the
validation-only selection protocol, scoring with intervals, and its Markdown + JSON table.

Selection protocol (validation anatomy only; the test split is never opened while choosing): the healthy
validation subjects are halved by subject (alternately, in subject order, per modality); the first half calibrates
each candidate (z-map statistics and the threshold at the target false-positive rate), the second half measures
the healthy false-positive rate out of sample, and the validation anatomy's SIMULATED-lesion subjects give pooled
AUPRC. A candidate qualifies when its held-out healthy FPR is at most ``fpr_factor`` x the target; the chosen one
is the qualifying candidate with the highest pooled AUPRC (none qualifying: the highest pooled AUPRC among the
candidates whose FPR interval is not wholly above the lowest FPR's interval). Intervals are the
percentile bootstrap over subjects of :mod:`brainfm.evaluation.bootstrap` (through ``MetricAccumulator``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainfm.anomaly.baselines import BASELINE_METHODS, HealthyScan, baseline_score, fit_baselines
from brainfm.anomaly.deviation import eroded_mask, residual_map
from brainfm.anomaly.evaluate import EvalCase, cases_from_shards
from brainfm.anomaly.normative import NormativeCalibration
from brainfm.config import (
    DemoSettings,
    DeviationConfig,
    ReconstructionConfig,
    StudySettings,
    from_dict,
    merge,
    read_yaml,
    resolve_paths,
    to_dict,
)
from brainfm.demo import STAGES, DemoContext, make_context, make_settings
from brainfm.evaluation.bootstrap import BootstrapSettings
from brainfm.evaluation.metrics import MetricAccumulator
from brainfm.evaluation.report import format_number
from brainfm.io import BrainFMInputError, atomic_dir, write_json, write_text
from brainfm.pipeline import BrainFMPipeline

TRAINING_STAGES = ("cohort", "shards", "pretrain vae", "pretrain ldm")
HEADLINE_TYPES = ("tumour", "stroke")  # the lesion kinds the headline claims are about (issue 13 item 6)
QUICK_STUDY: dict[str, Any] = {
    "demo": {"n_val": 6},  # 3 healthy validation subjects calibrate, 3 measure the false-positive rate
    "bootstrap_resamples": 300,
    "t_star": [0.3, 0.5], "inference_steps": [5, 10], "ensemble_sizes": [1, 2], "guidance_scales": [0.0, 1.0, 2.0],
}
MIN_VAL_HEALTHY = 4  # 2 to calibrate (the least a threshold needs) and 2 to measure the false-positive rate


def make_study_settings(quick: bool = False, settings_path: str | os.PathLike | None = None
                        ) -> tuple[StudySettings, DemoSettings]:
    """Study defaults, then the quick preset, then a YAML file's keys (strict); its ``demo`` section overrides the
    demo settings (themselves the demo's defaults or quick preset), relative paths against the file's folder."""
    layers: list[dict[str, Any]] = [to_dict(StudySettings())]
    if quick:
        layers.append(QUICK_STUDY)
    if settings_path is not None:
        path = Path(settings_path)
        override = read_yaml(path)
        if isinstance(override.get("demo"), dict):
            override["demo"] = resolve_paths(DemoSettings, override["demo"], path.absolute().parent)
        layers.append(override)
    where = str(settings_path or "study settings")
    study = from_dict(StudySettings, merge(*layers), where=where)
    # no study reads the demo's site-adaptation split: it is not synthesised unless a settings file asks for it
    demo_layers = [to_dict(make_settings(quick)), {"n_adapt": 0}, study.demo]
    demo = from_dict(DemoSettings, merge(*demo_layers), where=f"{where} (demo)")
    if demo.n_val < MIN_VAL_HEALTHY:
        raise BrainFMInputError(settings_path, f"a study needs demo.n_val >= {MIN_VAL_HEALTHY} healthy validation "
                                               f"subjects (half calibrate, half measure), got {demo.n_val}")
    return study, demo


def build_base(folder: Path, demo: DemoSettings) -> DemoContext:
    """The demo's cohort, shards, VAE and LDM in ``folder`` (its stage functions; complete stages are skipped)."""
    ctx = make_context(folder, demo)
    for name, done, run in STAGES:
        if name not in TRAINING_STAGES:
            continue
        if done(ctx):
            print(f"[study] {name}: complete, skipped", flush=True)
            continue
        print(f"[study] {name} ...", flush=True)
        run(ctx)
    return ctx


# ------------------------------------------------------------------------------------------------ shards
SampleTransform = Callable[[dict[str, Any], dict[str, np.ndarray]], dict[str, np.ndarray] | None]


def derive_shards(source: Path, out: Path, splits: Sequence[str], transform: SampleTransform,
                  description: str) -> Path:
    """A new shard folder with the samples of ``splits`` only (no other split is read), each passed through
    ``transform(meta, arrays)`` (arrays ``image``, ``mask``, ``anatomy`` and ``label`` where present; it returns
    the new arrays, or None to drop the sample). Written whole or not at all; an existing index means complete."""
    from brainfm.data.writer import load_index, sha256_file

    if (out / "index.json").is_file():
        return out
    index = load_index(source)
    missing = [s for s in splits if s not in index["splits"]]
    if missing:
        raise BrainFMInputError(source, f"no split {missing[0]!r} in these shards")
    derived = {k: v for k, v in index.items() if k not in ("splits", "counts", "modalities")}
    derived.update(splits={}, counts={}, modalities={}, derived_from={"shards": str(source), "how": description})
    with atomic_dir(out) as tmp:
        for split in splits:
            entries, metas = [], []
            for entry in index["splits"][split]:
                kept = _derive_shard(source / entry["name"], tmp / entry["name"], entry, transform)
                if kept:
                    keys = [key for key, _ in kept]
                    slices = dict(zip(entry["keys"], entry["slice_brain_voxels"], strict=True))
                    entries.append({"name": entry["name"], "n_samples": len(kept),
                                    "sha256": sha256_file(tmp / entry["name"]),
                                    "bytes": (tmp / entry["name"]).stat().st_size, "keys": keys,
                                    "slice_brain_voxels": [slices[k] for k in keys]})
                    metas += [meta for _, meta in kept]
                else:
                    (tmp / entry["name"]).unlink(missing_ok=True)
            derived["splits"][split] = entries
            derived["counts"][split] = _counts(metas, len(entries))
            derived["modalities"][split] = sorted(derived["counts"][split]["modalities"])
        write_json(tmp / "index.json", derived)
    return out


def _derive_shard(path: Path, target: Path, entry: Mapping[str, Any], transform: SampleTransform
                  ) -> list[tuple[str, dict[str, Any]]]:
    import webdataset as wds

    samples: dict[str, dict[str, bytes]] = {key: {} for key in entry["keys"]}
    with tarfile.open(path) as tar:
        for member in tar:
            key = next((k for k in entry["keys"] if member.name.startswith(k + ".")), None)
            if key is not None and member.isfile():
                samples[key][member.name[len(key) + 1:]] = tar.extractfile(member).read()
    kept: list[tuple[str, dict[str, Any]]] = []
    with wds.TarWriter(str(target)) as writer:
        for key, members in samples.items():
            meta = json.loads(members["meta.json"])
            arrays = {name[:-4]: np.load(io.BytesIO(data)) for name, data in members.items() if name.endswith(".npy")}
            new = transform(meta, arrays)
            if new is None:
                continue
            out = {f"{name}.npy": np.ascontiguousarray(array) for name, array in new.items()}
            meta = {**meta, "anatomy_channels": int(new["anatomy"].shape[0])}
            writer.write({"__key__": key, **out, "meta.json": json.dumps(meta, sort_keys=True).encode()})
            kept.append((key, meta))
    return kept


def _counts(metas: Sequence[Mapping[str, Any]], n_shards: int) -> dict[str, Any]:
    tally: dict[str, Any] = {"n_samples": len(metas), "n_shards": n_shards,
                             "n_subjects": len({m.get("subject") for m in metas}),
                             "modalities": {}, "datasets": {}, "sites": {}}
    for meta in metas:
        for field, column in (("modalities", "modality"), ("datasets", "dataset"), ("sites", "site")):
            value = str(meta.get(column) or "unknown")
            tally[field][value] = tally[field].get(value, 0) + 1
    return tally


# ------------------------------------------------------------------------------------------------ cases
def load_cases(pipeline: BrainFMPipeline, shards: Path, split: str, modality: str | None = None) -> list[EvalCase]:
    """Every scan of ``split`` (of ``modality`` only, if given) on the model grid; a scan that cannot be read
    stops the study rather than shrinking one arm's test set."""
    failures: list[tuple[str, str]] = []
    cases = [c for c in cases_from_shards(pipeline, shards, split, failures)
             if modality is None or str(c.meta["modality"]).upper() == modality.upper()]
    if failures:
        raise BrainFMInputError(shards, f"{len(failures)} scan(s) of split {split!r} failed; first: {failures[0][1]}")
    return cases


@dataclasses.dataclass
class ValidationSets:
    """The validation anatomy's scans, as the selection protocol uses them (see the module docstring)."""

    calibration: list[EvalCase]  # healthy, calibrate
    held_out: list[EvalCase]  # healthy, never calibrated on: the false-positive rate
    lesion: list[EvalCase]  # SIMULATED lesions: AUPRC

    @property
    def scored(self) -> list[EvalCase]:
        return self.held_out + self.lesion


def validation_sets(cases: Sequence[EvalCase]) -> ValidationSets:
    """Halve the healthy scans by subject (alternately, per modality, in subject order)."""
    healthy = [c for c in cases if c.label is None]
    calibration: list[EvalCase] = []
    held_out: list[EvalCase] = []
    for modality in sorted({str(c.meta["modality"]).upper() for c in healthy}):
        subjects = sorted({c.subject or c.name for c in healthy if str(c.meta["modality"]).upper() == modality})
        if len(subjects) < MIN_VAL_HEALTHY:
            raise BrainFMInputError(None, f"the selection needs >= {MIN_VAL_HEALTHY} healthy validation subjects "
                                          f"of {modality}, found {len(subjects)}")
        first = set(subjects[0::2])
        for case in healthy:
            if str(case.meta["modality"]).upper() == modality:
                (calibration if (case.subject or case.name) in first else held_out).append(case)
    lesion = [c for c in cases if c.label is not None]
    if not lesion:
        raise BrainFMInputError(None, "the selection needs SIMULATED-lesion validation subjects (demo.n_val_lesion)")
    return ValidationSets(calibration, held_out, lesion)


# ------------------------------------------------------------------------------------------------ scoring
def ldm_residuals(pipeline: BrainFMPipeline, reconstruction: ReconstructionConfig, cases: Sequence[EvalCase],
                  kind: str) -> list[np.ndarray]:
    """The LDM's residual maps under ``reconstruction`` (the calibration's own computation)."""
    reconstructor = pipeline.reconstructor(vae_only=False, **{f.name: getattr(reconstruction, f.name)
                                                               for f in dataclasses.fields(reconstruction)})
    residuals = []
    for case in cases:
        recon, _ = reconstructor.reconstruct(torch.from_numpy(case.image)[None], torch.from_numpy(case.anatomy),
                                             case.meta)
        residuals.append(residual_map(case.image, recon[0].numpy() * case.mask, case.mask, kind))
    return residuals


def tissue_regions(case: EvalCase) -> np.ndarray:
    """Regions for regional normalisation: each brain voxel's most likely tissue under the scan's own priors
    (1 = CSF/other, 2.. = the prior channels in order), 0 outside the brain."""
    priors = np.asarray(case.anatomy[1:], np.float32)
    rest = np.clip(1.0 - priors.sum(axis=0), 0.0, 1.0)[None]
    regions = np.argmax(np.concatenate([rest, priors]), axis=0).astype(np.int32) + 1
    return np.where(case.mask, regions, 0)


def score_residuals(calibration_residuals: Sequence[np.ndarray], calibration_cases: Sequence[EvalCase],
                    residuals: Sequence[np.ndarray], cases: Sequence[EvalCase], config: DeviationConfig,
                    bootstrap: BootstrapSettings) -> dict[str, Any]:
    """Calibrate per modality on the first scans' residuals, score the others: the evaluation's metrics."""
    regional = config.normalisation == "regional"
    calibrations: dict[str, NormativeCalibration] = {}
    for modality in sorted({_modality(c) for c in cases}):
        chosen = [i for i, c in enumerate(calibration_cases) if _modality(c) == modality]
        calibrations[modality] = NormativeCalibration.fit(
            [calibration_residuals[i] for i in chosen], [calibration_cases[i].mask for i in chosen], config,
            regions=[tissue_regions(calibration_cases[i]) for i in chosen] if regional else None, variants={})
    accumulator = MetricAccumulator(bootstrap=bootstrap)
    for residual, case in zip(residuals, cases, strict=True):
        calibration = calibrations[_modality(case)]
        analysis = calibration.analyse(residual, case.mask, tissue_regions(case) if regional else None)
        _add(accumulator, case, analysis.zmap, analysis.mask, analysis.subject_score, config)
    return accumulator.compute()


def baseline_metrics(calibration_cases: Sequence[EvalCase], cases: Sequence[EvalCase],
                     atlas_cases: Sequence[EvalCase], config: DeviationConfig, bootstrap: BootstrapSettings
                     ) -> dict[str, dict[str, Any]]:
    """The intensity and normative-atlas baselines (atlas from ``atlas_cases``, the training scans), calibrated on
    the same scans as the LDM and scored on the same scans."""
    def healthy(case: EvalCase) -> HealthyScan:
        return HealthyScan(case.image, case.mask, case.anatomy, _modality(case))

    fitted = fit_baselines([healthy(c) for c in calibration_cases], (healthy(c) for c in atlas_cases), config,
                           methods=BASELINE_METHODS)
    metrics = {}
    for method in BASELINE_METHODS:
        accumulator = MetricAccumulator(bootstrap=bootstrap)
        for case in cases:
            entry = fitted.entry(method, _modality(case))
            residual, _ = baseline_score(method, entry, case.image, case.mask, case.anatomy)
            analysis = entry.calibration.analyse(residual, case.mask)
            _add(accumulator, case, analysis.zmap, analysis.mask, analysis.subject_score, config)
        metrics[method] = accumulator.compute()
    return metrics


def _add(accumulator: MetricAccumulator, case: EvalCase, zmap: np.ndarray, predicted: np.ndarray,
         subject_score: float | None, config: DeviationConfig) -> None:
    has_lesion = case.label is not None and bool(case.label.any())
    accumulator.add(zmap, case.label, case.mask, predicted, subject_score,
                    (case.lesion_type or "lesion") if has_lesion else None, case.voxel_volume_ml, scan_id=case.name,
                    subject=case.subject, ignore=case.ignore, fp_region=eroded_mask(case.mask, config.mask_erosion_vox))


def _modality(case: EvalCase) -> str:
    return str(case.meta["modality"]).upper()


# ------------------------------------------------------------------------------------------------ tables
def summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers a study table shows (pooled AUPRC, per headline lesion type, healthy FPR), with intervals."""
    overall, healthy = metrics["overall"], metrics["healthy"]
    row = {"auprc": overall.get("auprc_pooled"), "auprc_ci": (overall.get("ci") or {}).get("auprc_pooled"),
           "auroc": overall.get("auroc_pooled"), "dice": overall.get("dice_pooled"),
           "n_lesion_subjects": overall.get("n_subjects"), "n_healthy_scans": healthy.get("n_scans"),
           "fpr": healthy.get("fp_rate_pooled"), "fpr_ci": (healthy.get("ci") or {}).get("fp_rate_pooled")}
    for kind, group in metrics.get("by_lesion_type", {}).items():
        row[f"auprc_{kind}"] = group.get("auprc_pooled")
        row[f"auprc_{kind}_ci"] = (group.get("ci") or {}).get("auprc_pooled")
    return row


def choose(rows: Mapping[str, Mapping[str, Any]], target_fpr: float, factor: float) -> tuple[str, str]:
    """(chosen name, the rule that chose it) among candidate rows (see the module docstring)."""
    limit = factor * target_fpr
    qualifying = [n for n, r in rows.items() if r["fpr"] is not None and r["fpr"] <= limit]
    if qualifying:
        best = max(qualifying, key=lambda n: (rows[n]["auprc"] or 0.0, -list(rows).index(n)))
        return best, (f"highest pooled validation AUPRC among the candidates whose held-out healthy FPR <= "
                      f"{factor:g} x {target_fpr:g}")
    # None qualifies: the FPR cannot decide between candidates whose FPR intervals overlap (a bare minimum once
    # chose an unconditional setting with a quarter of the AUPRC for an FPR 0.0003 lower), so it only removes those
    # whose interval lies wholly above the lowest candidate's; AUPRC decides among the rest
    lowest = min(rows, key=lambda n: (rows[n]["fpr"] if rows[n]["fpr"] is not None else np.inf, list(rows).index(n)))
    if rows[lowest]["fpr"] is None:
        return lowest, "no candidate has a healthy FPR: the first"
    ceiling = (rows[lowest].get("fpr_ci") or [None, rows[lowest]["fpr"]])[1]
    level = [n for n, r in rows.items() if r["fpr"] is not None and (r.get("fpr_ci") or [r["fpr"]])[0] <= ceiling]
    best = max(level, key=lambda n: (rows[n]["auprc"] or 0.0, -list(rows).index(n)))
    return best, (f"no candidate had held-out healthy FPR <= {factor:g} x {target_fpr:g}: the highest pooled "
                  "validation AUPRC among the candidates whose FPR interval reaches down to the lowest one's")


def separation_note(rows: Mapping[str, Mapping[str, Any]], chosen: str) -> str:
    """Whether the chosen row's pooled-AUPRC interval lies above every other candidate's (a choice a rerun with
    other subjects would repeat) or overlaps some of them (the choice is within noise)."""
    low = (rows[chosen].get("auprc_ci") or [None])[0]
    overlapping = [n for n, r in rows.items() if n != chosen
                   and (low is None or not r.get("auprc_ci") or r["auprc_ci"][1] >= low)]
    if not overlapping:
        return "Its pooled-AUPRC interval lies above every other candidate's."
    return (f"Its pooled-AUPRC interval overlaps {len(overlapping)} of the {len(rows) - 1} other candidates': "
            f"the choice is within noise at this size.")


def cell(value: Any, interval: Sequence[float] | None = None) -> str:
    text = format_number(value, 3)
    if interval:
        text += f" [{format_number(interval[0], 3)}, {format_number(interval[1], 3)}]"
    return text


def markdown_table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[tuple[str, str]], first: str,
                   chosen: str | None = None) -> str:
    """``columns``: (header, key of ``rows``' values; its interval under key + "_ci")."""
    lines = ["| " + " | ".join([first, *(h for h, _ in columns)]) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, row in rows.items():
        label = f"**{name}** (chosen)" if name == chosen else name
        lines.append("| " + " | ".join([label, *(cell(row.get(k), row.get(f"{k}_ci")) for _, k in columns)]) + " |")
    return "\n".join(lines)


STANDARD_COLUMNS = (("pooled AUPRC [95 % CI]", "auprc"), ("tumour AUPRC", "auprc_tumour"),
                    ("stroke AUPRC", "auprc_stroke"), ("healthy FPR", "fpr"))


def write_table(folder: Path, name: str, markdown: str, payload: Mapping[str, Any]) -> tuple[Path, Path]:
    """``folder/name.md`` and ``folder/name.json`` (atomic writes)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / f"{name}.md", markdown.rstrip() + "\n")
    write_json(folder / f"{name}.json", payload)
    return folder / f"{name}.md", folder / f"{name}.json"


def describe(demo: DemoSettings) -> str:
    return (f"{demo.n_train} healthy training subjects ({'+'.join(demo.train_anatomies)}); validation anatomy "
            f"{'+'.join(demo.val_anatomies)} ({demo.n_val} healthy, {demo.n_val_lesion} SIMULATED-lesion subjects); "
            f"test anatomy {'+'.join(demo.test_anatomies)}; {demo.resolution} mm; VAE {demo.vae_steps} and LDM "
            f"{demo.ldm_steps} steps")


__all__ = ["HEADLINE_TYPES", "QUICK_STUDY", "STANDARD_COLUMNS", "ValidationSets", "baseline_metrics", "build_base",
           "choose", "derive_shards", "describe", "ldm_residuals", "load_cases", "make_study_settings",
           "markdown_table", "score_residuals", "separation_note", "summary", "tissue_regions", "validation_sets",
           "write_table"]
