"""``brainfm detect``: deviation maps of new scans, written on each input's own grid and affine.

Detection repeats the model's STORED recipe on the user's scan (``BrainFMPipeline.prepare``), refuses scans the
model cannot serve, reconstructs a pseudo-healthy scan and turns the residual into a calibrated z-map
(``BrainFMPipeline.analyse``); this module maps the results back to the input grid and writes them. All files of
one scan appear together or not at all. Output names are checked before any inference: a file that exists and
was not written by brainfm (the scan or its mask among them) is never overwritten; the command refuses instead.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainfm.anomaly.figures import write_detection_figure
from brainfm.anomaly.reconstruct import PseudoHealthyReconstructor
from brainfm.config import to_dict
from brainfm.data.manifest import ManifestRow, Rejection, scan_stem
from brainfm.io import BrainFMInputError, check_output_dir, commit_files, save_nifti, write_json
from brainfm.pipeline import BrainFMPipeline

MAPS = ("pseudohealthy", "zmap", "mask", "uncertainty")
HEAD_MAPS = ("head_prob", "head_mask")
SUMMARY = "detect_summary.json"


@dataclasses.dataclass
class DetectionResult:
    name: str
    subject_score: float
    threshold: float
    anomalous_fraction: float
    files: dict[str, Path]
    seconds: float


def output_names(name: str, with_head: bool = False) -> list[str]:
    """Every file detect writes for one scan called ``name``."""
    maps = MAPS + (HEAD_MAPS if with_head else ())
    return [f"{name}_{key}.nii.gz" for key in maps] + [f"{name}.json", f"{name}.png"]


def _versions() -> dict[str, str]:
    import diffusers
    import monai

    from brainfm.version import __version__

    return {"brainfm": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "monai": monai.__version__, "numpy": np.__version__}


def detect_scan(
    pipeline: BrainFMPipeline,
    path: str | os.PathLike,
    modality: str | None = None,
    mask_path: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = ".",
    meta: Mapping[str, Any] | None = None,
    *,
    vae_only: bool = False,
    name: str | None = None,
    reconstructor: PseudoHealthyReconstructor | None = None,
    t1_path: str | os.PathLike | None = None,
) -> DetectionResult:
    """Detect anomalies in one scan and write ``{name}_pseudohealthy/_zmap/_mask/_uncertainty.nii.gz``,
    ``{name}.json`` and ``{name}.png`` into ``out_dir``, NIfTIs on the input's own grid and affine (plus
    ``_head_prob``/``_head_mask`` when the model carries a fine-tuned head). The JSON records how the front end
    served the scan (``preprocessing``: extraction route, modality evidence, N4, alignment, seconds) and its
    ``warnings`` (an extracted brain outside 800-2,200 ml, slices over twice the model's spacing), which the
    figure's title repeats with the extracted brain volume."""
    from brainfm.data.preprocess import to_input_space

    started = time.perf_counter()
    path = Path(path)
    name = name or scan_stem(path)
    head = pipeline.head_predictor()
    inputs = (path, mask_path, t1_path)
    check_output_dir(out_dir, output_names(name, head is not None), inputs=inputs)
    calibration = pipeline.calibration_for(vae_only)
    prepared = pipeline.prepare(path, modality, mask_path, meta=meta, t1_path=t1_path)
    scan = prepared.scan
    analysis = pipeline.analyse(scan.image, scan.mask, prepared.anatomy, prepared.meta, vae_only=vae_only,
                                reconstructor=reconstructor, calibration=calibration, source=str(path))
    brain = np.asarray(scan.mask) > 0
    native = {
        "pseudohealthy": to_input_space(analysis.reconstruction, scan, order=1),
        "zmap": to_input_space(analysis.zmap * brain, scan, order=1),
        "mask": to_input_space(analysis.mask.astype(np.uint8), scan, order=0).astype(np.uint8),
        "uncertainty": to_input_space(analysis.uncertainty, scan, order=1),
    }
    head_mask = None
    if head is not None:  # the fine-tuned head: probability and its calibrated mask
        head_prob, head_mask = head.predict(scan.image, analysis.reconstruction, analysis.zmap * brain, brain,
                                            prepared.anatomy, prepared.meta)
        native["head_prob"] = to_input_space(head_prob, scan, order=1)
        if head_mask is not None:
            native["head_mask"] = to_input_space(head_mask.astype(np.uint8), scan, order=0).astype(np.uint8)
    voxel_ml = prepared.voxel_volume_ml
    kept = int(brain.sum())
    files = {f"{name}_{key}.nii.gz": key for key in native}
    report = {
        "input": str(path),
        "mask_input": None if mask_path is None else str(mask_path),
        "t1_input": None if t1_path is None else str(t1_path),
        "modality": scan.modality,
        "model": str(pipeline.model_dir),
        "method": "vae" if vae_only else "ldm",
        "subject_score": analysis.subject_score,
        "subject_score_kind": calibration.config.subject_score,
        "healthy_subject_score_mean": (float(np.mean(calibration.healthy_scores))
                                       if calibration.healthy_scores is not None and calibration.healthy_scores.size
                                       else None),
        "threshold": analysis.threshold,
        "anomalous_voxels_model_grid": int(analysis.mask.sum()),
        "anomalous_volume_ml": float(analysis.mask.sum()) * voxel_ml,
        "brain_volume_ml": kept * voxel_ml,
        "extracted_brain_volume_ml": scan.brain_volume_ml,
        "warnings": list(scan.provenance.get("warnings", [])),
        "anomalous_fraction_of_brain": float(analysis.mask.sum()) / max(kept, 1),
        "max_z": float(analysis.zmap[brain].max()) if kept else 0.0,
        "intensity_units": "pseudo-healthy in the model's normalised [0, 1] intensity (brain-masked)",
        "metadata": prepared.meta,
        "preprocessing": scan.provenance,
        "outputs": sorted([*files, f"{name}.json", f"{name}.png"]),
        "settings": {
            "reconstruction": analysis.settings,
            "deviation": to_dict(calibration.config),
            "calibration": {"n_scans": calibration.n_scans, "achieved_fpr": calibration.achieved_fpr},
            "preprocess": to_dict(pipeline.recipe),
        },
        "versions": _versions(),
    }
    if head is not None:
        report["head"] = {**head.protocol(), "flagged_voxels_model_grid": None if head_mask is None
                          else int(head_mask.sum()), "flagged_volume_ml": None if head_mask is None
                          else float(head_mask.sum()) * voxel_ml}

    def nifti(key: str) -> Callable[[Path], None]:
        dtype = np.uint8 if key in ("mask", "head_mask") else np.float32
        return lambda target: save_nifti(native[key], scan.source_affine, target, dtype=dtype)

    writers: dict[str, Callable[[Path], None]] = {fname: nifti(key) for fname, key in files.items()}
    title = (f"{name}: subject score {analysis.subject_score:.2f}, {report['anomalous_volume_ml']:.1f} ml flagged, "
             f"brain {scan.brain_volume_ml:.0f} ml")
    if report["warnings"]:  # the first clause of each: the figure is read at a glance
        title += "\nWARNING: " + "; ".join(w.split(":")[0] for w in report["warnings"])
    writers[f"{name}.png"] = lambda target: write_detection_figure(target, scan.image, analysis, brain, title)
    report["seconds"] = round(time.perf_counter() - started, 3)
    writers[f"{name}.json"] = lambda target: write_json(target, report)
    written = commit_files(Path(out_dir), writers, inputs=inputs)
    return DetectionResult(name=name, subject_score=analysis.subject_score, threshold=analysis.threshold,
                           anomalous_fraction=report["anomalous_fraction_of_brain"], files=written,
                           seconds=report["seconds"])


def detect_many(
    pipeline: BrainFMPipeline,
    inputs: Sequence[ManifestRow],
    out_dir: str | os.PathLike,
    *,
    vae_only: bool = False,
    progress: bool = True,
    on_error: Callable[[ManifestRow, BrainFMInputError], None] | None = None,
    rejected: Sequence[Rejection] = (),
) -> tuple[list[DetectionResult], list[tuple[ManifestRow, str]]]:
    """Detect over several scans; a bad scan is reported and skipped, the others go on. Every output name is
    checked against the folder before the first inference; several scans (counting the manifest rows the reader
    ``rejected``) also get ``detect_summary.json``, whose ``failed`` lists the rejected rows first."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    with_head = pipeline.head is not None
    names = [n for item in inputs for n in output_names(item.name, with_head)]
    protected = [p for item in inputs for p in (item.path, item.mask, item.label, item.t1)]
    with_summary = len(inputs) + len(rejected) > 1
    check_output_dir(out_dir, names + ([SUMMARY] if with_summary else []), inputs=protected)
    pipeline.calibration_for(vae_only)
    reconstructor = pipeline.reconstructor(vae_only=vae_only)
    results, failures = [], []
    for item in tqdm(inputs, desc="detect", unit="scan", disable=not progress or None):
        try:
            results.append(detect_scan(pipeline, item.path, item.modality, item.mask, out_dir, item.meta,
                                       vae_only=vae_only, name=item.name, reconstructor=reconstructor,
                                       t1_path=item.t1))
        except BrainFMInputError as exc:
            failures.append((item, str(exc)))
            if on_error is not None:
                on_error(item, exc)
    if with_summary:
        summary = {
            "model": str(pipeline.model_dir),
            "succeeded": [{"name": r.name, "subject_score": r.subject_score,
                           "anomalous_fraction_of_brain": r.anomalous_fraction} for r in results],
            "failed": [{"name": r.subject, "path": r.path, "error": r.message} for r in rejected]
            + [{"name": item.name, "path": str(item.path), "error": error} for item, error in failures],
        }
        commit_files(out_dir, {SUMMARY: lambda target: write_json(target, summary)}, inputs=protected)
    return results, failures


__all__ = ["DetectionResult", "detect_many", "detect_scan", "output_names"]
