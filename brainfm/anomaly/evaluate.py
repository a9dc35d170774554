"""``brainfm evaluate``: voxel, lesion and subject metrics on labelled lesion scans and healthy controls, with a
report.

Every method — the LDM, the VAE baseline, with ``baselines=True`` the intensity and normative-atlas baselines
(and the prior-fit circularity check, report only), a fine-tuned head — is scored on the same scans at its own
healthy-calibrated threshold, with the same post-processing and metrics, and again under the "unfiltered"
post-processing and (where calibration chose one on validation scans) the small-lesion post-processing. The
healthy false-positive rate is measured over the region the threshold was calibrated on (the eroded brain).
Label values listed in a manifest's ``label_ignore`` column are neither lesion nor background. A scan that cannot
be evaluated is reported (``failures.json``), never silently dropped; in particular a labelled scan whose lesion
vanished in preprocessing is a failure, not a healthy control.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainfm.anomaly.baselines import BASELINE_METHODS, REPORT_ONLY_METHODS
from brainfm.anomaly.deviation import UNFILTERED, eroded_mask
from brainfm.anomaly.inputs import EMPTY_LABEL, check_shard_recipe, model_image
from brainfm.anomaly.normative import NormativeCalibration
from brainfm.anomaly.reuse import ReconstructionStore, reconstruction_fingerprint, scan_digest
from brainfm.data.manifest import read_manifest, sanitize_key
from brainfm.evaluation.lesions import fidelity, fidelity_region
from brainfm.evaluation.operating import REPORTED_FP_RATES
from brainfm.io import BrainFMInputError, atomic_dir, check_output_dir, write_json
from brainfm.pipeline import BrainFMPipeline, scan_meta

log = logging.getLogger(__name__)
FAILURES = "failures.json"
MODEL_METHODS = {"ldm": False, "vae_baseline": True}  # metrics name -> vae_only
SMALL_LESION = "small_lesion"
_VARIANT_KEYS = ("calibrated_threshold", "overall", "by_lesion_type", "healthy", "intervals", "matched_fp")


@dataclasses.dataclass
class EvaluationResult:
    metrics: dict[str, Any]
    paths: dict[str, Path | None]
    failures: list[tuple[str, str]]
    seconds_per_scan: dict[str, float]


@dataclasses.dataclass
class EvalCase:
    """One evaluation scan on the model grid."""

    name: str
    image: np.ndarray  # (X, Y, Z); a multi-channel model's (C, X, Y, Z)
    mask: np.ndarray
    anatomy: np.ndarray
    meta: dict[str, Any]
    label: np.ndarray | None  # None: healthy control without a label map
    lesion_type: str | None
    voxel_volume_ml: float
    subject: str | None = None
    ignore: np.ndarray | None = None  # label voxels excluded from every metric (label_ignore)


def ignore_values(text: Any, where: Any) -> tuple[int, ...]:
    """Label values of a ``label_ignore`` entry ("2", "2;3" or "2 3")."""
    if text in (None, ""):
        return ()
    try:
        return tuple(int(float(v)) for v in str(text).replace(";", " ").replace(",", " ").split())
    except ValueError as exc:
        raise BrainFMInputError(where, f"label_ignore must list integer label values, got {text!r}") from exc


def split_label(raw: np.ndarray, ignored: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None]:
    """(lesion mask, ignored mask or None) of a label map whose values ``ignored`` are neither class."""
    values = np.rint(np.asarray(raw)).astype(np.int64)
    ignore = np.isin(values, ignored) if ignored else None
    lesion = values > 0 if ignore is None else (values > 0) & ~ignore
    return lesion, ignore if ignore is not None and ignore.any() else None


def cases_from_manifest(pipeline: BrainFMPipeline, manifest: Path, failures: list[tuple[str, str]],
                        split: str | None = None) -> Iterator[EvalCase]:
    """The rows of ``split``; a manifest in which no row names a split is one evaluation set (every row). Rows
    with a blank split in a manifest that has splits (e.g. healthy subjects left for the shard writer to assign,
    which may be training scans) are not evaluated."""
    items, rejected = read_manifest(manifest)
    for rejection in rejected:  # a row the manifest reader refused is a failure like any other
        failures.append((rejection.path, rejection.message))
        log.warning("skipping %s", rejection.message)
    if split is not None and any(item.split for item in items):
        skipped = sum(1 for item in items if item.split != split)
        items = [item for item in items if item.split == split]
        log.info("evaluating the %d row(s) of split %r; %d other row(s) left out", len(items), split, skipped)
    for item in items:
        try:
            prepared = pipeline.prepare(item.path, item.modality, item.mask, item.label, meta=item.meta,
                                        t1_path=item.t1)
            scan = prepared.scan
            label = ignore = None
            if item.label is not None:
                label, ignore = split_label(scan.label, ignore_values(item.extra.get("label_ignore"), item.label))
                if not label.any():
                    raise BrainFMInputError(item.label, EMPTY_LABEL)
        except BrainFMInputError as exc:
            failures.append((str(item.path), str(exc)))
            log.warning("skipping %s", exc)
            continue
        yield EvalCase(item.name, scan.image, np.asarray(scan.mask) > 0, prepared.anatomy, prepared.meta, label,
                       item.lesion_type, prepared.voxel_volume_ml, item.subject, ignore)


def cases_from_shards(pipeline: BrainFMPipeline, shard_dir: Path, split: str, failures: list[tuple[str, str]]
                      ) -> Iterator[EvalCase]:
    """Scans already preprocessed (with the model's recipe, checked) and registered when the shards were built."""
    from brainfm.data.reader import make_dataloader

    check_shard_recipe(pipeline, shard_dir)
    voxel_ml = float(np.prod(pipeline.recipe.spacing)) / 1000.0
    loader = make_dataloader(shard_dir, split, mode="3d", batch_size=1, drop_last=False, min_brain_fraction=0.0,
                             on_corrupt="raise")
    for batch in loader:
        meta = batch["meta"][0]
        mask = batch["mask"][0]
        name = str(meta.get("key") or meta.get("subject"))
        label = ignore = None
        if "label" in batch and bool(batch["label_present"][0]):
            label, ignore = split_label(batch["label"][0, 0].numpy(), ignore_values(meta.get("label_ignore"), name))
            if not label.any():
                failures.append((f"{shard_dir} ({split}) {name}", f"{name}: {EMPTY_LABEL}"))
                log.warning("skipping %s: %s", name, EMPTY_LABEL)
                continue
        yield EvalCase(name, model_image(batch["image"][0]),
                       mask[0].numpy() > 0, torch.cat([mask, batch["anatomy"][0]]).numpy().astype(np.float32),
                       scan_meta(meta["modality"], meta, meta.get("scalars") or {}), label,
                       meta.get("lesion_type") or None, voxel_ml, meta.get("subject") or None, ignore)


@dataclasses.dataclass
class _Scored:
    residual: np.ndarray
    reconstruction: np.ndarray | None
    calibration: NormativeCalibration


class _Scorer:
    """One method: its score map (before normalisation), pseudo-healthy image and calibration for a case."""

    def __init__(self, pipeline: BrainFMPipeline, name: str, reuse_dir: Path | None = None) -> None:
        self.pipeline, self.name = pipeline, name
        self.store: ReconstructionStore | None = None
        if name in MODEL_METHODS:
            vae_only = MODEL_METHODS[name]
            self.calibration = pipeline.calibration_for(vae_only)
            self.reconstructor = pipeline.reconstructor(vae_only=vae_only)
            if reuse_dir is not None and not vae_only:  # the diffusion model is the cost; the VAE's is small
                fingerprint = reconstruction_fingerprint(pipeline, self.reconstructor.settings(), vae_only,
                                                         self.calibration.config.residual)
                self.store = ReconstructionStore(reuse_dir, fingerprint)

    def __call__(self, case: EvalCase) -> _Scored:
        if self.name in MODEL_METHODS:
            if self.store is not None:
                digest = scan_digest(case.image, case.mask, case.anatomy, case.meta)
                if (stored := self.store.load(case.name, digest)) is not None:
                    return _Scored(stored[0], stored[1], self.calibration)
            analysis = self.pipeline.analyse(case.image, case.mask, case.anatomy, case.meta,
                                             reconstructor=self.reconstructor, calibration=self.calibration,
                                             source=case.name)
            if self.store is not None:
                self.store.save(case.name, digest, analysis.residual, analysis.reconstruction)
            return _Scored(analysis.residual, analysis.reconstruction, self.calibration)
        baselines = self.pipeline.baselines
        modality = str(case.meta["modality"])
        residual, pseudo = baselines.score(self.name, case.image, case.mask, case.anatomy, modality)
        return _Scored(residual, pseudo, baselines.entry(self.name, modality).calibration)

    def protocol(self) -> dict[str, Any]:
        if self.name in MODEL_METHODS:
            reused = {} if self.store is None else {"reconstructions_reused": self.store.reused}
            return {**self.calibration.protocol(), "reconstruction": json.dumps(self.reconstructor.settings()),
                    **self.calibration.variant_protocol(), **reused}
        entry = next(iter(self.pipeline.baselines.entries[self.name].values()))
        return {**self.pipeline.baselines.protocol(self.name), **entry.calibration.variant_protocol()}


def evaluate(
    pipeline: BrainFMPipeline,
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    vae_only: bool = False,
    baselines: bool = False,
    split: str = "test",
    n_examples: int = 4,
    progress: bool = True,
    reuse_dir: str | os.PathLike | None = None,
) -> EvaluationResult:
    """Score labelled lesion scans and healthy controls; write metrics.json, report.md and figures.

    ``source``: a manifest CSV (its rows of ``split``, or every row when no row names a split; rows without a
    label are healthy controls), or a shard folder whose ``split`` is evaluated from its stored preprocessing. ``baselines`` adds
    the VAE, intensity and normative-atlas baselines (and the prior-fit check), which the model must have been
    calibrated with (``brainfm calibrate --baselines``); a model with a fine-tuned head is scored with it too.
    ``out_dir`` is written as a whole (new, empty, or an earlier brainfm report). ``reuse_dir``: the LDM's
    reconstructions are kept there and read back by a later evaluation of the same scans with the same
    networks and settings (:mod:`brainfm.anomaly.reuse`; the protocol counts ``reconstructions_reused``, and
    ``seconds_per_scan`` then excludes the reused reconstructions).
    """
    from tqdm.auto import tqdm

    from brainfm.evaluation import MetricAccumulator, write_report

    check_output_dir(out_dir)
    source = Path(source)
    names = ["vae_baseline"] if vae_only else ["ldm"]
    if baselines and not vae_only:
        if pipeline.baselines is None:
            raise BrainFMInputError(pipeline.model_dir, "model has no baseline calibration; run `brainfm "
                                                        "calibrate --baselines` first")
        names += ["vae_baseline"] + [m for m in (*BASELINE_METHODS, *REPORT_ONLY_METHODS)
                                     if m in pipeline.baselines.entries]
    reuse = None if reuse_dir is None else Path(reuse_dir)
    scorers = {name: _Scorer(pipeline, name, reuse) for name in names}
    accumulators: dict[str, dict[str, MetricAccumulator]] = {}
    for name in names:
        calibration = _first_calibration(pipeline, name)
        variants = {"default": calibration.threshold, UNFILTERED: calibration.variants.get(UNFILTERED, {}).get(
            "threshold")}
        if calibration.small_lesion_variant is not None:
            variants[SMALL_LESION] = calibration.variants[calibration.small_lesion_variant]["threshold"]
        # the chance level of lesion-wise sensitivity, and the sensitivity at matched healthy false-positive rates
        # (all models at one operating point), go beside the masks a report shows (not the unfiltered ones)
        accumulators[name] = {key: MetricAccumulator(threshold=threshold, chance_level=key != UNFILTERED,
                                                     matched_fp_rates=REPORTED_FP_RATES if key != UNFILTERED else ())
                              for key, threshold in variants.items() if threshold is not None}
    seconds = dict.fromkeys(names, 0.0)
    head = pipeline.head_predictor()
    if head is not None:  # the fine-tuned head on the first method's maps, with its own calibrated threshold
        if head.threshold is None:
            raise BrainFMInputError(head.path, "head is not calibrated (no threshold in its settings)")
        head_accumulator = MetricAccumulator(threshold=head.threshold)
        seconds["head"] = 0.0
        head_seen = _head_subjects(head.info)
        head_skipped: list[str] = []
    examples: list[dict[str, Any]] = []
    example_types: set[str] = set()
    failures: list[tuple[str, str]] = []
    cases = (cases_from_shards(pipeline, source, split, failures) if source.is_dir()
             else cases_from_manifest(pipeline, source, failures, split))
    n_done = 0
    for case in tqdm(cases, desc="evaluate", unit="scan", disable=not progress or None):
        n_done += 1
        has_lesion = case.label is not None and bool(case.label.any())
        lesion_type = (case.lesion_type or "lesion") if has_lesion else None
        kind = lesion_type or "healthy"
        show = kind not in example_types and len(example_types) < n_examples
        if show:
            example_types.add(kind)
        for name in names:
            started = time.perf_counter()
            scored = scorers[name](case)
            seconds[name] += time.perf_counter() - started
            region = eroded_mask(case.mask, scored.calibration.config.mask_erosion_vox)
            quality = None
            if scored.reconstruction is not None:
                quality = _fidelity(case, scored.reconstruction, fidelity_region(region, case.label, case.ignore))
            for key, accumulator in accumulators[name].items():
                calibration = _variant(scored.calibration, key)
                analysis = calibration.analyse(scored.residual, case.mask)
                accumulator.add(analysis.zmap, case.label, case.mask, analysis.mask, analysis.subject_score,
                                lesion_type, case.voxel_volume_ml, scan_id=case.name, subject=case.subject,
                                ignore=case.ignore, fp_region=region, fidelity=quality,
                                modality=case.meta.get("modality"))
                if key == "default" and show and scored.reconstruction is not None and name in MODEL_METHODS:
                    examples.append({"image": _reference(case.image),
                                     "reconstruction": _reference(scored.reconstruction),
                                     "zmap": analysis.zmap, "pred_mask": analysis.mask, "label": case.label,
                                     "threshold": analysis.threshold, "title": f"{case.name} ({kind}) {name}"})
                head_here = key == "default" and head is not None and name == names[0]
                if head_here and sanitize_key(case.subject) in head_seen:
                    head_skipped.append(case.name)  # the head trained or was calibrated on this subject
                elif head_here:
                    started = time.perf_counter()
                    brain = np.asarray(case.mask) > 0
                    probability, head_mask = head.predict(case.image, scored.reconstruction, analysis.zmap * brain,
                                                          brain, case.anatomy, case.meta)
                    seconds["head"] += time.perf_counter() - started  # the head alone; its maps are shared
                    # its false-positive rate over the region its threshold was calibrated on (eroded brain)
                    head_accumulator.add(probability, case.label, case.mask, head_mask, None, lesion_type,
                                         case.voxel_volume_ml, scan_id=case.name, subject=case.subject,
                                         ignore=case.ignore, modality=case.meta.get("modality"),
                                         fp_region=eroded_mask(case.mask, head.deviation.mask_erosion_vox))
    if n_done == 0:
        raise BrainFMInputError(source, "no scan could be evaluated" + (f" ({len(failures)} failed; first: "
                                                                        f"{failures[0][1]})" if failures else ""))
    metrics: dict[str, Any] = {}
    for name in names:
        metrics[name] = accumulators[name]["default"].compute()
        metrics[name]["postprocessing_variants"] = {
            key: {**{k: v for k, v in accumulator.compute(by_modality=False).items() if k in _VARIANT_KEYS},
                  "settings": _variant_settings(_first_calibration(pipeline, name), key)}
            for key, accumulator in accumulators[name].items() if key != "default"}
    per_scan = {name: seconds[name] / n_done for name in names}
    if head is not None:
        if not head_accumulator.records:
            raise BrainFMInputError(source, f"all {len(head_skipped)} scans are of subjects the head was trained or "
                                            "calibrated on: score the head on other subjects (or evaluate without it)")
        metrics["head"] = head_accumulator.compute()
        metrics["head"]["scans_of_head_training_subjects"] = head_skipped  # not scored: the head has seen them
        per_scan["head"] = seconds["head"] / n_done
    dataset = f"{source} (split {split})"
    protocol = {name: {**scorers[name].protocol(), "spacing_mm": list(pipeline.recipe.spacing),
                       "seconds_per_scan": round(per_scan[name], 3), "dataset": dataset,
                       "scans_failed": len(failures)} for name in names}
    if head is not None:
        protocol["head"] = {**head.protocol(), "on_maps_of": names[0],
                            "seconds_per_scan": round(per_scan["head"], 3), "scans_failed": len(failures)}
    if len(protocol) == 1:
        protocol = {**protocol[names[0]], "method": names[0]}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        written = write_report(metrics, protocol, tmp, examples=examples)
        if failures:
            write_json(tmp / FAILURES, [{"path": p, "error": e} for p, e in failures])
    paths = {key: None if path is None else out_dir / Path(path).relative_to(tmp) for key, path in written.items()}
    return EvaluationResult(metrics=metrics, paths=paths, failures=failures, seconds_per_scan=per_scan)


def _reference(volume: np.ndarray) -> np.ndarray:
    """The volume shown for a case: a multi-channel case's reference (first) contrast."""
    return volume[0] if volume.ndim == 4 else volume


def _fidelity(case: EvalCase, reconstruction: np.ndarray, region: np.ndarray) -> dict[str, float | None]:
    """Pseudo-healthy MAE/SSIM of a case; for a multi-channel case the mean over its contrasts."""
    if case.image.ndim != 4:
        return fidelity(case.image * case.mask, reconstruction * case.mask, region)
    each = [fidelity(c * case.mask, r * case.mask, region) for c, r in zip(case.image, reconstruction, strict=True)]
    return {key: None if any(e[key] is None for e in each) else float(np.mean([e[key] for e in each]))
            for key in each[0]}


def _head_subjects(info: dict[str, Any]) -> set[str]:
    """The subjects a head was trained and calibrated on, as its settings record them (``brainfm finetune``)."""
    keys = ("labelled_subjects", "unlabelled_subjects", "calibration_subjects")
    return {sanitize_key(str(s)) for key in keys for s in info.get(key) or []}


def _first_calibration(pipeline: BrainFMPipeline, name: str) -> NormativeCalibration:
    if name in MODEL_METHODS:
        return pipeline.calibration_for(MODEL_METHODS[name])
    return next(iter(pipeline.baselines.entries[name].values())).calibration


def _variant(calibration: NormativeCalibration, key: str) -> NormativeCalibration:
    if key == "default" or (key == SMALL_LESION and calibration.small_lesion_variant is None):
        return calibration
    return calibration.variant(calibration.small_lesion_variant if key == SMALL_LESION else key)


def _variant_settings(calibration: NormativeCalibration, key: str) -> dict[str, Any]:
    name = calibration.small_lesion_variant if key == SMALL_LESION else key
    return {"variant": name, **calibration.variants[name],
            "chosen_on": calibration.small_lesion_selection if key == SMALL_LESION else None}


__all__ = ["EvalCase", "EvaluationResult", "cases_from_manifest", "cases_from_shards", "evaluate",
           "ignore_values", "split_label"]
