"""Model folders and per-scan anomaly detection: the code behind ``brainfm detect`` and ``brainfm evaluate``.

A model folder is diffusers-like, so the release tooling (``brainfm.hub``) can ship it as is::

    vae/ unet/ conditioner/ scheduler/      save_pretrained folders (config + safetensors)
    recipe.json                             the preprocessing recipe the model was trained with
    brainfm_config.json                     reconstruction settings, trained modalities, recipe copy, provenance
    calibration/                            healthy-cohort NormativeCalibration of the LDM reconstruction
    calibration/vae_only/                   ... and of the VAE-only baseline (so both are compared fairly)

Detection repeats the STORED recipe on the user's scan, refuses scans the model cannot serve (untrained modality,
slices far coarser than the training grid, a brain that does not fit the field of view), reconstructs a
pseudo-healthy scan, turns the residual into a calibrated z-map and writes every result on the INPUT's own grid
and affine. All files of one scan appear together or not at all.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainfm.anomaly.deviation import NormativeCalibration, residual_map
from brainfm.anomaly.reconstruct import PseudoHealthyReconstructor
from brainfm.config import (
    MODALITIES,
    ConfigError,
    DeviationConfig,
    PreprocessConfig,
    ReconstructionConfig,
    from_dict,
    to_dict,
)
from brainfm.data.manifest import ManifestRow, Rejection, read_manifest, scan_stem
from brainfm.data.preprocess import recipe_from_dict
from brainfm.io import BrainFMInputError, atomic_path, save_nifti, write_json

log = logging.getLogger(__name__)

BRAINFM_CONFIG = "brainfm_config.json"
RECIPE_FILE = "recipe.json"
CALIBRATION_DIR = "calibration"
VAE_CALIBRATION_SUBDIR = "vae_only"
COMPONENTS = ("vae", "unet", "conditioner", "scheduler")
FORMAT = "brainfm-model/1"
MAX_SPACING_RATIO = 3.0  # input voxels coarser than this many recipe voxels: most of the model input is invented
MAX_BORDER_BRAIN_FRACTION = 0.02  # more brain than this on the grid's faces: the brain was cut off by the FOV
MIN_BRAIN_ML = 300.0  # less brain than this: partial coverage (a few slices) or not a head scan


# ================================================================================================================
# Model folder
# ================================================================================================================


@dataclasses.dataclass
class BrainFMModel:
    """Everything detection needs, loaded from one model folder."""

    path: Path
    vae: Any
    unet: Any
    encoder: Any
    scheduler: Any
    recipe: PreprocessConfig
    reconstruction: ReconstructionConfig
    modalities: tuple[str, ...]
    config: dict[str, Any]
    calibration: NormativeCalibration | None = None
    vae_calibration: NormativeCalibration | None = None

    @property
    def spatial_dims(self) -> int:
        return int(self.vae.config.spatial_dims)

    def reconstructor(self, vae_only: bool = False, **overrides: Any) -> PseudoHealthyReconstructor:
        settings = dataclasses.replace(self.reconstruction, **overrides) if overrides else self.reconstruction
        return PseudoHealthyReconstructor.from_config(
            self.vae, self.unet, self.encoder, self.scheduler, settings, vae_only=vae_only
        )

    def calibration_for(self, vae_only: bool) -> NormativeCalibration:
        calibration = self.vae_calibration if vae_only else self.calibration
        if calibration is None:
            where = self.path / CALIBRATION_DIR / (VAE_CALIBRATION_SUBDIR if vae_only else "")
            raise BrainFMInputError(where, "model is not calibrated; run calibration on healthy validation scans")
        return calibration


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BrainFMInputError(path, "file not found") from None
    except (OSError, ValueError) as exc:
        raise BrainFMInputError(path, f"not valid JSON ({exc})") from exc


def load_model_dir(path: str | os.PathLike, device: str | torch.device | None = None) -> BrainFMModel:
    """Load a model (or release) folder, or a Hub repo id, safely: safetensors only, allow-listed classes."""
    from brainfm import hub

    folder = hub.resolve_model_path(path)
    components = hub.load_components(folder)
    config_path = folder / BRAINFM_CONFIG
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise BrainFMInputError(config_path, "expected a JSON object")
    if (folder / RECIPE_FILE).is_file():
        recipe = recipe_from_dict(_read_json(folder / RECIPE_FILE), folder / RECIPE_FILE)
    elif "preprocess" in config:
        recipe = recipe_from_dict(config["preprocess"], config_path)
    else:
        raise BrainFMInputError(folder / RECIPE_FILE, "no preprocessing recipe in the model folder")
    try:
        reconstruction = from_dict(ReconstructionConfig, config.get("reconstruction", {}), f"{config_path}:reconstruction")
    except ConfigError as exc:
        raise BrainFMInputError(config_path, str(exc)) from exc
    modalities = tuple(str(m).upper() for m in config.get("modalities", ()))
    if not modalities or any(m not in MODALITIES for m in modalities):
        raise BrainFMInputError(config_path, f"'modalities' must list trained modalities among {list(MODALITIES)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae, unet, encoder = (components[k].to(device).eval() for k in ("vae", "unet", "conditioner"))
    if unet.config.spatial_dims != vae.config.spatial_dims:
        raise BrainFMInputError(folder / "unet", "UNet and VAE disagree on spatial_dims")
    calibration = vae_calibration = None
    calibration_dir = folder / CALIBRATION_DIR
    if (calibration_dir / "calibration.json").is_file():
        calibration = NormativeCalibration.load(calibration_dir)
    if (calibration_dir / VAE_CALIBRATION_SUBDIR / "calibration.json").is_file():
        vae_calibration = NormativeCalibration.load(calibration_dir / VAE_CALIBRATION_SUBDIR)
    return BrainFMModel(
        path=folder, vae=vae, unet=unet, encoder=encoder, scheduler=components["scheduler"], recipe=recipe,
        reconstruction=reconstruction, modalities=modalities, config=config, calibration=calibration,
        vae_calibration=vae_calibration,
    )


def _component_dir(run_dir: Path, name: str) -> Path:
    """A stage export inside a pretraining run folder: ``RUN/name`` or ``RUN/{vae,ldm}/name``."""
    marker = "scheduler_config.json" if name == "scheduler" else "config.json"
    candidates = [run_dir / name, run_dir / "ldm" / name, run_dir / "vae" / name]
    for candidate in candidates:
        if (candidate / marker).is_file():
            return candidate
    raise BrainFMInputError(run_dir, f"no '{name}' export found (looked in {', '.join(map(str, candidates))})")


def assemble_model_dir(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    reconstruction: ReconstructionConfig | None = None,
    modalities: Sequence[str] | None = None,
) -> Path:
    """Build a model folder from a pretraining run's exports (VAE, UNet, conditioner, scheduler, data recipe).

    Components are loaded and re-saved with ``save_pretrained`` (safetensors), so the folder holds exactly what
    ``load_model_dir`` reads. ``modalities`` default to those of the run's training shards. Atomic: the folder
    appears complete or not at all, and replaces an existing one whole (recalibrate after re-assembling).
    """
    import yaml

    from brainfm.hub import load_component

    run_dir, out = Path(run_dir), Path(out)
    dirs = {name: _component_dir(run_dir, name) for name in COMPONENTS}
    ldm_run = dirs["unet"].parent
    pretrain_config: dict[str, Any] = {}
    if (ldm_run / "config.yaml").is_file():
        pretrain_config = yaml.safe_load((ldm_run / "config.yaml").read_text()) or {}
        vae_path = (pretrain_config.get("ldm") or {}).get("vae_path")
        if vae_path and (Path(vae_path) / "config.json").is_file():
            dirs["vae"] = Path(vae_path)  # the VAE this LDM was actually trained on
    recipe_source = next((p for p in (ldm_run / "data_recipe.json", dirs["vae"].parent / "data_recipe.json")
                          if p.is_file()), None)
    if recipe_source is None:
        raise BrainFMInputError(ldm_run / "data_recipe.json", "the run holds no data recipe")
    data_recipe = _read_json(recipe_source)
    recipe_payload = data_recipe.get("recipe", data_recipe)
    recipe = recipe_from_dict(recipe_payload, recipe_source)
    if modalities is None:
        shard_dir = Path((pretrain_config.get("data") or {}).get("shard_dir", ""))
        if not (shard_dir / "index.json").is_file():
            raise BrainFMInputError(shard_dir, "cannot find the training shards to learn the modalities; "
                                               "pass modalities=")
        from brainfm.data.writer import load_index

        train_split = (pretrain_config.get("data") or {}).get("train_split", "train")
        modalities = load_index(shard_dir)["modalities"].get(train_split, [])
    components = {name: load_component(d.parent, d.name) for name, d in dirs.items()}
    extra = {"pretrain_config.yaml": ldm_run / "config.yaml"} if (ldm_run / "config.yaml").is_file() else {}
    return save_model_dir(
        out, components["vae"], components["unet"], components["conditioner"], components["scheduler"], recipe,
        modalities=modalities, reconstruction=reconstruction, provenance={"source_run": str(run_dir.resolve())},
        extra_files=extra,
    )


def save_model_dir(
    out: str | os.PathLike,
    vae: Any,
    unet: Any,
    encoder: Any,
    scheduler: Any,
    recipe: PreprocessConfig,
    *,
    modalities: Sequence[str],
    reconstruction: ReconstructionConfig | None = None,
    provenance: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, Path] | None = None,
) -> Path:
    """Write in-memory components as a model folder (atomic; no calibration yet)."""
    from brainfm import __version__
    from brainfm.data.preprocess import recipe_dict

    out = Path(out)
    modalities = tuple(str(m).upper() for m in modalities)
    if not modalities or any(m not in MODALITIES for m in modalities):
        raise BrainFMInputError(out, f"modalities {modalities} must be among {list(MODALITIES)}")
    config = {
        "format": FORMAT,
        "package_version": __version__,
        "spatial_dims": int(vae.config.spatial_dims),
        "modalities": list(modalities),
        "reconstruction": to_dict(reconstruction or ReconstructionConfig()),
        "preprocess": recipe_dict(recipe),
        "anatomy_channels": ["brain_mask", *recipe.tissue_priors],
        **dict(provenance or {}),
    }
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for name, model in (("vae", vae), ("unet", unet), ("conditioner", encoder)):
            model.save_pretrained(str(tmp / name), safe_serialization=True)
        scheduler.save_pretrained(str(tmp / "scheduler"))
        write_json(tmp / RECIPE_FILE, recipe_dict(recipe))
        write_json(tmp / BRAINFM_CONFIG, config)
        for name, source in (extra_files or {}).items():
            shutil.copy2(source, tmp / name)
    return out


def update_model_config(model_dir: str | os.PathLike, **changes: Any) -> dict[str, Any]:
    """Merge keys into a model folder's ``brainfm_config.json`` (atomic rewrite)."""
    path = Path(model_dir) / BRAINFM_CONFIG
    config = _read_json(path)
    config.update(changes)
    write_json(path, config)
    return config


