"""``brainfm adapt``: adapt a model to a new site from a few of its healthy scans.

A model's normative statistics and threshold belong to the scans it was calibrated on: on another scanner,
protocol or population its healthy false-positive rate is far above the target. Retraining is not an option for a
site with five scans; recalibrating on them (and, optionally, a few hundred LoRA steps of the latent UNet on them)
is. The site's healthy scans are split BY SUBJECT (seeded) into an adaptation part, on which the model is
recalibrated (after the fine-tuning, if any), and a held-out check part, on which the healthy false-positive rate
is measured before and after, so the reported improvement is never measured on the scans that produced it. With
labelled lesion scans of the site, :func:`brainfm.anomaly.evaluate.evaluate` runs before and after as well.

The new model folder (``BrainFMPipeline.save_pretrained``) records the adaptation in ``model_index.json``
(``adaptation``: scans' sha256, split, steps, rank, false-positive rates) and carries the adapters
(``unet_lora/``) beside the untouched foundation weights; the model card shows the record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brainfm.config import AdaptConfig, DeviationConfig
from brainfm.data.manifest import SCAN_SUFFIXES, ManifestRow, Rejection, read_manifest, scan_stem
from brainfm.io import BrainFMInputError, check_output_dir, commit_files, write_json
from brainfm.pipeline import BrainFMPipeline, PreparedScan
from brainfm.version import __version__

log = logging.getLogger(__name__)

MIN_SCANS = 3  # a check part of one subject and an adaptation part of two scans (a spread needs two)
SCANS_FILE = "adaptation_scans.json"  # in the run folder: the split a resumed run must find again
RECORD_FILE = "adaptation.json"  # in the run folder: a copy of the record the model folder carries
TRAIN_DIR = "train"
EVAL_DIRS = {"before": "eval-before", "after": "eval-after"}
_BIDS_SUBJECT = re.compile(r"^(sub-[A-Za-z0-9]+)")


@dataclasses.dataclass
class SiteScan:
    """One usable healthy scan of the site, on the model grid, with the sha256 of its file(s)."""

    row: ManifestRow
    sha256: str
    prepared: PreparedScan

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def subject(self) -> str:
        return self.row.subject

    def volume(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """(image, brain mask, anatomy, meta): what calibration reads."""
        scan = self.prepared.scan
        return scan.image, np.asarray(scan.mask) > 0, self.prepared.anatomy, self.prepared.meta


@dataclasses.dataclass
class AdaptationResult:
    model_dir: Path
    run_dir: Path
    record: dict[str, Any]
    skipped: list[tuple[str, str]]

    def summary(self) -> str:
        """What the command prints: the split, the false-positive rates and the evaluation before and after (the
        model card's rows)."""
        from brainfm.evaluation.adaptation import adaptation_rows

        split = self.record["split"]
        lines = [f"adaptation subjects: {', '.join(split['adapt_subjects'])}; held-out check subjects: "
                 f"{', '.join(split['check_subjects'])}"]
        lines += [f"{field}: {value}" for field, value in adaptation_rows(self.record)[1:]]
        return "\n".join([*lines, f"model folder {self.model_dir} (run folder {self.run_dir})"])


# ------------------------------------------------------------------------------------------------ inputs
def site_rows(source: str | os.PathLike, modality: str | None = None, split: str | None = None
              ) -> tuple[list[ManifestRow], list[Rejection]]:
    """The site's scans: a manifest CSV (every row, or with ``split`` only the rows of that split) or a folder whose
    scan files (NIfTI, ...) are each one scan, the subject read from a BIDS ``sub-<label>`` prefix or else the
    file name."""
    source = Path(source)
    if not source.exists():
        raise BrainFMInputError(source, "no such manifest or folder of healthy scans")
    if not source.is_dir():
        rows, rejected = read_manifest(source, default_modality=modality)
        if split is None:
            return rows, rejected
        subjects = {r.subject for r in rows if r.split == split}
        if not subjects:
            raise BrainFMInputError(source, f"no row of split {split!r}")
        return [r for r in rows if r.split == split], [r for r in rejected if r.subject in subjects]
    if split is not None:
        raise BrainFMInputError(source, "a split can only be chosen in a manifest CSV, not in a folder of scans")
    files = sorted(p for p in source.iterdir() if p.is_file() and p.name.lower().endswith(SCAN_SUFFIXES))
    rows = []
    for path in files:
        match = _BIDS_SUBJECT.match(path.name)
        rows.append(dataclasses.replace(ManifestRow.single(path, modality=modality),
                                        subject=match.group(1) if match else scan_stem(path)))
    return rows, []


def scan_sha256(path: Path) -> str:
    """sha256 of a scan file, or of a DICOM series folder's files (names and bytes, in name order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def prepare_site_scans(pipeline: BrainFMPipeline, rows: Sequence[ManifestRow], rejected: Sequence[Rejection],
                       modality: str | None = None) -> tuple[list[SiteScan], list[tuple[str, str]]]:
    """Preprocess every scan with the model's recipe. A modality the model does not know (or cannot tell) stops
    the command; a row the manifest reader rejected, a labelled scan or a scan the preprocessing refuses is listed
    and skipped, as ``brainfm data shards`` does."""
    skipped = [(r.path, r.message) for r in rejected]
    for row in rows:
        wanted = row.modality or modality or (pipeline.modalities[0] if len(pipeline.modalities) == 1 else None)
        if wanted is None:
            raise BrainFMInputError(row.path, f"give the modality (manifest column or --modality): this model "
                                              f"serves {', '.join(pipeline.modalities)}")
        if wanted.upper() not in pipeline.modalities:
            raise BrainFMInputError(row.path, f"modality {wanted.upper()} is not one this model knows "
                                              f"({', '.join(pipeline.modalities)}); it cannot be adapted to it")
    scans = []
    for row in rows:
        if row.label is not None:
            skipped.append((str(row.path), str(BrainFMInputError(row.path, "has a lesion label: not a healthy "
                                                                            "control"))))
            continue
        try:
            prepared = pipeline.prepare(row.path, row.modality or modality, row.mask, meta=row.meta)
        except BrainFMInputError as exc:
            skipped.append((str(row.path), str(exc)))
            continue
        scans.append(SiteScan(row=row, sha256=scan_sha256(row.path), prepared=prepared))
    return scans, skipped


def split_by_subject(scans: Sequence[SiteScan], check_fraction: float, seed: int
                     ) -> tuple[list[SiteScan], list[SiteScan]]:
    """(adaptation part, check part): whole subjects, in a seeded shuffle of the sorted subject ids; the check part
    takes ``check_fraction`` of the subjects (at least one), passing over a subject whose scans would leave fewer
    than two to adapt on (a spread needs two)."""
    counts: dict[str, int] = {}
    for scan in scans:
        counts[scan.subject] = counts.get(scan.subject, 0) + 1
    subjects = sorted(counts)
    order = [subjects[i] for i in np.random.default_rng(seed).permutation(len(subjects))]
    wanted = max(1, int(round(check_fraction * len(subjects))))
    check: set[str] = set()
    left = len(scans)
    for subject in order:
        if len(check) < wanted and left - counts[subject] >= 2:
            check.add(subject)
            left -= counts[subject]
    if not check:
        raise BrainFMInputError(None, f"the {len(scans)} healthy scans come from {len(subjects)} subject(s): a "
                                      f"held-out check subject would leave fewer than 2 scans to adapt on")
    return [s for s in scans if s.subject not in check], [s for s in scans if s.subject in check]


# ------------------------------------------------------------------------------------------------ checks
def healthy_fp_rates(pipeline: BrainFMPipeline, scans: Sequence[SiteScan]) -> dict[str, Any] | None:
    """The healthy false-positive rate of ``scans`` at the model's calibrated threshold (the evaluation's own
    metric: flagged fraction of brain voxels, pooled and per scan); None for an uncalibrated model."""
    from brainfm.evaluation import MetricAccumulator

    if pipeline.calibration is None:
        return None
    accumulator = MetricAccumulator(threshold=pipeline.calibration.threshold)
    reconstructor = pipeline.reconstructor()
    for scan in scans:
        image, mask, anatomy, meta = scan.volume()
        analysis = pipeline.analyse(image, mask, anatomy, meta, reconstructor=reconstructor, source=scan.name)
        accumulator.add(analysis.zmap, None, mask, pred_mask=analysis.mask, subject_score=analysis.subject_score,
                        voxel_volume_ml=scan.prepared.voxel_volume_ml, scan_id=scan.name)
    healthy = accumulator.compute()["healthy"]
    return {"pooled": healthy["fp_rate_pooled"], "per_scan_max": healthy["fp_rate_per_scan_max"],
            "per_scan": {r["scan_id"]: r["fp_rate"] for r in accumulator.records}}


# ------------------------------------------------------------------------------------------------ the command
def default_run_dir(out: Path) -> Path:
    """``<out>-adapt`` beside the new model folder: training run, evaluations and the recorded split."""
    return out.parent / f"{out.name}-adapt"


def _check_resumed_split(run_dir: Path, scans: dict[str, list[dict[str, str]]]) -> None:
    """A resumed run must see the same scans in the same parts: its checkpoints were trained on them."""
    from brainfm.safety import read_json

    stored = run_dir / SCANS_FILE
    if stored.is_file() and read_json(stored) != scans:
        raise BrainFMInputError(stored, "this run folder was made with other healthy scans or another split; "
                                        "choose another run folder")
    commit_files(run_dir, {SCANS_FILE: lambda target: write_json(target, scans)})


def adapt(
    pipeline: BrainFMPipeline,
    healthy: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config: AdaptConfig | None = None,
    modality: str | None = None,
    split: str | None = None,
    eval_manifest: str | os.PathLike | None = None,
    run_dir: str | os.PathLike | None = None,
    resume: str | None = None,
    progress: bool = True,
    on_skip: Callable[[str, str], None] | None = None,
) -> AdaptationResult:
    """Adapt ``pipeline`` to the site whose healthy scans are ``healthy`` and write the new model folder ``out``.

    ``split`` takes only that split's rows of a manifest ``healthy``. ``config.lora.enabled`` fine-tunes LoRA
    adapters of the latent UNet for ``config.optim.max_steps`` steps in ``run_dir/train`` (checkpointed;
    ``resume="auto"`` continues it) before recalibrating. ``config.calibration.threshold`` (default leave one out)
    sets the threshold on z-maps of scans the statistics did not see. ``eval_manifest`` (labelled lesion scans and
    healthy controls of the site) is evaluated before and after into ``run_dir``. ``pipeline`` itself becomes the
    adapted model.
    """
    from brainfm.anomaly.calibrate import CalibrationScan, calibrate_volumes
    from brainfm.evaluation.adaptation import evaluation_summary

    config = config or AdaptConfig()
    out = Path(out)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(out)
    check_output_dir(out)
    check_output_dir(run_dir, [SCANS_FILE, RECORD_FILE])
    if eval_manifest is not None and not Path(eval_manifest).is_file():
        raise BrainFMInputError(eval_manifest, "evaluation manifest not found")
    if config.lora.enabled and pipeline.unet_lora is not None:
        raise BrainFMInputError(pipeline.model_dir, "this model already carries site adapters; fine-tune the "
                                                    "foundation model it was adapted from (or use --steps 0)")
    rows, rejected = site_rows(healthy, modality, split)
    scans, skipped = prepare_site_scans(pipeline, rows, rejected, modality)
    for path, message in skipped:
        log.warning("skipping %s", message)
        if on_skip is not None:
            on_skip(path, message)
    if len(scans) < MIN_SCANS:
        raise BrainFMInputError(healthy, f"adaptation needs at least {MIN_SCANS} usable healthy scans, found "
                                         f"{len(scans)} ({len(skipped)} skipped)")
    adapt_part, check_part = split_by_subject(scans, config.data.check_fraction, config.data.seed)
    _refuse_evaluating_on_adaptation_scans(eval_manifest, adapt_part)
    listing = {part: [{"name": s.name, "subject": s.subject, "sha256": s.sha256} for s in members]
               for part, members in (("adapt", adapt_part), ("check", check_part))}
    _check_resumed_split(run_dir, listing)

    source_calibration = pipeline.calibration
    deviation = source_calibration.config if source_calibration is not None else DeviationConfig()
    if config.calibration.target_fpr is not None:
        deviation = dataclasses.replace(deviation, target_fpr=config.calibration.target_fpr)
    before = healthy_fp_rates(pipeline, check_part)
    evaluations = {"before": _evaluate(pipeline, eval_manifest, run_dir, "before", progress)}

    if config.lora.enabled:
        pipeline.set_unet_lora(_fine_tune(pipeline, adapt_part, config, run_dir / TRAIN_DIR, resume))
    threshold_fit = config.calibration.threshold if len(adapt_part) >= 3 else "in_sample"
    sources = {"ldm": source_calibration, "vae": pipeline.vae_calibration}
    provenance = {"source": f"site adaptation ({len(adapt_part)} healthy scans)", "split": "adapt",
                  "threshold_fit": threshold_fit}
    calibrate_volumes(pipeline, [CalibrationScan(*s.volume()) for s in adapt_part], config=deviation,
                      progress=progress, leave_one_out=threshold_fit == "leave_one_out", **provenance)
    _carry_small_lesion_choice(pipeline, sources, provenance)
    after = healthy_fp_rates(pipeline, check_part)
    evaluations["after"] = _evaluate(pipeline, eval_manifest, run_dir, "after", progress)

    record: dict[str, Any] = {
        "source_model": str(pipeline.model_dir) if pipeline.model_dir is not None else None,
        "healthy_source": str(healthy) if split is None else f"{healthy} (split {split})",
        "scans": listing,
        "skipped": [{"path": p, "error": e} for p, e in skipped],
        "split": {"seed": config.data.seed, "check_fraction": config.data.check_fraction,
                  "adapt_subjects": sorted({s.subject for s in adapt_part}),
                  "check_subjects": sorted({s.subject for s in check_part}),
                  "n_adapt_scans": len(adapt_part), "n_check_scans": len(check_part)},
        "steps": config.optim.max_steps if config.lora.enabled else 0,
        "lora_rank": config.lora.rank if config.lora.enabled else None,
        "lora": pipeline.unet_lora is not None,
        "target_fpr": deviation.target_fpr,
        "threshold_fit": threshold_fit,
        "target_fpr_before": None if source_calibration is None else source_calibration.config.target_fpr,
        "healthy_fp_rate": {"before": None if before is None else before["pooled"], "after": after["pooled"],
                            "before_per_scan": None if before is None else before["per_scan"],
                            "after_per_scan": after["per_scan"], "measured_on": "check part (held out)"},
        "brainfm_version": __version__,
    }
    if eval_manifest is not None:
        record["evaluation"] = {"manifest": str(eval_manifest),
                                **{k: evaluation_summary(v) for k, v in evaluations.items()}}
    previous = pipeline.config.adaptation
    if previous:
        record["previous"] = previous
    pipeline.set_adaptation(record)
    pipeline.save_pretrained(out)
    commit_files(run_dir, {RECORD_FILE: lambda target: write_json(target, record)})
    return AdaptationResult(model_dir=out, run_dir=run_dir, record=record, skipped=skipped)


def _carry_small_lesion_choice(pipeline: BrainFMPipeline, sources: dict[str, Any], provenance: dict[str, Any]
                               ) -> None:
    """The small-lesion post-processing was chosen on labelled validation lesions a site does not have: keep the
    source model's choice (its threshold is recalibrated on the site's scans with the other variants')."""
    carried = False
    for key, fitted in (("ldm", pipeline.calibration), ("vae", pipeline.vae_calibration)):
        source = sources.get(key)
        if fitted is None or source is None or source.small_lesion_variant not in fitted.variants:
            continue
        fitted.small_lesion_variant = source.small_lesion_variant
        fitted.small_lesion_selection = {**(source.small_lesion_selection or {}), "carried_over": (
            "chosen on the source model's validation lesions; threshold recalibrated on the site's healthy scans")}
        carried = True
    if carried:  # the model's calibration summary records the choice too
        pipeline.set_calibration(pipeline.calibration, pipeline.vae_calibration, **provenance)


