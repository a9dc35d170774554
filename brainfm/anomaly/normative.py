"""Healthy-cohort (normative) calibration: residual statistics of healthy scans and the z threshold.

Dividing a residual by statistics of HEALTHY validation scans turns it into a deviation (z) map, and choosing the
threshold on those healthy scans (a fixed false-positive rate) gives a threshold that never saw a test label. The
statistics, the threshold and the post-processing recipe are saved together (safetensors + JSON) so that inference
repeats exactly what was calibrated.

Post-processing variants: the median filter and the minimum component size erase lesions of a few voxels, so the
same statistics are also thresholded under other (median filter, minimum component) settings, each with its own
healthy-calibrated threshold (:data:`brainfm.anomaly.deviation.POSTPROCESS_VARIANTS`); ``variant(name)`` gives
the calibration as it applies under one of them, and ``small_lesion_variant`` names the one chosen for small
lesions on labelled VALIDATION scans (never test scans).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from brainfm.anomaly.deviation import (
    POSTPROCESS_VARIANTS,
    binarize,
    check_mask,
    check_volume,
    eroded_mask,
    postprocess,
    subject_score,
)
from brainfm.config import ConfigError, DeviationConfig, from_dict, to_dict
from brainfm.io import BrainFMInputError, atomic_path, write_json

CALIBRATION_ARRAYS = "calibration.safetensors"
CALIBRATION_JSON = "calibration.json"
FORMAT_VERSION = 2  # 2: post-processing variants (version 1 folders load with none)
MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation
_SUPPORT_EPS = 1e-8  # smoothed sample weight below which a voxel has no healthy data nearby


# ----------------------------------------------------------------------------------------------------------------
# Streaming helpers
# ----------------------------------------------------------------------------------------------------------------


class UniformSample:
    """A uniform sample without replacement of at most ``capacity`` values from a stream (bottom-k random
    keys, seeded): it holds EVERY value while the stream is no longer than the capacity, so quantiles are exact
    for typical calibration sets, and memory stays bounded for any number of scans beyond that."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.n_seen = 0
        self._rng = np.random.default_rng(seed)
        self._values: list[np.ndarray] = []
        self._keys: list[np.ndarray] = []
        self._held = 0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float32).ravel()
        self.n_seen += values.size
        self._values.append(values)
        self._keys.append(self._rng.random(values.size))
        self._held += values.size
        if self._held > self.capacity:
            keys = np.concatenate(self._keys)
            keep = np.argpartition(keys, self.capacity - 1)[: self.capacity]
            self._values = [np.concatenate(self._values)[keep]]
            self._keys = [keys[keep]]
            self._held = self.capacity

    @property
    def exact(self) -> bool:
        return self._held == self.n_seen

    def values(self) -> np.ndarray:
        return np.concatenate(self._values) if self._values else np.empty(0, dtype=np.float32)


def upper_threshold(values: np.ndarray, fraction_above: float) -> float:
    """The smallest sample value t with at most floor(fraction_above * n) values strictly above it: flagging
    ``z > t`` then marks the requested fraction of the sample (fewer only where values tie at t)."""
    values = np.asarray(values).ravel()
    if values.size == 0:
        raise ValueError("no values to calibrate a threshold on")
    allowed_above = int(math.floor(fraction_above * values.size))
    index = values.size - allowed_above - 1
    return float(np.partition(values, index)[index])


def _replayable(source: Any, name: str) -> Callable[[], Iterator[Any]]:
    """Calibration reads the healthy scans twice (statistics, then threshold): accept re-iterable collections
    and zero-argument callables that return a fresh iterable, refuse one-shot iterators up front."""
    if source is None:
        return lambda: iter(())
    if callable(source):
        return lambda: iter(source())
    if iter(source) is source:
        raise TypeError(
            f"{name}: NormativeCalibration.fit reads the healthy scans twice; pass a list or a zero-argument "
            "callable returning a fresh iterator, not a one-shot iterator or generator"
        )
    return lambda: iter(source)