# ================================================================================================================
# One scan
# ================================================================================================================


@dataclasses.dataclass
class PreparedScan:
    """A scan on the model grid with its anatomy conditioning and metadata in the shard reader's format."""

    scan: Any  # brainfm.data.preprocess.PreprocessedScan
    anatomy: np.ndarray  # (1 + priors, X, Y, Z): brain mask + tissue priors, as the UNet was trained
    meta: dict[str, Any]

    @property
    def voxel_volume_ml(self) -> float:
        return abs(float(np.linalg.det(self.scan.affine[:3, :3]))) / 1000.0


@dataclasses.dataclass
class ScanAnalysis:
    """Pseudo-healthy reconstruction and deviation maps of one scan on the model grid."""

    reconstruction: np.ndarray
    uncertainty: np.ndarray
    residual: np.ndarray
    zmap: np.ndarray
    mask: np.ndarray
    subject_score: float
    threshold: float
    settings: dict[str, Any]


def scan_meta(modality: str, meta: Mapping[str, Any] | None, scalars: Mapping[str, float]) -> dict[str, Any]:
    """Metadata with the SAME keys the shard writer stores (modality, age, sex, site, scalars), so the
    conditioner sees at inference exactly what it saw in training."""
    meta = dict(meta or {})
    age = meta.get("age")
    try:
        age = None if age in (None, "") else float(age)
    except (TypeError, ValueError):
        age = None
    return {
        "modality": modality,
        "age": age,
        "sex": meta.get("sex") or None,
        "site": meta.get("site") or None,
        "scalars": {k: float(v) for k, v in scalars.items()},
    }


