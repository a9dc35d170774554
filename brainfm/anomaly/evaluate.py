"""``brainfm evaluate``: voxel and subject metrics on labelled lesion scans and healthy controls, with a report.

Each method (the LDM, the VAE baseline, a fine-tuned head) is scored at its own healthy-calibrated threshold. A
scan that cannot be evaluated is reported (``failures.json``), never silently dropped; in particular a labelled
scan whose lesion vanished in preprocessing is a failure, not a healthy control.
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

from brainfm.anomaly.inputs import EMPTY_LABEL, check_shard_recipe
from brainfm.data.manifest import read_manifest
from brainfm.io import BrainFMInputError, atomic_dir, check_output_dir, write_json
from brainfm.pipeline import BrainFMPipeline, scan_meta

log = logging.getLogger(__name__)
FAILURES = "failures.json"


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
    image: np.ndarray
    mask: np.ndarray
    anatomy: np.ndarray
    meta: dict[str, Any]
    label: np.ndarray | None  # None: healthy control without a label map
    lesion_type: str | None
    voxel_volume_ml: float


def cases_from_manifest(pipeline: BrainFMPipeline, manifest: Path, failures: list[tuple[str, str]]
                        ) -> Iterator[EvalCase]:
    items, rejected = read_manifest(manifest)
    for rejection in rejected:  # a row the manifest reader refused is a failure like any other
        failures.append((rejection.path, rejection.message))
        log.warning("skipping %s", rejection.message)
    for item in items:
        try:
            prepared = pipeline.prepare(item.path, item.modality, item.mask, item.label, meta=item.meta,
                                        t1_path=item.t1)
            scan = prepared.scan
            label = None if item.label is None else np.asarray(scan.label) > 0
            if label is not None and not label.any():
                raise BrainFMInputError(item.label, EMPTY_LABEL)
        except BrainFMInputError as exc:
            failures.append((str(item.path), str(exc)))
            log.warning("skipping %s", exc)
            continue
        yield EvalCase(item.name, scan.image, np.asarray(scan.mask) > 0, prepared.anatomy,
                       prepared.meta, label, item.lesion_type, prepared.voxel_volume_ml)


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
        name = str(meta.get("subject") or meta.get("key"))
        label = None
        if "label" in batch and bool(batch["label_present"][0]):
            label = batch["label"][0, 0].numpy() > 0.5
            if not label.any():
                failures.append((f"{shard_dir} ({split}) {name}", f"{name}: {EMPTY_LABEL}"))
                log.warning("skipping %s: %s", name, EMPTY_LABEL)
                continue
        yield EvalCase(name, batch["image"][0, 0].numpy().astype(np.float32),
                       mask[0].numpy() > 0, torch.cat([mask, batch["anatomy"][0]]).numpy().astype(np.float32),
                       scan_meta(meta["modality"], meta, meta.get("scalars") or {}), label,
                       meta.get("lesion_type") or None, voxel_ml)


def evaluate(
    pipeline: BrainFMPipeline,
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    vae_only: bool = False,
    compare_vae: bool = False,
    split: str = "test",
    n_examples: int = 4,
    progress: bool = True,
) -> EvaluationResult:
    """Score labelled lesion scans and healthy controls; write metrics.json, report.md and figures.

    ``source``: a manifest CSV (rows without a label are healthy controls), or a shard folder whose ``split`` is
    evaluated from its stored preprocessing. ``compare_vae`` adds the VAE-reconstruction baseline on the same
    scans, each method with its own healthy-calibrated threshold; a model with a fine-tuned head is scored with
    it too. ``out_dir`` is written as a whole (new, empty, or an earlier brainfm report).
    """
    from tqdm.auto import tqdm

    from brainfm.evaluation import MetricAccumulator, write_report

    check_output_dir(out_dir)
    source = Path(source)
    methods = ["vae"] if vae_only else (["ldm", "vae"] if compare_vae else ["ldm"])
    calibrations = {m: pipeline.calibration_for(m == "vae") for m in methods}
    reconstructors = {m: pipeline.reconstructor(vae_only=m == "vae") for m in methods}
    accumulators = {m: MetricAccumulator(threshold=calibrations[m].threshold) for m in methods}
    seconds = {m: 0.0 for m in methods}
    head = pipeline.head_predictor()
    if head is not None:  # the fine-tuned head on the first method's maps, with its own calibrated threshold
        if head.threshold is None:
            raise BrainFMInputError(head.path, "head is not calibrated (no threshold in its settings)")
        head_accumulator = MetricAccumulator(threshold=head.threshold)
        seconds["head"] = 0.0
    examples: list[dict[str, Any]] = []
    example_types: set[str] = set()
    failures: list[tuple[str, str]] = []
    cases = (cases_from_shards(pipeline, source, split, failures) if source.is_dir()
             else cases_from_manifest(pipeline, source, failures))
    n_done = 0
    for case in tqdm(cases, desc="evaluate", unit="scan", disable=not progress or None):
        n_done += 1
        has_lesion = case.label is not None and bool(case.label.any())
        lesion_type = (case.lesion_type or "lesion") if has_lesion else None
        kind = lesion_type or "healthy"
        show = kind not in example_types and len(example_types) < n_examples
        if show:
            example_types.add(kind)
        for method in methods:
            started = time.perf_counter()
            analysis = pipeline.analyse(case.image, case.mask, case.anatomy, case.meta,
                                        reconstructor=reconstructors[method], calibration=calibrations[method],
                                        source=case.name)
            seconds[method] += time.perf_counter() - started
            accumulators[method].add(analysis.zmap, case.label, case.mask, analysis.mask, analysis.subject_score,
                                     lesion_type, case.voxel_volume_ml, scan_id=case.name)
            if head is not None and method == methods[0]:
                started = time.perf_counter()
                brain = np.asarray(case.mask) > 0
                probability, head_mask = head.predict(case.image, analysis.reconstruction, analysis.zmap * brain,
                                                      brain, case.anatomy, case.meta)
                seconds["head"] += time.perf_counter() - started  # the head alone; its maps are shared
                head_accumulator.add(probability, case.label, case.mask, head_mask, None, lesion_type,
                                     case.voxel_volume_ml, scan_id=case.name)
            if show:
                examples.append({"image": case.image, "reconstruction": analysis.reconstruction,
                                 "zmap": analysis.zmap, "pred_mask": analysis.mask, "label": case.label,
                                 "threshold": analysis.threshold, "title": f"{case.name} ({kind}) {method}"})
    if n_done == 0:
        raise BrainFMInputError(source, "no scan could be evaluated" + (f" ({len(failures)} failed; first: "
                                                                        f"{failures[0][1]})" if failures else ""))
    names = {"ldm": "ldm", "vae": "vae_baseline"}
    metrics = {names[m]: accumulators[m].compute() for m in methods}
    per_scan = {names[m]: seconds[m] / n_done for m in methods}
    if head is not None:
        metrics["head"] = head_accumulator.compute()
        per_scan["head"] = seconds["head"] / n_done
    protocol = {}
    for method in methods:
        entry = dict(calibrations[method].protocol())
        entry.update(
            spacing_mm=list(pipeline.recipe.spacing),
            reconstruction=json.dumps(reconstructors[method].settings()),
            seconds_per_scan=round(per_scan[names[method]], 3),
            dataset=f"{source} (split {split})" if source.is_dir() else str(source),
            scans_failed=len(failures),
        )
        protocol[names[method]] = entry
    if head is not None:
        protocol["head"] = {**head.protocol(), "on_maps_of": names[methods[0]],
                            "seconds_per_scan": round(per_scan["head"], 3), "scans_failed": len(failures)}
    if len(protocol) == 1:
        protocol = {**protocol[names[methods[0]]], "method": names[methods[0]]}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        written = write_report(metrics, protocol, tmp, examples=examples)
        if failures:
            write_json(tmp / FAILURES, [{"path": p, "error": e} for p, e in failures])
    paths = {key: None if path is None else out_dir / Path(path).relative_to(tmp) for key, path in written.items()}
    return EvaluationResult(metrics=metrics, paths=paths, failures=failures, seconds_per_scan=per_scan)


__all__ = ["EvalCase", "EvaluationResult", "cases_from_manifest", "cases_from_shards", "evaluate"]
