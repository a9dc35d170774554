"""``BrainFMPipeline``: THE owner of a brainfm model folder, as one diffusers pipeline object.

Components (registered like any diffusers pipeline, so ``components``, ``.to()`` and offload behave as users
expect): ``vae``, ``unet``, ``conditioner``, ``noise_scheduler`` (the training noise schedule; the few-step
``sampler`` is built from it) and an optional fine-tuned ``head``. Registered configuration (``model_index.json``):
the preprocessing ``recipe`` the model was trained with, its ``modalities``, ``reconstruction`` settings, the
conditioner's vocabulary, a calibration summary, the head's settings, provenance and a site adaptation record.
Own files: the healthy calibration (``calibration/``, safetensors + JSON), the head's LoRA adapters
(``head_lora/``) and a site's LoRA adapters for the UNet (``unet_lora/``, written by ``brainfm adapt``).

Loading never runs code from the folder: :mod:`brainfm.safety` checks every file first (safetensors only,
allow-listed classes) and each component is loaded by its own allow-listed class. Calling the pipeline runs the
per-scan core, which lives here: prepare a scan with the stored recipe, reconstruct it pseudo-healthy, turn the
residual into a calibrated deviation map (and run the head, when there is one). Commands (calibrate, detect,
evaluate, release) sit above this module.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from brainfm import safety
from brainfm.anomaly.baselines import Baselines
from brainfm.anomaly.deviation import channel_residual
from brainfm.anomaly.head import HEAD_CONFIG, HEAD_SUBDIR, LORA_SUBDIR, HeadPredictor, read_lora, write_lora
from brainfm.anomaly.normative import NormativeCalibration
from brainfm.anomaly.reconstruct import PseudoHealthyReconstructor
from brainfm.config import MODALITIES, ConfigError, PreprocessConfig, ReconstructionConfig, from_dict, to_dict
from brainfm.data.preprocess import check_serving_geometry, preprocess_scan, recipe_dict, recipe_from_dict
from brainfm.io import BrainFMInputError, atomic_dir
from brainfm.version import __version__

CALIBRATION_DIR = "calibration"
VAE_CALIBRATION_SUBDIR = "vae_only"
BASELINES_SUBDIR = "baselines"  # calibration/baselines/: intensity, normative atlas, prior-fit check
HEAD_LORA_DIR = "head_lora"
UNET_LORA_DIR = "unet_lora"  # a site's adapters; the folder's unet/ keeps the foundation weights
_VOCABULARY_KEYS = ("modalities", "sites", "sexes", "scalar_keys", "scalar_norms")


@dataclasses.dataclass
class BrainFMPipelineOutput(BaseOutput):
    """Deviation mapping of one scan, on the model's preprocessed grid (``affine`` maps it to world space)."""

    pseudo_healthy: np.ndarray
    z_map: np.ndarray
    mask: np.ndarray
    score: float
    threshold: float
    affine: np.ndarray
    image: np.ndarray  # the preprocessed input the maps refer to
    uncertainty: np.ndarray  # spread of the reconstruction ensemble
    head_probability: np.ndarray | None = None  # the fine-tuned head's map, when the model ships one
    head_mask: np.ndarray | None = None  # ... binarised at its healthy-calibrated threshold


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