def _check_geometry(model: BrainFMModel, scan: Any, path: Path) -> None:
    source_spacing = np.linalg.norm(np.asarray(scan.source_affine)[:3, :3], axis=0)
    finest = min(model.recipe.spacing)
    if float(source_spacing.max()) > MAX_SPACING_RATIO * finest:
        raise BrainFMInputError(
            path, f"voxel spacing {np.round(source_spacing, 2).tolist()} mm is too coarse for a model trained at "
                  f"{list(model.recipe.spacing)} mm (more than {MAX_SPACING_RATIO:g}x)",
        )
    mask = np.asarray(scan.mask) > 0
    brain_ml = float(mask.sum()) * abs(float(np.linalg.det(scan.affine[:3, :3]))) / 1000.0
    if brain_ml < MIN_BRAIN_ML:
        raise BrainFMInputError(path, f"only {brain_ml:.0f} ml of brain found (partial coverage or not a head scan; "
                                      f"at least {MIN_BRAIN_ML:.0f} ml needed)")
    border = np.zeros_like(mask)
    for axis in range(3):
        index = [slice(None)] * 3
        for end in (0, -1):
            index[axis] = end
            border[tuple(index)] = True
    on_border = float((mask & border).sum()) / float(mask.sum())
    if on_border > MAX_BORDER_BRAIN_FRACTION:
        raise BrainFMInputError(path, f"the brain does not fit the model's field of view ({on_border:.1%} of brain "
                                      f"voxels on the edge of the {list(model.recipe.shape)} grid)")


