"""Baselines every evaluation carries beside the models, and a circularity check for the report.

A generative model that does not beat these adds nothing (FIELD.md; Meissen et al. 2021, "Challenging current
semi-supervised anomaly segmentation methods for brain MRI"). Each one produces a score map per scan that goes
through EXACTLY the models' path afterwards: healthy-calibrated statistics and threshold on the validation scans
(:class:`NormativeCalibration`, the same target false-positive rate and post-processing variants), the same
post-processing, binary mask, subject score and metrics.

- ``intensity_baseline`` (Meissen et al. 2021): the normalised scan itself is the score. Which tail(s) of the
  intensity a lesion can occupy is fixed per modality IN ADVANCE from MR/CT physics, never from lesion data
  (:data:`BASELINE_TAILS`: T1 low; T2, FLAIR, PD high; post-contrast T1 and CT both); the centre of a two-sided
  score and every threshold come from healthy validation scans only. Global normalisation (no location).
- ``atlas_baseline``: the classical normative z-map. Voxelwise mean and standard deviation of the registered
  healthy TRAINING scans on the model grid (Gaussian-smoothed like the models' voxelwise statistics), stored with
  the calibration; z = (scan - mean) / std, in the modality's tail(s), then calibrated on the validation scans.
  Its pseudo-healthy image is the atlas mean.
- ``prior_fit_check`` (report only): per scan, a least-squares fit of intensity on the anatomy priors the LDM is
  conditioned on (``PRIOR_FIT_TERMS`` terms: 1, gm, wm, gm^2, wm^2, gm*wm), used as a "reconstruction" with the
  models' residual and voxelwise statistics. If it matches the LDM, the conditioning alone explains the LDM's
  result on this benchmark, and the report says so.

Everything is per modality: a baseline serves the modalities it was calibrated on.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from brainfm.anomaly.deviation import SMALL_LESION_TYPES, residual_map
from brainfm.anomaly.normative import NormativeCalibration, StatisticsAccumulator
from brainfm.config import DeviationConfig
from brainfm.evaluation.report import REPORT_ONLY_METHODS
from brainfm.io import BrainFMInputError, write_json

Tail = Literal["low", "high", "both"]
INTENSITY, ATLAS = "intensity_baseline", "atlas_baseline"
(PRIOR_FIT,) = REPORT_ONLY_METHODS  # in the report's circularity check only
BASELINE_METHODS = (INTENSITY, ATLAS)  # in every table, report and model card
BASELINE_TAILS: dict[str, Tail] = {"T1": "low", "T2": "high", "FLAIR": "high", "PD": "high", "T1CE": "both",
                                   "CT": "both"}
PRIOR_FIT_TERMS = 6
BASELINES_JSON = "baselines.json"
FORMAT_VERSION = 1
STATISTICS_DIR = "statistics"
DESCRIPTIONS = {
    INTENSITY: "normalised scan intensity as the score (Meissen et al. 2021), tail(s) per modality fixed from "
               "MR/CT physics ({tails}), centre and threshold from healthy validation scans; global normalisation",
    ATLAS: "normative atlas: voxelwise mean/std of {n} healthy training scans on the model grid (smoothed, sigma "
           "{sigma} vox); z = (scan - mean) / std in the modality's tail(s) ({tails}); global normalisation",
    PRIOR_FIT: "per-scan least-squares fit of intensity on the anatomy priors (6 terms: 1, gm, wm, gm^2, wm^2, "
               "gm*wm) as the reconstruction; the models' residual and normalisation",
}


@dataclasses.dataclass(frozen=True)
class HealthyScan:
    """A healthy scan on the model grid: what baselines are fitted and calibrated on."""

    image: np.ndarray
    mask: np.ndarray
    anatomy: np.ndarray  # brain mask + tissue priors, as the UNet sees them
    modality: str


def tail_of(modality: str, tails: Mapping[str, str] | None = None) -> Tail:
    return (tails or BASELINE_TAILS).get(str(modality).upper(), "both")  # type: ignore[return-value]


def tail_score(values: np.ndarray, tail: str, center: float = 0.0) -> np.ndarray:
    """Larger = more anomalous: ``values - center`` (high tail), ``center - values`` (low), their absolute (both)."""
    shifted = np.asarray(values, np.float32) - np.float32(center)
    if tail == "high":
        return shifted
    if tail == "low":
        return -shifted
    if tail == "both":
        return np.abs(shifted)
    raise ValueError(f"tail must be low, high or both, got {tail!r}")


def prior_fit(image: np.ndarray, mask: np.ndarray, anatomy: np.ndarray) -> np.ndarray:
    """Least-squares fit of the scan's brain intensities on its anatomy priors (channels after the brain mask):
    1, gm, wm, gm^2, wm^2, gm*wm; the fitted image inside the mask, 0 outside."""
    brain = np.asarray(mask) > 0
    priors = np.asarray(anatomy, np.float64)[1:3]
    if priors.shape[0] < 2:
        raise BrainFMInputError(None, "the prior-fit check needs two tissue priors (gm, wm) in the anatomy maps")
    gm, wm = priors[0][brain], priors[1][brain]
    design = np.stack([np.ones_like(gm), gm, wm, gm**2, wm**2, gm * wm], axis=1)
    coefficients, *_ = np.linalg.lstsq(design, np.asarray(image, np.float64)[brain], rcond=None)
    fitted = np.zeros(brain.shape, np.float32)
    fitted[brain] = design @ coefficients
    return fitted


@dataclasses.dataclass(eq=False)
class BaselineEntry:
    """One baseline for one modality: its healthy-calibrated statistics/threshold, tail, centre and (atlas)
    the normative statistics of the training scans."""

    calibration: NormativeCalibration
    tail: Tail | None = None
    center: float = 0.0
    statistics: NormativeCalibration | None = None


class Baselines:
    """The calibrated baselines of a model folder: ``entries[method][modality]``."""

    def __init__(self, entries: Mapping[str, Mapping[str, BaselineEntry]], tails: Mapping[str, str] | None = None,
                 n_atlas_scans: int = 0) -> None:
        self.entries = {m: dict(e) for m, e in entries.items()}
        self.tails = dict(tails or BASELINE_TAILS)
        self.n_atlas_scans = int(n_atlas_scans)

    @property
    def methods(self) -> list[str]:
        return list(self.entries)

    def entry(self, method: str, modality: str) -> BaselineEntry:
        per_modality = self.entries.get(method)
        if per_modality is None:
            raise BrainFMInputError(None, f"baseline {method!r} was not calibrated (calibrated: {self.methods})")
        if str(modality).upper() not in per_modality:
            raise BrainFMInputError(None, f"baseline {method!r} was not calibrated for modality {modality} "
                                          f"(calibrated: {sorted(per_modality)})")
        return per_modality[str(modality).upper()]

    def score(self, method: str, image: np.ndarray, mask: np.ndarray, anatomy: np.ndarray, modality: str,
              ) -> tuple[np.ndarray, np.ndarray | None]:
        """(score map before normalisation, pseudo-healthy image or None) of one scan for ``method``."""
        entry = self.entry(method, modality)
        return baseline_score(method, entry, image, mask, anatomy)

    def summary(self) -> dict[str, Any]:
        """What model_index.json records: methods and the modalities each serves."""
        return {"methods": {m: sorted(e) for m, e in self.entries.items()}, "tails": self.tails,
                "n_atlas_scans": self.n_atlas_scans}

    def protocol(self, method: str) -> dict[str, Any]:
        """Settings of one baseline for reports (its first modality's calibration, plus what differs)."""
        per_modality = self.entries[method]
        first = next(iter(per_modality.values()))
        tails = ", ".join(f"{m} {e.tail}" for m, e in per_modality.items() if e.tail)
        return {"baseline": DESCRIPTIONS[method].format(tails=tails or "n/a", n=self.n_atlas_scans,
                                                        sigma=first.calibration.config.smoothing_sigma_vox),
                "modalities": sorted(per_modality), **first.calibration.protocol()}

    # -- persistence -----------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """``baselines.json`` + one calibration folder per method and modality (safetensors + JSON)."""
        folder = Path(folder)
        described: dict[str, dict[str, Any]] = {}
        for method, per_modality in self.entries.items():
            described[method] = {}
            for modality, entry in per_modality.items():
                entry.calibration.save(folder / method / modality)
                if entry.statistics is not None:
                    entry.statistics.save(folder / method / modality / STATISTICS_DIR)
                described[method][modality] = {"tail": entry.tail, "center": float(entry.center),
                                               "statistics": entry.statistics is not None}
        write_json(folder / BASELINES_JSON, {"format": "brainfm-baselines", "format_version": FORMAT_VERSION,
                                             "tails": self.tails, "n_atlas_scans": self.n_atlas_scans,
                                             "entries": described})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Baselines:
        folder = Path(folder)
        path = folder / BASELINES_JSON
        if not path.is_file():
            raise BrainFMInputError(path, "baseline calibration file not found")
        try:
            meta = json.loads(path.read_bytes())
            if meta.get("format") != "brainfm-baselines" or meta.get("format_version") != FORMAT_VERSION:
                raise BrainFMInputError(path, "not a brainfm baselines file of a supported version")
            entries: dict[str, dict[str, BaselineEntry]] = {}
            for method, per_modality in meta["entries"].items():
                if method not in (*BASELINE_METHODS, *REPORT_ONLY_METHODS):
                    raise BrainFMInputError(path, f"unknown baseline {method!r}")
                entries[method] = {}
                for modality, described in per_modality.items():
                    where = folder / method / modality
                    statistics = NormativeCalibration.load(where / STATISTICS_DIR) if described["statistics"] \
                        else None
                    entries[method][modality] = BaselineEntry(NormativeCalibration.load(where), described["tail"],
                                                              float(described["center"]), statistics)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise BrainFMInputError(path, f"incomplete baseline calibration ({exc})") from exc
        return cls(entries, meta.get("tails"), int(meta.get("n_atlas_scans", 0)))


def baseline_score(method: str, entry: BaselineEntry, image: np.ndarray, mask: np.ndarray, anatomy: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    brain = np.asarray(mask) > 0
    image = np.asarray(image, np.float32)
    if method == INTENSITY:
        return np.where(brain, tail_score(image, entry.tail or "both", entry.center), 0).astype(np.float32), None
    if method == ATLAS:
        if entry.statistics is None:
            raise BrainFMInputError(None, "the atlas baseline has no normative statistics")
        z = entry.statistics.zmap(image, brain)
        mean = (entry.statistics.mean_map * brain).astype(np.float32)
        return np.where(brain, tail_score(z, entry.tail or "both"), 0).astype(np.float32), mean
    if method == PRIOR_FIT:
        fitted = prior_fit(image, brain, anatomy)
        return residual_map(image, fitted, brain, entry.calibration.config.residual), fitted
    raise ValueError(f"unknown baseline {method!r}")


# ------------------------------------------------------------------------------------------------ fitting
def baseline_config(method: str, config: DeviationConfig) -> DeviationConfig:
    """The models' deviation settings, with global normalisation for scores that are already normalised."""
    return config if method == PRIOR_FIT else dataclasses.replace(config, normalisation="global")


def fit_baselines(
    healthy: Sequence[HealthyScan],
    atlas_scans: Iterable[HealthyScan],
    config: DeviationConfig,
    *,
    methods: Sequence[str] = (*BASELINE_METHODS, *REPORT_ONLY_METHODS),
    tails: Mapping[str, str] | None = None,
) -> Baselines:
    """Fit every baseline, per modality, on ``healthy`` (validation) scans; the atlas's normative statistics on
    ``atlas_scans`` (healthy TRAINING scans, streamed). A modality needs at least 2 scans of each."""
    tails = dict(tails or BASELINE_TAILS)
    modalities = sorted({s.modality for s in healthy})
    statistics: dict[str, NormativeCalibration] = {}
    n_atlas = 0
    if ATLAS in methods:
        statistics, n_atlas = fit_atlas(atlas_scans, modalities, config)
    entries: dict[str, dict[str, BaselineEntry]] = {m: {} for m in methods}
    for modality in modalities:
        scans = [s for s in healthy if s.modality == modality]
        if len(scans) < 2:
            raise BrainFMInputError(None, f"baselines need at least 2 healthy validation scans of {modality}, "
                                          f"found {len(scans)}")
        tail = tail_of(modality, tails)
        center = float(np.median(np.concatenate([s.image[s.mask > 0] for s in scans])))
        for method in methods:
            entry = BaselineEntry(NormativeCalibration(config=config, threshold=float("nan"), pooled_mean=0.0,
                                                       pooled_std=1.0),
                                  tail if method != PRIOR_FIT else None, center if method == INTENSITY else 0.0,
                                  statistics.get(modality) if method == ATLAS else None)
            residuals = [baseline_score(method, entry, s.image, s.mask, s.anatomy)[0] for s in scans]
            entry.calibration = NormativeCalibration.fit(residuals, [s.mask > 0 for s in scans],
                                                         baseline_config(method, config))
            entries[method][modality] = entry
    return Baselines(entries, tails, n_atlas)


def fit_atlas(scans: Iterable[HealthyScan], modalities: Sequence[str], config: DeviationConfig
              ) -> tuple[dict[str, NormativeCalibration], int]:
    """Voxelwise mean/std of healthy training scans per modality (streaming: the scans are read once)."""
    atlas_config = dataclasses.replace(config, normalisation="voxelwise")
    accumulators = {m: StatisticsAccumulator(atlas_config, seed=0, sample_capacity=1) for m in modalities}
    count = 0
    for scan in scans:
        if scan.modality in accumulators:
            brain = np.asarray(scan.mask) > 0
            accumulators[scan.modality].add(np.asarray(scan.image, np.float64) * brain, brain, None)
            count += 1
    statistics = {}
    for modality, accumulator in accumulators.items():
        if accumulator.n_scans < 2:
            raise BrainFMInputError(None, f"the atlas baseline needs at least 2 healthy training scans of "
                                          f"{modality}, found {accumulator.n_scans}")
        statistics[modality] = accumulator.finish()
    return statistics, count


def choose_small_lesion_variant(calibration: NormativeCalibration, residuals: Sequence[np.ndarray],
                                masks: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                                kinds: Sequence[str]) -> None:
    """Pick the post-processing variant with the highest pooled Dice at its own healthy-calibrated threshold on
    labelled VALIDATION scans of small lesions, and record the choice and every candidate's score on
    ``calibration`` (nothing when there are no such scans)."""
    if not residuals or not calibration.variants:
        return
    scores: dict[str, float] = {}
    for name in calibration.variants:
        variant = calibration.variant(name)
        tp = flagged = truth = 0
        for residual, mask, label in zip(residuals, masks, labels, strict=True):
            predicted = variant.analyse(residual, mask).mask
            lesion = (np.asarray(label) > 0) & (np.asarray(mask) > 0)
            tp += int((predicted & lesion).sum())
            flagged += int(predicted.sum())
            truth += int(lesion.sum())
        scores[name] = 2.0 * tp / (flagged + truth) if flagged + truth else 0.0
    best = max(scores, key=lambda n: (scores[n], -list(scores).index(n)))  # ties: the earlier (less filtering)
    calibration.small_lesion_variant = best
    calibration.small_lesion_selection = {
        "criterion": "pooled Dice at each variant's healthy-calibrated threshold on labelled validation scans",
        "lesion_types": sorted(set(kinds)), "n_scans": len(residuals), "scores": scores,
        "small_lesion_types": list(SMALL_LESION_TYPES)}


__all__ = ["ATLAS", "BASELINE_METHODS", "BASELINE_TAILS", "INTENSITY", "PRIOR_FIT", "REPORT_ONLY_METHODS",
           "BaselineEntry", "Baselines", "HealthyScan", "baseline_config", "baseline_score",
           "choose_small_lesion_variant", "fit_atlas", "fit_baselines", "prior_fit", "tail_of", "tail_score"]