def _without(opened: Callable[[], Iterator[Any]], index: int) -> Callable[[], Iterator[Any]]:
    """The replayable scans but the one at ``index`` (leave-one-out statistics)."""
    return lambda: (item for i, item in enumerate(opened()) if i != index)


def _chan_merge(
    n_a: np.ndarray,
    mean_a: np.ndarray,
    m2_a: np.ndarray,
    n_b: np.ndarray,
    mean_b: np.ndarray,
    m2_b: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Combine (count, mean, sum of squared deviations) of two sample groups exactly (Chan et al.), elementwise."""
    n = n_a + n_b
    safe = np.where(n > 0, n, 1)
    delta = mean_b - mean_a
    mean = mean_a + delta * n_b / safe
    m2 = m2_a + m2_b + delta**2 * n_a * n_b / safe
    return n, mean, m2


# ----------------------------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviationResult:
    """Everything the detector reports for one scan."""

    zmap: np.ndarray  # post-processed z
    mask: np.ndarray  # binary anomaly mask at the calibrated threshold
    subject_score: float
    threshold: float


@dataclass(eq=False)
class NormativeCalibration:
    """Residual statistics of healthy validation scans, the calibrated threshold and the recipe that made them.

    ``voxelwise``: smoothed per-voxel mean/std on the model grid (``mean_map``, ``std_map``, ``count_map``).
    ``regional``: mean/std per region label (``region_ids``, ``region_mean``, ``region_std``), e.g. tissue classes.
    ``global``: median and MAD-based scale of all healthy brain voxels (``center``, ``scale``).
    The pooled mean/std of all healthy brain voxels serve as floor and as fallback where no healthy data exist.
    """

    config: DeviationConfig
    threshold: float
    pooled_mean: float
    pooled_std: float
    center: float = 0.0
    scale: float = 1.0
    mean_map: np.ndarray | None = None
    std_map: np.ndarray | None = None
    count_map: np.ndarray | None = None
    region_ids: np.ndarray | None = None
    region_mean: np.ndarray | None = None
    region_std: np.ndarray | None = None
    healthy_scores: np.ndarray | None = None
    n_scans: int = 0
    n_threshold_voxels: int = 0
    threshold_sample_exact: bool = True
    achieved_fpr: float = float("nan")
    # name -> {"median_filter_size", "min_component_vox", "threshold", "achieved_fpr"}
    variants: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    small_lesion_variant: str | None = None
    small_lesion_selection: dict[str, Any] | None = None  # how it was chosen (criterion, scans, scores)

    # -- fitting ---------------------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        residuals: Iterable[np.ndarray] | Callable[[], Iterable[np.ndarray]],
        masks: Iterable[np.ndarray] | Callable[[], Iterable[np.ndarray]],
        config: DeviationConfig | None = None,
        *,
        regions: Iterable[np.ndarray] | Callable[[], Iterable[np.ndarray]] | None = None,
        seed: int = 0,
        sample_capacity: int = 4_000_000,
        variants: dict[str, tuple[int, int]] | None = None,
        leave_one_out: bool = False,
    ) -> NormativeCalibration:
        """Fit on healthy residual maps (from :func:`residual_map`) and their brain masks, streaming.

        Pass 1 accumulates statistics (Welford/Chan: memory is a few grid-sized arrays whatever the number of
        scans). Pass 2 computes the post-processed z of the same scans and sets ``threshold`` to the
        (1 - target_fpr) quantile of their eroded-brain voxels, held in a seeded uniform sample of at most
        ``sample_capacity`` values (exact below it, recorded as ``threshold_sample_exact``). ``regions`` (integer
        label maps, e.g. tissue classes) are required for ``normalisation='regional'``. ``variants`` (default
        :data:`POSTPROCESS_VARIANTS`; ``{}`` for none): name -> (median filter size, minimum component size), each
        thresholded on the same scans at the same target false-positive rate. ``leave_one_out``: pass 2 scores
        each scan against the statistics of the OTHER scans, so the threshold is set on z-maps of scans the
        statistics never saw, as a new scan will be: with few scans (a site's five or six) a scan's own residual
        pulls its voxelwise mean and spread towards it and the in-sample threshold is too low. The statistics kept
        are those of all scans.
        """
        config = config or DeviationConfig()
        open_residuals = _replayable(residuals, "residuals")
        open_masks = _replayable(masks, "masks")
        open_regions = _replayable(regions if config.normalisation == "regional" else None, "regions")

        calibration = cls.fit_statistics(open_residuals, open_masks, config, regions=open_regions, seed=seed,
                                         sample_capacity=sample_capacity)
        variants = dict(POSTPROCESS_VARIANTS if variants is None else variants)
        configs = {name: dataclasses.replace(config, median_filter_size=int(median), min_component_vox=int(size))
                   for name, (median, size) in variants.items()}
        samples = {name: UniformSample(sample_capacity, seed=seed + 2 + i) for i, name in enumerate(configs)}
        sample = UniformSample(sample_capacity, seed=seed + 1)
        scores: list[float] = []
        def scored() -> Iterator[tuple[NormativeCalibration, np.ndarray, np.ndarray, np.ndarray | None]]:
            for index, (residual, mask, region) in enumerate(_scans(open_residuals, open_masks, open_regions)):
                if not leave_one_out:
                    yield calibration, residual, mask, region
                    continue
                others = [_without(opened, index) for opened in (open_residuals, open_masks, open_regions)]
                yield cls.fit_statistics(others[0], others[1], config, regions=others[2], seed=seed,
                                         sample_capacity=sample_capacity), residual, mask, region

        if leave_one_out and calibration.n_scans < 3:
            raise ValueError("a leave-one-out threshold needs at least 3 healthy scans")
        for statistics, residual, mask, region in scored():
            z = statistics.zmap(residual, mask, region)
            processed = postprocess(z, mask, config)
            kept = eroded_mask(mask, config.mask_erosion_vox)
            sample.add(processed[kept])
            for name, variant_config in configs.items():
                samples[name].add(postprocess(z, mask, variant_config)[kept])
            if config.subject_score != "lesion_load":
                scores.append(subject_score(processed, mask, config))
        for name, variant_config in configs.items():
            held = samples[name].values()
            threshold = upper_threshold(held, config.target_fpr)
            calibration.variants[name] = {"median_filter_size": variant_config.median_filter_size,
                                          "min_component_vox": variant_config.min_component_vox,
                                          "threshold": threshold, "achieved_fpr": float(np.mean(held > threshold))}
        values = sample.values()
        calibration.threshold = upper_threshold(values, config.target_fpr)
        calibration.achieved_fpr = float(np.mean(values > calibration.threshold))
        calibration.n_threshold_voxels = int(sample.n_seen)
        calibration.threshold_sample_exact = sample.exact
        if config.subject_score == "lesion_load":  # the score needs the threshold: one more pass
            for statistics, residual, mask, region in scored():
                processed = postprocess(statistics.zmap(residual, mask, region), mask, config)
                scores.append(subject_score(processed, mask, config, calibration.threshold))
        calibration.healthy_scores = np.asarray(scores, dtype=np.float64)
        return calibration

    @classmethod
    def fit_statistics(
        cls,
        residuals: Iterable[np.ndarray] | Callable[[], Iterable[np.ndarray]],
        masks: Iterable[np.ndarray] | Callable[[], Iterable[np.ndarray]],
        config: DeviationConfig | None = None,
        *,
        regions: Iterable[np.ndarray] | Callable[[], Iterable[np.ndarray]] | None = None,
        seed: int = 0,
        sample_capacity: int = 4_000_000,
    ) -> NormativeCalibration:
        """Pass 1 of :meth:`fit` alone: the healthy statistics, no threshold (NaN). A normative atlas is this with
        the scans themselves as "residuals" (voxelwise mean and std of healthy intensities)."""
        config = config or DeviationConfig()
        if config.normalisation == "regional" and regions is None:
            raise ValueError("normalisation='regional' needs region label maps (regions=...)")
        stats = StatisticsAccumulator(config, seed=seed, sample_capacity=sample_capacity)
        open_regions = _replayable(regions if config.normalisation == "regional" else None, "regions")
        for residual, mask, region in _scans(_replayable(residuals, "residuals"), _replayable(masks, "masks"),
                                             open_regions):
            stats.add(residual, mask, region)
        return stats.finish()

    def variant(self, name: str) -> NormativeCalibration:
        """This calibration under post-processing variant ``name`` (same statistics, its own threshold)."""
        if name not in self.variants:
            raise KeyError(f"no post-processing variant {name!r}; calibrated: {sorted(self.variants)}")
        entry = self.variants[name]
        config = dataclasses.replace(self.config, median_filter_size=int(entry["median_filter_size"]),
                                     min_component_vox=int(entry["min_component_vox"]))
        return dataclasses.replace(self, config=config, threshold=float(entry["threshold"]),
                                   achieved_fpr=float(entry["achieved_fpr"]), healthy_scores=None, variants={},
                                   small_lesion_variant=None, small_lesion_selection=None)

    # -- applying --------------------------------------------------------------------------------------------

    def zmap(self, residual: np.ndarray, mask: np.ndarray, regions: np.ndarray | None = None) -> np.ndarray:
        """Deviation of ``residual`` from the healthy statistics in units of healthy std; 0 outside ``mask``."""
        shape = tuple(self.mean_map.shape) if self.config.normalisation == "voxelwise" else None
        residual = check_volume(residual, "residual", None, shape).astype(np.float64)
        brain = check_mask(mask, residual.shape, None)
        if self.config.normalisation == "voxelwise":
            z = (residual - self.mean_map) / self.std_map
        elif self.config.normalisation == "regional":
            if regions is None:
                raise ValueError("regional normalisation needs the scan's region label map")
            labels = _mask_labels(regions, residual.shape)
            lookup_size = (
                max(int(labels.max()), int(self.region_ids.max()) if self.region_ids.size else 0) + 1
            )
            means = np.full(lookup_size, self.pooled_mean)
            stds = np.full(lookup_size, self.pooled_std)
            means[self.region_ids] = self.region_mean
            stds[self.region_ids] = self.region_std
            z = (residual - means[labels]) / stds[labels]
        else:
            z = (residual - self.center) / self.scale
        return np.where(brain, z, 0.0).astype(np.float32)

    def analyse(
        self, residual: np.ndarray, mask: np.ndarray, regions: np.ndarray | None = None
    ) -> DeviationResult:
        """z-map, post-processing, binary mask and subject score of one scan, exactly as calibrated."""
        processed = postprocess(self.zmap(residual, mask, regions), mask, self.config)
        return DeviationResult(
            zmap=processed,
            mask=binarize(processed, self.threshold, mask, self.config),
            subject_score=subject_score(processed, mask, self.config, self.threshold),
            threshold=self.threshold,
        )

    @property
    def healthy_score_mean(self) -> float | None:
        """Mean subject score of the healthy calibration scans (the reference a new scan's score is read against)."""
        scores = self.healthy_scores
        return float(scores.mean()) if scores is not None and scores.size else None

    @property
    def healthy_score_std(self) -> float | None:
        scores = self.healthy_scores
        return float(scores.std(ddof=1)) if scores is not None and scores.size > 1 else None

    def protocol(self) -> dict[str, Any]:
        """The calibration and post-processing recipe as plain values, for reports and model cards."""
        sample = "every voxel" if self.threshold_sample_exact else "a seeded uniform sample of the voxels"
        return {
            **to_dict(self.config),
            "grid_shape": list(self.mean_map.shape) if self.mean_map is not None else None,
            "threshold": self.threshold,
            "threshold_calibration": (
                f"quantile {1 - self.config.target_fpr:.4g} of post-processed z over {self.n_threshold_voxels} "
                f"eroded-brain voxels ({sample}) of {self.n_scans} healthy validation scans"
            ),
            "achieved_fpr_calibration": self.achieved_fpr,
            "n_calibration_scans": self.n_scans,
            "healthy_subject_score_mean": self.healthy_score_mean,
            "healthy_subject_score_std": self.healthy_score_std,
        }

    def variant_protocol(self) -> dict[str, Any]:
        """The post-processing variants' settings and thresholds, and the small-lesion choice, for reports."""
        return {"variants": {name: dict(entry) for name, entry in self.variants.items()},
                "small_lesion_variant": self.small_lesion_variant,
                "small_lesion_selection": self.small_lesion_selection}

    # -- persistence -----------------------------------------------------------------------------------------

    _ARRAY_FIELDS = ("mean_map", "std_map", "count_map", "region_ids", "region_mean", "region_std", "healthy_scores")
    _SCALAR_FIELDS = ("threshold", "pooled_mean", "pooled_std", "center", "scale", "n_scans", "n_threshold_voxels",
                      "threshold_sample_exact", "achieved_fpr")

    def save(self, path_dir: str | Path) -> Path:
        """Write ``calibration.safetensors`` (arrays) then ``calibration.json`` (config, scalars, the arrays'
        sha256), each atomically; the JSON is written last so it only ever describes a complete array file."""
        from safetensors.numpy import save_file

        directory = Path(path_dir)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {
            name: np.ascontiguousarray(getattr(self, name))
            for name in self._ARRAY_FIELDS
            if getattr(self, name) is not None
        }
        with atomic_path(directory / CALIBRATION_ARRAYS) as tmp:
            # one metadata key: safetensors writes a multi-key header in random order, and the bytes (and their
            # sha256 in calibration.json) must be the same each time the same calibration is saved
            save_file(arrays, str(tmp), metadata={"format": f"brainfm-calibration/{FORMAT_VERSION}"})
            digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        write_json(
            directory / CALIBRATION_JSON,
            {
                "format": "brainfm-calibration",
                "format_version": FORMAT_VERSION,
                "config": to_dict(self.config),
                **{name: _json_scalar(getattr(self, name)) for name in self._SCALAR_FIELDS},
                **self.variant_protocol(),
                "arrays_sha256": digest,
            },
        )
        return directory

    @classmethod
    def load(cls, path_dir: str | Path) -> NormativeCalibration:
        """Read a folder written by :meth:`save`; any missing, corrupt or mismatched file is a one-line error."""
        from safetensors.numpy import load_file

        directory = Path(path_dir)
        meta_path, arrays_path = directory / CALIBRATION_JSON, directory / CALIBRATION_ARRAYS
        for required in (meta_path, arrays_path):
            if not required.is_file():
                raise BrainFMInputError(required, "calibration file not found")
        try:
            meta = json.loads(meta_path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BrainFMInputError(meta_path, f"not valid JSON ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != "brainfm-calibration":
            raise BrainFMInputError(meta_path, "not a brainfm calibration file")
        if meta.get("format_version") not in (1, FORMAT_VERSION):
            raise BrainFMInputError(meta_path, f"unsupported format_version {meta.get('format_version')!r}")
        raw = arrays_path.read_bytes()
        if hashlib.sha256(raw).hexdigest() != meta.get("arrays_sha256"):
            raise BrainFMInputError(
                arrays_path, "checksum does not match calibration.json (corrupt or mixed files)"
            )
        try:
            config = from_dict(DeviationConfig, meta["config"], where=f"{meta_path}:config")
            arrays = load_file(str(arrays_path))
            scalars = {name: meta[name] for name in cls._SCALAR_FIELDS}
            variants = {str(k): dict(v) for k, v in (meta.get("variants") or {}).items()}
            for entry in variants.values():
                for key in ("median_filter_size", "min_component_vox", "threshold", "achieved_fpr"):
                    entry[key] = float("nan") if entry[key] is None else entry[key]
        except (ConfigError, KeyError, TypeError, AttributeError) as exc:
            raise BrainFMInputError(meta_path, f"incomplete calibration ({exc})") from exc
        except Exception as exc:  # safetensors raises its own error types for a damaged header
            raise BrainFMInputError(arrays_path, f"unreadable safetensors ({exc})") from exc
        unknown = set(arrays) - set(cls._ARRAY_FIELDS)
        if unknown:
            raise BrainFMInputError(arrays_path, f"unexpected arrays {sorted(unknown)}")
        scalars = {k: (float("nan") if v is None else v) for k, v in scalars.items()}
        if meta.get("small_lesion_variant") is not None and meta["small_lesion_variant"] not in variants:
            raise BrainFMInputError(meta_path, f"small_lesion_variant {meta['small_lesion_variant']!r} is not a "
                                               "calibrated variant")
        return cls(config=config, **scalars, **arrays, variants=variants,
                   small_lesion_variant=meta.get("small_lesion_variant"),
                   small_lesion_selection=meta.get("small_lesion_selection"))


def _json_scalar(value: Any) -> Any:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    value = float(value)
    return None if math.isnan(value) else value


def _mask_labels(regions: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    labels = check_volume(regions, "region map", None, shape)
    if labels.dtype.kind == "f":
        if not np.array_equal(labels, np.round(labels)):
            raise ValueError("region map must hold integer labels")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise ValueError("region labels must be >= 0")
    return labels


def _scans(
    open_residuals: Callable[[], Iterator[Any]],
    open_masks: Callable[[], Iterator[Any]],
    open_regions: Callable[[], Iterator[Any]],
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Yield checked (residual float64, mask bool, regions int | None) triples; counts must match."""
    residuals, masks, regions = open_residuals(), open_masks(), open_regions()
    index = 0
    for index, (residual, mask) in enumerate(zip(residuals, masks, strict=True)):
        where = f"healthy scan #{index}"
        residual = check_volume(residual, "residual", where).astype(np.float64)
        brain = check_mask(mask, residual.shape, where)
        if not brain.any():
            raise BrainFMInputError(where, "brain mask is empty")
        region = next(regions, None)
        yield residual, brain, None if region is None else _mask_labels(region, residual.shape)
    if next(regions, None) is not None:
        raise ValueError(f"more region maps than residuals ({index + 1})")


class StatisticsAccumulator:
    """Pass 1 of :meth:`NormativeCalibration.fit`: exact streaming moments, per voxel, region or pooled."""

    def __init__(self, config: DeviationConfig, seed: int, sample_capacity: int) -> None:
        self.config = config
        self.n_scans = 0
        self.pooled = (0.0, 0.0, 0.0)  # count, mean, M2 of all healthy brain voxels
        self.voxel: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.region = (np.zeros(0), np.zeros(0), np.zeros(0))
        self.sample = UniformSample(sample_capacity, seed=seed) if config.normalisation == "global" else None

    def add(self, residual: np.ndarray, mask: np.ndarray, regions: np.ndarray | None) -> None:
        self.n_scans += 1
        values = residual[mask]
        n, mean, m2 = _chan_merge(
            *map(np.float64, self.pooled),
            np.float64(values.size),
            values.mean(),
            ((values - values.mean()) ** 2).sum(),
        )
        self.pooled = (float(n), float(mean), float(m2))
        mode = self.config.normalisation
        if mode == "voxelwise":
            if self.voxel is None:
                self.voxel = (np.zeros(residual.shape), np.zeros(residual.shape), np.zeros(residual.shape))
            elif self.voxel[0].shape != residual.shape:
                raise BrainFMInputError(
                    f"healthy scan #{self.n_scans - 1}",
                    f"shape {residual.shape} differs from the first scan's {self.voxel[0].shape}; voxelwise "
                    "statistics need every scan on the same model grid",
                )
            weight = mask.astype(np.float64)
            self.voxel = _chan_merge(
                *self.voxel, weight, np.where(mask, residual, 0.0), np.zeros(residual.shape)
            )
        elif mode == "regional":
            if regions is None:
                raise ValueError(f"no region map for healthy scan #{self.n_scans - 1}")
            labels = regions[mask]
            size = max(int(labels.max()) + 1, self.region[0].size)
            count = np.bincount(labels, minlength=size).astype(np.float64)
            mean = np.bincount(labels, weights=values, minlength=size) / np.maximum(count, 1)
            m2 = np.bincount(labels, weights=(values - mean[labels]) ** 2, minlength=size)
            old = [np.pad(a, (0, size - a.size)) for a in self.region]
            self.region = _chan_merge(*old, count, mean, m2)
        else:
            self.sample.add(values)

    def finish(self) -> NormativeCalibration:
        config = self.config
        if self.n_scans == 0:
            raise ValueError("no healthy scans to calibrate on")
        count, mean, m2 = self.pooled
        if count < 2 or m2 <= 0:
            raise ValueError("healthy residuals are constant or too few; cannot estimate their spread")
        pooled_std = math.sqrt(m2 / (count - 1))
        floor = config.std_floor * pooled_std
        calibration = NormativeCalibration(
            config=config,
            threshold=float("nan"),
            pooled_mean=mean,
            pooled_std=pooled_std,
            n_scans=self.n_scans,
        )
        if config.normalisation == "voxelwise":
            if self.n_scans < 2:
                raise ValueError("voxelwise normalisation needs at least 2 healthy scans")
            n, voxel_mean, voxel_m2 = self.voxel
            sums, dof = n * voxel_mean, np.maximum(n - 1, 0)
            sigma = config.smoothing_sigma_vox
            if sigma > 0:
                # Gaussian-weighted pooled mean and variance: a convolution normalised by the sample counts.
                smooth = lambda a: ndimage.gaussian_filter(a, sigma, mode="constant", cval=0.0)  # noqa: E731
                sums, n, voxel_m2, dof = smooth(sums), smooth(n), smooth(voxel_m2), smooth(dof)
            has_mean, has_var = n > _SUPPORT_EPS, dof > _SUPPORT_EPS
            mean_map = np.where(has_mean, sums / np.where(has_mean, n, 1), mean)
            var_map = np.where(has_var, voxel_m2 / np.where(has_var, dof, 1), pooled_std**2)
            calibration.mean_map = mean_map.astype(np.float32)
            calibration.std_map = np.maximum(np.sqrt(var_map), floor).astype(np.float32)
            calibration.count_map = self.voxel[0].astype(np.int32)
        elif config.normalisation == "regional":
            n, region_mean, region_m2 = self.region
            present = np.flatnonzero(n > 0)
            stds = np.where(
                n[present] > 1, np.sqrt(region_m2[present] / np.maximum(n[present] - 1, 1)), pooled_std
            )
            calibration.region_ids = present.astype(np.int64)
            calibration.region_mean = region_mean[present].astype(np.float64)
            calibration.region_std = np.maximum(stds, floor).astype(np.float64)
        else:
            values = self.sample.values().astype(np.float64)
            center = float(np.median(values))
            calibration.center = center
            calibration.scale = max(MAD_TO_STD * float(np.median(np.abs(values - center))), floor)
        return calibration