def prepare_scan(
    model: BrainFMModel,
    path: str | os.PathLike,
    modality: str | None = None,
    mask_path: str | os.PathLike | None = None,
    label_path: str | os.PathLike | None = None,
    meta: Mapping[str, Any] | None = None,
) -> PreparedScan:
    """Preprocess with the model's stored recipe and compute the anatomy conditioning; refuse what the model
    cannot serve with a one-line ``BrainFMInputError`` naming the file."""
    from brainfm.data.anatomy import compute_anatomy
    from brainfm.data.preprocess import preprocess_scan

    path = Path(path)
    if modality is None:
        if len(model.modalities) != 1:
            raise BrainFMInputError(path, f"give the modality: this model serves {list(model.modalities)}")
        modality = model.modalities[0]
    modality = str(modality).upper()
    if modality not in model.modalities:
        raise BrainFMInputError(
            path, f"modality {modality} is not one this model was trained on ({', '.join(model.modalities)})"
        )
    scan = preprocess_scan(path, modality, model.recipe, mask_path=mask_path, label_path=label_path)
    _check_geometry(model, scan, path)
    anatomy = compute_anatomy(scan, model.recipe)
    stacked = np.concatenate([np.asarray(scan.mask, dtype=np.float32)[None], anatomy.priors.astype(np.float32)])
    return PreparedScan(scan=scan, anatomy=stacked, meta=scan_meta(modality, meta, anatomy.scalars))


def analyse(
    model: BrainFMModel,
    image: np.ndarray,
    brain_mask: np.ndarray,
    anatomy: np.ndarray,
    meta: Mapping[str, Any],
    *,
    vae_only: bool = False,
    reconstructor: PseudoHealthyReconstructor | None = None,
    calibration: NormativeCalibration | None = None,
    source: str | None = None,
) -> ScanAnalysis:
    """Reconstruct and score one model-grid volume (the shared core of detect, calibrate-free evaluation)."""
    reconstructor = reconstructor or model.reconstructor(vae_only=vae_only)
    calibration = calibration or model.calibration_for(vae_only)
    recon, spread = reconstructor.reconstruct(
        torch.from_numpy(np.asarray(image, dtype=np.float32))[None], torch.from_numpy(anatomy), meta
    )
    mask = np.asarray(brain_mask) > 0
    reconstruction = recon[0].numpy() * mask
    uncertainty = spread[0].numpy() * mask
    residual = residual_map(image, reconstruction, mask, calibration.config.residual, source=source)
    result = calibration.analyse(residual, mask)
    return ScanAnalysis(
        reconstruction=reconstruction.astype(np.float32), uncertainty=uncertainty.astype(np.float32),
        residual=residual, zmap=result.zmap, mask=np.asarray(result.mask, dtype=np.uint8),
        subject_score=float(result.subject_score), threshold=float(result.threshold),
        settings=reconstructor.settings(),
    )