def _refuse_evaluating_on_adaptation_scans(manifest: str | os.PathLike | None, scans: Sequence[SiteScan]) -> None:
    """An evaluation on scans the model was recalibrated on would hide its false positives: refuse it."""
    if manifest is None:
        return
    used = {s.sha256: s.name for s in scans}
    rows, _ = read_manifest(manifest)
    for row in rows:
        if (digest := scan_sha256(row.path)) in used:
            raise BrainFMInputError(row.path, f"is the healthy scan {used[digest]} the model is adapted on; leave "
                                              f"it out of the evaluation (--eval)")


def _evaluate(pipeline: BrainFMPipeline, manifest: str | os.PathLike | None, run_dir: Path, when: str,
              progress: bool) -> dict[str, Any] | None:
    from brainfm.anomaly.evaluate import evaluate

    if manifest is None:
        return None
    return evaluate(pipeline, manifest, run_dir / EVAL_DIRS[when], progress=progress).metrics


def _fine_tune(pipeline: BrainFMPipeline, scans: Sequence[SiteScan], config: AdaptConfig, run_dir: Path,
               resume: str | None) -> dict[str, Any]:
    """LoRA adapters trained on the adaptation part through the Trainer; returns them as read back from disk."""
    from brainfm.anomaly.head import read_lora
    from brainfm.train.tasks.adapt import LORA_DIR, SiteAdaptTask, SiteVolume
    from brainfm.train.trainer import Trainer

    pretrain = (pipeline.config.provenance or {}).get("pretrain_config") or {}
    cond_drop_prob = float((pretrain.get("ldm") or {}).get("cond_drop_prob", 0.1))
    volumes = [SiteVolume(s.name, s.prepared.scan.image, s.prepared.anatomy, s.prepared.meta) for s in scans]
    trainer = Trainer(config, run_dir)
    task = SiteAdaptTask(config, pipeline.vae, pipeline.unet, pipeline.conditioner, pipeline.noise_scheduler,
                         volumes, cond_drop_prob=cond_drop_prob,
                         seed=config.train.seed * 1000 + trainer.accelerator.process_index)
    trainer.fit(task, resume=resume)
    return read_lora(run_dir / LORA_DIR)


__all__ = ["AdaptationResult", "MIN_SCANS", "SiteScan", "adapt", "healthy_fp_rates",
           "prepare_site_scans", "scan_sha256", "site_rows", "split_by_subject"]