def _vocabulary(conditioner: Any) -> dict[str, Any]:
    config = dict(getattr(conditioner, "config", {}) or {})
    return {k: _plain(config[k]) for k in _VOCABULARY_KEYS if k in config}


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: what a JSON round trip gives back."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class BrainFMPipeline(DiffusionPipeline):
    """Pseudo-healthy reconstruction and deviation maps for brain MRI/CT; the model folder's one reader/writer."""

    model_cpu_offload_seq = "conditioner->unet->vae"
    _optional_components = ["head"]

    def __init__(
        self,
        vae: Any,
        unet: Any,
        conditioner: Any,
        noise_scheduler: Any,
        head: Any = None,
        *,
        recipe: Any = None,
        modalities: Any = (),
        reconstruction: Any = None,
        conditioning_vocabulary: Mapping[str, Any] | None = None,
        calibration_info: Mapping[str, Any] | None = None,
        head_settings: Mapping[str, Any] | None = None,
        provenance: Mapping[str, Any] | None = None,
        adaptation: Mapping[str, Any] | None = None,
        brainfm_version: str | None = None,
    ) -> None:
        super().__init__()
        if recipe is None:
            raise BrainFMInputError(None, "a brainfm model needs its preprocessing recipe")
        parsed_recipe = recipe if isinstance(recipe, PreprocessConfig) else recipe_from_dict(recipe, "recipe")
        mods = tuple(str(m).upper() for m in (modalities or ()))
        if not mods or any(m not in MODALITIES for m in mods):
            raise BrainFMInputError(None, f"modalities {list(mods)} must list trained modalities among "
                                          f"{list(MODALITIES)}")
        try:
            settings = reconstruction if isinstance(reconstruction, ReconstructionConfig) else from_dict(
                ReconstructionConfig, dict(reconstruction or {}), "reconstruction")
        except (ConfigError, ValueError) as exc:
            raise BrainFMInputError(None, f"invalid reconstruction settings ({exc})") from exc
        if int(unet.config.spatial_dims) != int(vae.config.spatial_dims):
            raise BrainFMInputError(None, "UNet and VAE disagree on spatial_dims")
        vocabulary = _vocabulary(conditioner)
        if conditioning_vocabulary is not None and _plain(dict(conditioning_vocabulary)) != vocabulary:
            raise BrainFMInputError(None, "conditioning_vocabulary does not match the conditioner's config")
        if head is not None and int(head.config.spatial_dims) != int(vae.config.spatial_dims):
            raise BrainFMInputError(None, "head and VAE disagree on spatial_dims")
        self.register_modules(vae=vae, unet=unet, conditioner=conditioner, noise_scheduler=noise_scheduler,
                              head=head)
        self.register_to_config(
            recipe=recipe_dict(parsed_recipe), modalities=list(mods), reconstruction=_plain(to_dict(settings)),
            conditioning_vocabulary=vocabulary, calibration_info=None if calibration_info is None else dict(
                calibration_info), head_settings=None if head_settings is None else dict(head_settings),
            provenance=dict(provenance or {}), adaptation=None if adaptation is None else dict(adaptation),
            brainfm_version=brainfm_version or __version__,
        )
        self._recipe = parsed_recipe
        self._reconstruction = settings
        self._calibrations: dict[str, NormativeCalibration] = {}
        self._baselines: Baselines | None = None
        self._head_lora: dict[str, Any] | None = None
        self._head_source: Path | None = None
        self._head_predictor: HeadPredictor | None = None
        self._unet_lora: dict[str, Any] | None = None
        self._base_unet: Any = None  # the foundation UNet while ``unet`` carries a site's adapters merged in
        self.model_dir: Path | None = None

    # ------------------------------------------------------------------------------------------ settings
    @property
    def recipe(self) -> PreprocessConfig:
        """The preprocessing the model was trained with; every input is prepared exactly like this."""
        return self._recipe

    @property
    def reconstruction(self) -> ReconstructionConfig:
        return self._reconstruction

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.config.modalities)

    @property
    def spatial_dims(self) -> int:
        return int(self.vae.config.spatial_dims)

    @property
    def calibration(self) -> NormativeCalibration | None:
        return self._calibrations.get("ldm")

    @property
    def vae_calibration(self) -> NormativeCalibration | None:
        return self._calibrations.get("vae")

    @property
    def baselines(self) -> Baselines | None:
        """The calibrated baselines (intensity, normative atlas, prior-fit check), when calibrated with them."""
        return self._baselines

    @property
    def head_lora(self) -> dict[str, Any] | None:
        return self._head_lora

    @property
    def head_source(self) -> Path | None:
        """Where the head was loaded from (a training run or this model folder)."""
        return self._head_source

    def set_reconstruction(self, settings: ReconstructionConfig) -> None:
        """New reconstruction settings; the calibration, fitted on the old ones, is dropped."""
        self._reconstruction = settings
        self.register_to_config(reconstruction=_plain(to_dict(settings)), calibration_info=None)
        self._calibrations, self._baselines = {}, None

    @property
    def unet_lora(self) -> dict[str, Any] | None:
        """A site's LoRA adapters of the UNet (``brainfm adapt``), merged into ``unet``; None for the foundation."""
        return self._unet_lora

    def set_unet_lora(self, lora: Mapping[str, Any]) -> None:
        """Adapt the UNet with a site's LoRA adapters: every reconstruction (and a head's UNet features) uses the
        merged weights; the folder keeps the foundation weights and the adapters apart. The calibration, fitted
        without them, is dropped."""
        self._merge_unet_lora(lora)
        self.register_to_config(calibration_info=None)
        self._calibrations = {}

    def _merge_unet_lora(self, lora: Mapping[str, Any]) -> None:
        from brainfm.anomaly.head import merge_lora

        base = self._base_unet if self._base_unet is not None else self.unet
        self.register_modules(unet=merge_lora(base, lora).to(self.device))
        self._base_unet, self._unet_lora, self._head_predictor = base, dict(lora), None

    def set_adaptation(self, record: Mapping[str, Any]) -> None:
        """Record how the model was adapted to a site (scans' sha256, steps, false-positive rates before and
        after); the model card shows it."""
        self.register_to_config(adaptation=_plain(dict(record)))

    def set_calibration(self, calibration: NormativeCalibration, vae_calibration: NormativeCalibration | None = None,
                        **provenance: Any) -> None:
        """Attach healthy-cohort calibrations (the LDM's and the VAE baseline's) and record their summary."""
        self._calibrations = {"ldm": calibration} | ({"vae": vae_calibration} if vae_calibration else {})
        arrays = [f"{CALIBRATION_DIR}/calibration.safetensors"]
        if vae_calibration is not None:
            arrays.append(f"{CALIBRATION_DIR}/{VAE_CALIBRATION_SUBDIR}/calibration.safetensors")
        self.register_to_config(calibration_info=_plain({
            **provenance, "n_scans": calibration.n_scans, "threshold": calibration.threshold,
            "target_fpr": calibration.config.target_fpr, "achieved_fpr": _finite(calibration.achieved_fpr),
            "pooled_mean": calibration.pooled_mean, "pooled_std": calibration.pooled_std,
            "config": to_dict(calibration.config),
            "vae_baseline_threshold": None if vae_calibration is None else vae_calibration.threshold,
            "small_lesion_variant": calibration.small_lesion_variant,
            "arrays": arrays,
        }))
        self._baselines = None

    def set_baselines(self, baselines: Baselines, **provenance: Any) -> None:
        """Attach calibrated baselines (after :meth:`set_calibration`, whose summary records them)."""
        info = dict(self.config.calibration_info or {})
        if not info:
            raise BrainFMInputError(self.model_dir, "calibrate the model before attaching baselines")
        info["baselines"] = _plain({**baselines.summary(), **provenance})
        self.register_to_config(calibration_info=info)
        self._baselines = baselines

    def calibration_for(self, vae_only: bool) -> NormativeCalibration:
        calibration = self.vae_calibration if vae_only else self.calibration
        if calibration is None:
            where = (self.model_dir or Path(".")) / CALIBRATION_DIR / (VAE_CALIBRATION_SUBDIR if vae_only else "")
            raise BrainFMInputError(where, "model is not calibrated; run `brainfm calibrate` on healthy scans")
        return calibration

    def reconstructor(self, vae_only: bool = False, **overrides: Any) -> PseudoHealthyReconstructor:
        settings = dataclasses.replace(self.reconstruction, **overrides) if overrides else self.reconstruction
        return PseudoHealthyReconstructor.from_config(
            self.vae, self.unet, self.conditioner, self.noise_scheduler, settings, vae_only=vae_only
        )

    # ------------------------------------------------------------------------------------------ head
    def load_head(self, path: str | os.PathLike) -> BrainFMPipeline:
        """Attach a fine-tuned head: a training run folder (``head/``, ``head_config.json``, optional ``lora/``)
        or its ``head/`` folder alone. Files are checked like a model folder's (safetensors only)."""
        path = Path(path)
        weights = path / HEAD_SUBDIR if (path / HEAD_SUBDIR / safety.MODEL_CONFIG).is_file() else path
        if not (weights / safety.MODEL_CONFIG).is_file():
            raise BrainFMInputError(path, "not a head folder (no head/config.json or config.json)")
        settings_path = next((p for p in (weights / HEAD_CONFIG, path / HEAD_CONFIG) if p.is_file()), None)
        settings = safety.read_json(settings_path) if settings_path is not None else {}
        if not isinstance(settings, dict):
            raise BrainFMInputError(settings_path, "head settings must be a JSON object")
        head = _load_head_weights(weights)
        lora = None
        if settings.get("lora"):
            lora_dir = next((d / LORA_SUBDIR for d in (path, weights, path.parent) if (d / LORA_SUBDIR).is_dir()),
                            path / LORA_SUBDIR)
            if lora_dir.is_dir():
                safety.refuse_unsafe_files(lora_dir)
            lora = read_lora(lora_dir)
        self._attach_head(head, settings, lora, path)
        return self

    def _attach_head(self, head: Any, settings: Mapping[str, Any], lora: dict[str, Any] | None, source: Path
                     ) -> None:
        if int(head.config.spatial_dims) != self.spatial_dims:
            raise BrainFMInputError(source, f"head is {head.config.spatial_dims}D but the model is {self.spatial_dims}D")
        self.register_modules(head=head.to(self.device))  # (plain assignment keeps a None head's empty registration)
        self.register_to_config(head_settings=_plain(dict(settings)))
        self._head_lora, self._head_source, self._head_predictor = lora, source, None

    def head_predictor(self) -> HeadPredictor | None:
        """The head ready to predict (built once), or None when the model has no head."""
        if self.head is None:
            return None
        if self._head_predictor is None:
            self._head_predictor = HeadPredictor.from_pipeline(self)
        return self._head_predictor

    # ------------------------------------------------------------------------------------------ folder I/O
    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, revision: str | None = None, **kwargs: Any
    ) -> BrainFMPipeline:
        """Load a model folder or a Hub repo id (``HF_HUB_OFFLINE=1`` is honoured).

        diffusers' own loader is not used: it can import a ``<library>.py`` placed beside a component. Every file
        is checked first and each component is loaded by its allow-listed class; options that would run foreign
        code are refused rather than silently ignored.
        """
        where = str(pretrained_model_name_or_path)
        if kwargs.pop("trust_remote_code", False) or kwargs.pop("custom_pipeline", None) is not None:
            raise BrainFMInputError(where, "brainfm never runs code from a model repo (trust_remote_code)")
        if kwargs.pop("use_safetensors", True) is False:
            raise BrainFMInputError(where, "brainfm loads safetensors weights only")
        torch_dtype = kwargs.pop("torch_dtype", None)
        device = kwargs.pop("device", None)
        kwargs.pop("local_files_only", None)  # HF_HUB_OFFLINE decides; a local folder never touches the network
        if kwargs:
            raise TypeError(f"BrainFMPipeline.from_pretrained got unsupported options {sorted(kwargs)}")
        folder = safety.resolve_model_path(pretrained_model_name_or_path, revision=revision)
        index = safety.check_model_folder(folder)
        index_path = folder / safety.MODEL_INDEX
        components = {name: safety.load_component(folder / name) for name in safety.COMPONENTS
                      if isinstance(index.get(name), list) and index[name][0] is not None}
        settings = {k: v for k, v in index.items() if not k.startswith("_") and k not in safety.COMPONENTS}
        unknown = set(settings) - set(_SETTINGS)
        if unknown:
            raise BrainFMInputError(index_path, f"unexpected settings {sorted(unknown)} in model_index.json")
        try:
            pipe = cls(**components, **settings)
        except BrainFMInputError as exc:
            raise BrainFMInputError(index_path, exc.problem) from exc
        pipe._load_own_files(folder, index_path)
        pipe.model_dir = folder
        pipe.to(device=device or "cpu", dtype=torch_dtype)
        return pipe

    def _load_own_files(self, folder: Path, index_path: Path) -> None:
        if (self.config.adaptation or {}).get("lora"):
            self._merge_unet_lora(read_lora(folder / UNET_LORA_DIR))
        elif (folder / UNET_LORA_DIR).exists():
            raise BrainFMInputError(folder / UNET_LORA_DIR, "UNet adapters present but model_index.json records "
                                                             "no adaptation with LoRA (mixed or tampered folder)")
        info = self.config.calibration_info
        calibration_dir = folder / CALIBRATION_DIR
        if info is not None:
            calibration = NormativeCalibration.load(calibration_dir)
            vae_dir = calibration_dir / VAE_CALIBRATION_SUBDIR
            vae = NormativeCalibration.load(vae_dir) if (vae_dir / "calibration.json").is_file() else None
            if calibration.threshold != info.get("threshold") or (vae is None) != (
                    info.get("vae_baseline_threshold") is None):
                raise BrainFMInputError(calibration_dir, "calibration files do not match model_index.json "
                                                         "(mixed or tampered folder)")
            self._calibrations = {"ldm": calibration} | ({"vae": vae} if vae is not None else {})
            recorded = (info.get("baselines") or {}).get("methods")
            if recorded is not None or (calibration_dir / BASELINES_SUBDIR).exists():
                self._baselines = Baselines.load(calibration_dir / BASELINES_SUBDIR)
                if self._baselines.summary()["methods"] != recorded:
                    raise BrainFMInputError(calibration_dir / BASELINES_SUBDIR, "baseline files do not match "
                                                                               "model_index.json (mixed folder)")
        elif calibration_dir.exists():
            raise BrainFMInputError(calibration_dir, "calibration files present but model_index.json records none")
        if self.head is not None:
            self._head_source = folder
            if (self.config.head_settings or {}).get("lora"):
                self._head_lora = read_lora(folder / HEAD_LORA_DIR)
        elif (folder / HEAD_LORA_DIR).exists():
            raise BrainFMInputError(folder / HEAD_LORA_DIR, "LoRA adapters without a head")

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        **kwargs: Any) -> Path:
        """Write the model folder (components, settings, calibration, head adapters) all at once.

        The folder appears complete or not at all, and an existing folder is only replaced when brainfm wrote it
        (and then only its own files; see :func:`brainfm.io.atomic_dir`).
        """
        if not safe_serialization:
            raise BrainFMInputError(save_directory, "brainfm writes safetensors weights only")
        if kwargs.pop("push_to_hub", False):
            raise TypeError("use BrainFMPipeline.push_to_hub (it validates and carries the model card)")
        if kwargs:
            raise TypeError(f"BrainFMPipeline.save_pretrained got unsupported options {sorted(kwargs)}")
        self.register_to_config(brainfm_version=__version__)
        with atomic_dir(save_directory) as tmp:
            self.write_to(tmp)
        return Path(save_directory)

    def write_to(self, folder: Path) -> None:
        """Write the model folder's content into the (new, empty) ``folder``; used inside atomic writes."""
        adapted = self.unet
        if self._base_unet is not None:  # unet/ holds the foundation weights, unet_lora/ the site's adapters
            self.register_modules(unet=self._base_unet)
        try:
            super().save_pretrained(folder, safe_serialization=True)
        finally:
            self.register_modules(unet=adapted)
        if self._unet_lora is not None:
            write_lora(self._unet_lora, folder / UNET_LORA_DIR)
        if self.calibration is not None:
            self.calibration.save(folder / CALIBRATION_DIR)
            if self.vae_calibration is not None:
                self.vae_calibration.save(folder / CALIBRATION_DIR / VAE_CALIBRATION_SUBDIR)
            if self._baselines is not None:
                self._baselines.save(folder / CALIBRATION_DIR / BASELINES_SUBDIR)
        if self._head_lora is not None and self.head is not None:
            write_lora(self._head_lora, folder / HEAD_LORA_DIR)

    def push_to_hub(self, repo_id: str, *, metrics_path: str | os.PathLike, shards_dir: str | os.PathLike | None = None,
                    private: bool = False, token: str | None = None, license: str = "apache-2.0",
                    **kwargs: Any) -> str:
        """Build a validated release (weights, settings, calibration, model card with the evaluation's metrics)
        in a temporary folder and upload it in one commit; returns the commit URL."""
        from brainfm import hub

        if kwargs:
            raise TypeError(f"BrainFMPipeline.push_to_hub got unsupported options {sorted(kwargs)}")
        with tempfile.TemporaryDirectory(prefix="brainfm-push-") as tmp:
            summary = hub.build_release(self, Path(tmp) / re.sub(r"\W", "-", repo_id.split("/")[-1]),
                                        metrics_path=metrics_path, shards_dir=shards_dir, repo_id=repo_id,
                                        license=license, push=True, private=private, token=token)
        return str(summary.pushed_url)

    # ------------------------------------------------------------------------------------------ one scan
    def prepare(self, path: str | os.PathLike, modality: str | None = None,
                mask_path: str | os.PathLike | None = None, label_path: str | os.PathLike | None = None,
                meta: Mapping[str, Any] | None = None, t1_path: str | os.PathLike | None = None) -> PreparedScan:
        """Preprocess with the stored recipe and compute the anatomy conditioning; refuse what the model cannot
        serve with a one-line ``BrainFMInputError`` naming the file. Without ``modality``, CT vs MRI is told by the
        intensities (an MRI then takes the model's one MRI contrast); a named one they contradict is refused.
        ``t1_path``: a co-registered T1 of the same subject, for the brain extraction of another contrast."""
        from brainfm.data.anatomy import compute_anatomy

        path = Path(path)
        if self.recipe.channels:  # one file cannot hold the contrasts a multi-channel model reads together
            raise BrainFMInputError(path, f"this model reads {'+'.join(self.recipe.channels)} as channels: use shards")
        if modality is not None and str(modality).upper() not in self.modalities:
            raise BrainFMInputError(path, f"modality {str(modality).upper()} is not one this model was trained on "
                                          f"({', '.join(self.modalities)})")
        scan = preprocess_scan(path, modality, self.recipe, mask_path=mask_path, label_path=label_path,
                               t1_path=t1_path, serves=self.modalities)
        check_serving_geometry(scan, self.recipe, path)
        anatomy = compute_anatomy(scan, self.recipe)
        stacked = np.concatenate([np.asarray(scan.mask, dtype=np.float32)[None], anatomy.priors.astype(np.float32)])
        return PreparedScan(scan=scan, anatomy=stacked, meta=scan_meta(scan.modality, meta, anatomy.scalars))

    def analyse(self, image: np.ndarray, brain_mask: np.ndarray, anatomy: np.ndarray, meta: Mapping[str, Any], *,
                vae_only: bool = False, reconstructor: PseudoHealthyReconstructor | None = None,
                calibration: NormativeCalibration | None = None, source: str | None = None) -> ScanAnalysis:
        """Reconstruct and score one model-grid volume: the shared core of detect, calibrate-free evaluation
        and fine-tuning features."""
        reconstructor = reconstructor or self.reconstructor(vae_only=vae_only)
        calibration = calibration or self.calibration_for(vae_only)
        image = np.asarray(image, dtype=np.float32)
        stacked = image if image.ndim == 4 else image[None]  # (C, X, Y, Z): a multi-channel model's contrasts
        recon, spread = reconstructor.reconstruct(torch.from_numpy(stacked), torch.from_numpy(anatomy), meta)
        mask = np.asarray(brain_mask) > 0
        reconstruction = (recon.numpy() if image.ndim == 4 else recon[0].numpy()) * mask
        uncertainty = (spread.numpy() if image.ndim == 4 else spread[0].numpy()) * mask
        residual = channel_residual(image, reconstruction, mask, calibration.config.residual, source=source)
        result = calibration.analyse(residual, mask)
        return ScanAnalysis(
            reconstruction=reconstruction.astype(np.float32), uncertainty=uncertainty.astype(np.float32),
            residual=residual, zmap=result.zmap, mask=np.asarray(result.mask, dtype=np.uint8),
            subject_score=float(result.subject_score), threshold=float(result.threshold),
            settings=reconstructor.settings(),
        )

    def __call__(
        self,
        image: str | os.PathLike | np.ndarray,
        modality: str | None = None,
        affine: np.ndarray | None = None,
        **options: Any,
    ) -> BrainFMPipelineOutput:
        """Deviation-map one scan: a NIfTI/DICOM path, or a 3D array with its 4x4 voxel-to-world ``affine``.

        Preprocessing, reconstruction settings and calibration come from the loaded folder, exactly as
        ``brainfm detect`` would use them. Options: ``mask`` (brain-mask path), ``meta`` (age, sex, site),
        ``vae_only`` (the VAE-reconstruction baseline), ``t1`` (a co-registered T1 for a non-T1 scan's brain
        extraction). Maps are on the model grid; ``affine`` in the output maps them to world space. A model with a
        fine-tuned head also returns its probability map and mask.
        """
        if isinstance(image, str | os.PathLike):
            return self._call_path(Path(image), modality, options)
        array = np.asarray(image)
        if array.ndim != 3:
            raise BrainFMInputError("<array>", f"expected a 3D volume, got shape {array.shape}")
        if affine is None or np.asarray(affine).shape != (4, 4):
            raise BrainFMInputError("<array>", "an array input needs its 4x4 voxel-to-world affine (affine=...)")
        if not np.isfinite(array).all():
            raise BrainFMInputError("<array>", "volume contains NaN or infinite values")
        from brainfm.io import save_nifti

        with tempfile.TemporaryDirectory(prefix="brainfm-pipeline-") as tmp:
            path = Path(tmp) / "input.nii.gz"
            save_nifti(array.astype(np.float32), np.asarray(affine, dtype=np.float64), path)
            return self._call_path(path, modality, options)

    def _call_path(self, path: Path, modality: str | None, options: dict[str, Any]) -> BrainFMPipelineOutput:
        mask_path = options.pop("mask", None)
        meta = options.pop("meta", None)
        vae_only = bool(options.pop("vae_only", False))
        t1_path = options.pop("t1", None)
        if options:
            raise TypeError(f"unsupported options {sorted(options)}; expected mask, meta, vae_only, t1")
        prepared = self.prepare(path, modality, mask_path, meta=meta, t1_path=t1_path)
        scan = prepared.scan
        analysis = self.analyse(scan.image, scan.mask, prepared.anatomy, prepared.meta, vae_only=vae_only,
                                source=str(path))
        head_probability = head_mask = None
        predictor = self.head_predictor()
        if predictor is not None:
            brain = np.asarray(scan.mask) > 0
            head_probability, head_mask = predictor.predict(scan.image, analysis.reconstruction,
                                                            analysis.zmap * brain, brain, prepared.anatomy,
                                                            prepared.meta)
        return BrainFMPipelineOutput(
            pseudo_healthy=analysis.reconstruction, z_map=analysis.zmap, mask=analysis.mask,
            score=analysis.subject_score, threshold=analysis.threshold, affine=np.asarray(scan.affine),
            image=scan.image, uncertainty=analysis.uncertainty, head_probability=head_probability,
            head_mask=None if head_mask is None else np.asarray(head_mask, dtype=np.uint8),
        )


_SETTINGS = ("recipe", "modalities", "reconstruction", "conditioning_vocabulary", "calibration_info",
             "head_settings", "provenance", "adaptation", "brainfm_version")


def _finite(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def _load_head_weights(weights: Path) -> Any:
    from brainfm.models.heads import LesionHead

    head = safety.load_component(weights)
    if not isinstance(head, LesionHead):
        raise BrainFMInputError(weights, f"a head must be a LesionHead, got {type(head).__name__}")
    return head


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


__all__ = ["BrainFMPipeline", "BrainFMPipelineOutput", "PreparedScan", "ScanAnalysis", "scan_meta"]