def _versions() -> dict[str, str]:
    import diffusers
    import monai

    from brainfm import __version__

    return {"brainfm": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "monai": monai.__version__, "numpy": np.__version__}


def _figure_slices(mask: np.ndarray, anomaly: np.ndarray, count: int = 5) -> list[int]:
    """Evenly spaced axial slices through the brain, always including the slice with the most anomaly."""
    occupied = np.flatnonzero(mask.sum(axis=(0, 1)))
    if occupied.size == 0:
        return [mask.shape[2] // 2]
    low, high = occupied.min(), occupied.max()
    picks = {int(round(v)) for v in np.linspace(low + 0.15 * (high - low), high - 0.15 * (high - low), count)}
    if anomaly.any():
        worst = int(np.argmax(anomaly.sum(axis=(0, 1))))
        if worst not in picks:
            picks.remove(min(picks, key=lambda z: abs(z - worst)))
            picks.add(worst)
    return sorted(picks)


def _write_figure(path: Path, image: np.ndarray, analysis: ScanAnalysis, brain: np.ndarray, title: str) -> None:
    """3 rows x a few axial slices: scan | pseudo-healthy | deviation overlay with the mask contour."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    slices = _figure_slices(brain, analysis.mask)
    figure = Figure(figsize=(2.2 * len(slices), 7.0))
    FigureCanvasAgg(figure)
    high = max(float(analysis.zmap.max()), analysis.threshold * 1.5, 1e-6)
    rows = ("scan", "pseudo-healthy", f"z > 0, mask at z > {analysis.threshold:.2f}")
    for column, z in enumerate(slices):
        for row in range(3):
            axes = figure.add_subplot(3, len(slices), row * len(slices) + column + 1)
            base = image if row != 1 else analysis.reconstruction
            axes.imshow(np.rot90(base[:, :, z]), cmap="gray", vmin=0.0, vmax=1.0)
            if row == 2:
                z_slice = np.rot90(analysis.zmap[:, :, z])
                axes.imshow(np.ma.masked_less_equal(z_slice, 0.0), cmap="hot", vmin=0.0, vmax=high, alpha=0.7)
                mask_slice = np.rot90(analysis.mask[:, :, z]).astype(float)
                if mask_slice.any():
                    axes.contour(mask_slice, levels=[0.5], colors="cyan", linewidths=0.8)
            axes.set_xticks([])
            axes.set_yticks([])
            if column == 0:
                axes.set_ylabel(rows[row], fontsize=8)
            if row == 0:
                axes.set_title(f"z={z}", fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)


def _commit_files(out_dir: Path, writers: Mapping[str, Callable[[Path], None]]) -> dict[str, Path]:
    """Write every file into a hidden staging folder, then move them all into ``out_dir``: a failure anywhere
    leaves none of this scan's outputs behind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".brainfm-staging-", dir=out_dir))
    moved: list[Path] = []
    try:
        for name, write in writers.items():
            write(staging / name)
        for name in writers:
            target = out_dir / name
            os.replace(staging / name, target)
            moved.append(target)
    except BaseException:
        for target in moved:
            target.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {name: out_dir / name for name in writers}


@dataclasses.dataclass
class DetectionResult:
    name: str
    subject_score: float
    threshold: float
    anomalous_fraction: float
    files: dict[str, Path]
    seconds: float


def detect_scan(
    model: BrainFMModel,
    path: str | os.PathLike,
    modality: str | None = None,
    mask_path: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = ".",
    meta: Mapping[str, Any] | None = None,
    *,
    vae_only: bool = False,
    name: str | None = None,
    reconstructor: PseudoHealthyReconstructor | None = None,
    head: Any = None,
) -> DetectionResult:
    """Detect anomalies in one scan and write ``{name}_pseudohealthy/_zmap/_mask/_uncertainty.nii.gz``,
    ``{name}.json`` and ``{name}.png`` into ``out_dir``, NIfTIs on the input's own grid and affine."""
    from brainfm.data.preprocess import to_input_space

    started = time.perf_counter()
    path = Path(path)
    name = name or scan_stem(path)
    calibration = model.calibration_for(vae_only)
    prepared = prepare_scan(model, path, modality, mask_path, meta=meta)
    scan = prepared.scan
    analysis = analyse(model, scan.image, scan.mask, prepared.anatomy, prepared.meta, vae_only=vae_only,
                       reconstructor=reconstructor, calibration=calibration, source=str(path))
    brain = np.asarray(scan.mask) > 0
    native = {
        "pseudohealthy": to_input_space(analysis.reconstruction, scan, order=1),
        "zmap": to_input_space(analysis.zmap * brain, scan, order=1),
        "mask": to_input_space(analysis.mask.astype(np.uint8), scan, order=0).astype(np.uint8),
        "uncertainty": to_input_space(analysis.uncertainty, scan, order=1),
    }
    head_mask = None
    if head is not None:  # a fine-tuned head (brainfm.finetune.HeadPredictor): probability and calibrated mask
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
        "modality": scan.modality,
        "model": str(model.path),
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
        "anomalous_fraction_of_brain": float(analysis.mask.sum()) / max(kept, 1),
        "max_z": float(analysis.zmap[brain].max()) if kept else 0.0,
        "intensity_units": "pseudo-healthy in the model's normalised [0, 1] intensity (brain-masked)",
        "metadata": prepared.meta,
        "outputs": sorted([*files, f"{name}.json", f"{name}.png"]),
        "settings": {
            "reconstruction": analysis.settings,
            "deviation": to_dict(calibration.config),
            "calibration": {"n_scans": calibration.n_scans, "achieved_fpr": calibration.achieved_fpr},
            "preprocess": to_dict(model.recipe),
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
    writers[f"{name}.png"] = lambda target: _write_figure(
        target, scan.image, analysis, brain, f"{name}: subject score {analysis.subject_score:.2f}, "
                                             f"{report['anomalous_volume_ml']:.1f} ml flagged")
    report["seconds"] = round(time.perf_counter() - started, 3)
    writers[f"{name}.json"] = lambda target: write_json(target, report)
    written = _commit_files(Path(out_dir), writers)
    return DetectionResult(name=name, subject_score=analysis.subject_score, threshold=analysis.threshold,
                           anomalous_fraction=report["anomalous_fraction_of_brain"], files=written,
                           seconds=report["seconds"])


# ================================================================================================================
# Inputs: one scan, a DICOM folder, or a manifest
# ================================================================================================================


def collect_inputs(source: str | os.PathLike, modality: str | None = None,
                   mask: str | os.PathLike | None = None) -> tuple[list[ManifestRow], list[Rejection]]:
    """``source`` is a scan file, a DICOM series folder, or a manifest CSV; returns usable and rejected rows."""
    source = Path(source)
    if source.suffix.lower() == ".csv":
        if mask is not None:
            raise BrainFMInputError(source, "--mask applies to a single scan; give masks in the manifest's 'mask' column")
        return read_manifest(source, default_modality=modality)
    return [ManifestRow.single(source, modality=modality, mask=mask)], []


def detect_many(
    model: BrainFMModel,
    inputs: Sequence[ManifestRow],
    out_dir: str | os.PathLike,
    *,
    vae_only: bool = False,
    progress: bool = True,
    on_error: Callable[[ManifestRow, BrainFMInputError], None] | None = None,
    head: Any = None,
) -> tuple[list[DetectionResult], list[tuple[ManifestRow, str]]]:
    """Detect over several scans; a bad scan is reported and skipped, the others go on."""
    from tqdm.auto import tqdm

    reconstructor = model.reconstructor(vae_only=vae_only)
    results, failures = [], []
    for item in tqdm(inputs, desc="detect", unit="scan", disable=not progress or None):
        try:
            results.append(detect_scan(model, item.path, item.modality, item.mask, out_dir, item.meta,
                                       vae_only=vae_only, name=item.name, reconstructor=reconstructor,
                                       head=head))
        except BrainFMInputError as exc:
            failures.append((item, str(exc)))
            if on_error is not None:
                on_error(item, exc)
    return results, failures


# ================================================================================================================
# Calibration on healthy validation scans
# ================================================================================================================


def _healthy_volumes(source: Path, split: str, model: BrainFMModel) -> Iterator[tuple[np.ndarray, np.ndarray,
                                                                                       np.ndarray, dict]]:
    """(image, mask, anatomy, meta) of healthy scans: from shards (already preprocessed with the same recipe) or
    from a manifest (preprocessed here with the model's recipe)."""
    if source.is_dir():
        from brainfm.data.reader import make_dataloader
        from brainfm.data.writer import load_index

        index = load_index(source)
        stored = recipe_from_dict(index.get("recipe", {}), source / "index.json")
        if stored != model.recipe:
            raise BrainFMInputError(source, "shards were built with a different preprocessing recipe than the model's")
        loader = make_dataloader(source, split, mode="3d", batch_size=1, drop_last=False, min_brain_fraction=0.0,
                                 on_corrupt="raise")
        for batch in loader:
            meta = batch["meta"][0]
            if batch.get("label") is not None and bool(batch["label"].any()):
                continue  # calibration must see healthy scans only
            mask = batch["mask"][0]
            anatomy = torch.cat([mask, batch["anatomy"][0]]).numpy().astype(np.float32)
            yield (batch["image"][0, 0].numpy().astype(np.float32), mask[0].numpy() > 0, anatomy,
                   scan_meta(meta["modality"], meta, meta.get("scalars") or {}))
        return
    items, rejected = read_manifest(source)
    if rejected:
        raise BrainFMInputError(None, rejected[0].message)  # the message names the file
    for item in items:
        if (item.split and item.split != split) or item.label is not None:
            continue
        prepared = prepare_scan(model, item.path, item.modality, item.mask, meta=item.meta)
        yield prepared.scan.image, prepared.scan.mask > 0, prepared.anatomy, prepared.meta


def calibrate(
    model_dir: str | os.PathLike,
    source: str | os.PathLike,
    split: str = "val",
    *,
    config: DeviationConfig | None = None,
    include_vae_baseline: bool = True,
    max_scans: int | None = None,
    progress: bool = True,
) -> NormativeCalibration:
    """Fit the healthy-cohort calibration (z-map statistics and threshold) and save it into the model folder.

    ``source``: a shard folder (uses ``split``) or a manifest CSV (rows of ``split`` — or all rows without a
    split column — that have no lesion label). The VAE-only baseline is calibrated on the same scans so both
    methods get a threshold at the same healthy false-positive rate. Written atomically into ``calibration/``.
    """
    from tqdm.auto import tqdm

    model_dir = Path(model_dir)
    model = load_model_dir(model_dir)
    config = config or DeviationConfig()
    methods = {"ldm": model.reconstructor(vae_only=False)}
    if include_vae_baseline:
        methods["vae"] = model.reconstructor(vae_only=True)
    residuals: dict[str, list[np.ndarray]] = {k: [] for k in methods}
    masks: list[np.ndarray] = []
    volumes = _healthy_volumes(Path(source), split, model)
    for count, (image, mask, anatomy, meta) in enumerate(tqdm(volumes, desc="calibrate", unit="scan",
                                                              disable=not progress or None)):
        if max_scans is not None and count >= max_scans:
            break
        masks.append(mask)
        for key, reconstructor in methods.items():
            recon, _ = reconstructor.reconstruct(torch.from_numpy(image)[None], torch.from_numpy(anatomy), meta)
            residuals[key].append(residual_map(image, recon[0].numpy() * mask, mask, config.residual))
    if len(masks) < 2:
        raise BrainFMInputError(source, f"calibration needs at least 2 healthy scans in split {split!r}, "
                                        f"found {len(masks)}")
    fitted = {key: NormativeCalibration.fit(residuals[key], masks, config) for key in methods}
    with atomic_path(model_dir / CALIBRATION_DIR) as tmp:
        fitted["ldm"].save(tmp)
        if "vae" in fitted:
            fitted["vae"].save(tmp / VAE_CALIBRATION_SUBDIR)
    update_model_config(model_dir, calibration={
        "source": str(source), "split": split, "n_scans": len(masks), "threshold": fitted["ldm"].threshold,
        "target_fpr": config.target_fpr, "vae_baseline_threshold": fitted["vae"].threshold if "vae" in fitted else None,
    })
    return fitted["ldm"]


# ================================================================================================================
# Evaluation
# ================================================================================================================


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


def _cases_from_manifest(model: BrainFMModel, manifest: Path, failures: list[tuple[str, str]]) -> Iterator[EvalCase]:
    items, rejected = read_manifest(manifest)
    for rejection in rejected:
        failures.append((rejection.path, rejection.message))
        log.warning("skipping %s", rejection.message)
    for item in items:
        try:
            prepared = prepare_scan(model, item.path, item.modality, item.mask, item.label, meta=item.meta)
        except BrainFMInputError as exc:
            failures.append((str(item.path), str(exc)))
            log.warning("skipping %s", exc)
            continue
        scan = prepared.scan
        label = None if item.label is None else np.asarray(scan.label) > 0
        yield EvalCase(item.name, scan.image, np.asarray(scan.mask) > 0, prepared.anatomy,
                       prepared.meta, label, item.lesion_type, prepared.voxel_volume_ml)


def _cases_from_shards(model: BrainFMModel, shard_dir: Path, split: str) -> Iterator[EvalCase]:
    """Scans already preprocessed (with the model's recipe, checked) and registered when the shards were built."""
    from brainfm.data.reader import make_dataloader
    from brainfm.data.writer import load_index

    stored = recipe_from_dict(load_index(shard_dir).get("recipe", {}), shard_dir / "index.json")
    if stored != model.recipe:
        raise BrainFMInputError(shard_dir, "shards were built with a different preprocessing recipe than the model's")
    voxel_ml = float(np.prod(model.recipe.spacing)) / 1000.0
    loader = make_dataloader(shard_dir, split, mode="3d", batch_size=1, drop_last=False, min_brain_fraction=0.0,
                             on_corrupt="raise")
    for batch in loader:
        meta = batch["meta"][0]
        mask = batch["mask"][0]
        label = None
        if "label" in batch and bool(batch["label_present"][0]):
            label = batch["label"][0, 0].numpy() > 0.5
        yield EvalCase(str(meta.get("subject") or meta.get("key")), batch["image"][0, 0].numpy().astype(np.float32),
                       mask[0].numpy() > 0, torch.cat([mask, batch["anatomy"][0]]).numpy().astype(np.float32),
                       scan_meta(meta["modality"], meta, meta.get("scalars") or {}), label,
                       meta.get("lesion_type") or None, voxel_ml)


def evaluate(
    model: BrainFMModel | str | os.PathLike,
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    vae_only: bool = False,
    compare_vae: bool = False,
    split: str = "test",
    n_examples: int = 4,
    progress: bool = True,
    head: Any = None,
) -> EvaluationResult:
    """Score labelled lesion scans and healthy controls; write metrics.json, report.md and figures.

    ``source``: a manifest CSV (rows without a label are healthy controls), or a shard folder whose ``split`` is
    evaluated from its stored preprocessing. ``compare_vae`` adds the VAE-reconstruction baseline on the same
    scans, each method with its own healthy-calibrated threshold.
    """
    from tqdm.auto import tqdm

    from brainfm.evaluation import MetricAccumulator, write_report

    if not isinstance(model, BrainFMModel):
        model = load_model_dir(model)
    source = Path(source)
    methods = ["vae"] if vae_only else (["ldm", "vae"] if compare_vae else ["ldm"])
    calibrations = {m: model.calibration_for(m == "vae") for m in methods}
    reconstructors = {m: model.reconstructor(vae_only=m == "vae") for m in methods}
    accumulators = {m: MetricAccumulator(threshold=calibrations[m].threshold) for m in methods}
    seconds = {m: 0.0 for m in methods}
    if head is not None:  # a fine-tuned head on the first method's maps, with its own calibrated threshold
        if head.threshold is None:
            raise BrainFMInputError(head.path, "head is not calibrated (no threshold in head_config.json)")
        head_accumulator = MetricAccumulator(threshold=head.threshold)
        seconds["head"] = 0.0
    examples: list[dict[str, Any]] = []
    example_types: set[str] = set()
    failures: list[tuple[str, str]] = []
    cases = _cases_from_shards(model, source, split) if source.is_dir() else _cases_from_manifest(model, source,
                                                                                                   failures)
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
            analysis = analyse(model, case.image, case.mask, case.anatomy, case.meta,
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
        raise BrainFMInputError(source, "no scan could be evaluated")
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
            spacing_mm=list(model.recipe.spacing),
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
    paths = write_report(metrics, protocol, out_dir, examples=examples)
    if failures:
        write_json(Path(out_dir) / "failures.json", [{"path": p, "error": e} for p, e in failures])
    return EvaluationResult(metrics=metrics, paths=paths, failures=failures, seconds_per_scan=per_scan)
