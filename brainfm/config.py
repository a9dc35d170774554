"""Dataclass configs and a YAML loader that rejects unknown keys.

A typo in a config key must fail loudly at start-up rather than silently fall back to a default after hours
of training, so every loader here checks keys against the dataclass fields, recursively, and names the file
and the key path in its error.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or dict that does not match its schema."""


def _convert(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for candidate in non_none:
            try:
                return _convert(value, candidate, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if isinstance(annotation, type) and isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {annotation.__name__}, got {value!r}")
        return from_dict(annotation, value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=False)))
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, val_type = args if args else (Any, Any)
        return {
            _convert(k, key_type, f"{where}.{k}"): _convert(v, val_type, f"{where}.{k}") for k, v in value.items()
        }
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting keys it does not declare."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-YAML/JSON-friendly dict of a config (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(obj))


def load_config(path: str | Path, cls: type[T]) -> T:
    """Load a YAML file into ``cls``; errors name the file and the offending key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    return from_dict(cls, data, where=str(path))


def save_config(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


# --------------------------------------------------------------------------------------------------------------
# Data: the preprocessing recipe (stored with every shard set and every model) and shard-building settings.
# --------------------------------------------------------------------------------------------------------------

MODALITIES = ("T1", "T2", "FLAIR", "PD", "CT", "T1CE")  # T1CE: post-contrast T1 (BraTS t1ce, MSLUB T1WKS)


@dataclasses.dataclass
class PreprocessConfig:
    """The exact recipe that turns a scan into model input; inference repeats it from the stored copy."""

    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)  # mm, RAS axis order
    shape: tuple[int, int, int] = (96, 112, 96)  # voxels after crop/pad around the brain
    mri_percentiles: tuple[float, float] = (0.5, 99.5)  # clip inside the brain mask, then scale to [0, 1]
    ct_window: tuple[float, float] = (0.0, 80.0)  # Hounsfield window mapped to [0, 1] (brain window)
    mask_threshold: float = 0.5  # for given probabilistic masks
    tissue_priors: tuple[str, ...] = ("gm", "wm")  # template priors brought onto the scan grid
    template_resolution: int = 2  # mm of the nilearn ICBM152 template used for registration/priors
    ct_brain_hu: tuple[float, float] = (-15.0, 100.0)  # HU range of intracranial soft tissue for derived CT masks
    # Front end for scans straight from the scanner (brainfm.data.preprocess); stored recipes without these keys
    # predate them and are read with all three off.
    brain_extraction: bool = True  # deepbet (T1) / template or T1 (other MRI) / HU (CT); off: intensity mask
    bias_correction: bool = True  # N4 on MRI before normalisation
    align_to_template: bool = True  # rigid alignment to the ICBM152 template orients the model grid

    def __post_init__(self) -> None:
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be positive, got {self.spacing}")
        if any(s < 8 for s in self.shape):
            raise ValueError(f"shape must be at least 8 voxels per axis, got {self.shape}")
        lo, hi = self.mri_percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"mri_percentiles must satisfy 0 <= lo < hi <= 100, got {self.mri_percentiles}")
        if self.ct_window[0] >= self.ct_window[1]:
            raise ValueError(f"ct_window must be (low, high) with low < high, got {self.ct_window}")
        if self.ct_brain_hu[0] >= self.ct_brain_hu[1]:
            raise ValueError(f"ct_brain_hu must be (low, high) with low < high, got {self.ct_brain_hu}")
        if self.template_resolution not in (1, 2):
            raise ValueError(f"template_resolution must be 1 or 2 (mm), got {self.template_resolution}")
        unknown = set(self.tissue_priors) - {"gm", "wm", "csf"}
        if unknown:
            raise ValueError(f"tissue_priors must be among gm, wm, csf; got {sorted(unknown)}")


@dataclasses.dataclass
class ShardConfig:
    max_shard_bytes: int = 256 * 1024 * 1024
    max_samples_per_shard: int = 64
    split_fractions: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1}
    )
    seed: int = 0
    workers: int = 2

    def __post_init__(self) -> None:
        total = sum(self.split_fractions.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must sum to 1, got {total}")
        if self.max_samples_per_shard < 1 or self.max_shard_bytes < 1024:
            raise ValueError("max_samples_per_shard must be >= 1 and max_shard_bytes >= 1024")


@dataclasses.dataclass
class ReaderConfig:
    """How the streaming shard reader filters, shuffles and augments; probabilities of 0 switch a MONAI
    augmentation off, so the default reads the data exactly as stored."""

    min_brain_fraction: float = 0.05  # 2D: skip axial slices with less brain than this
    on_corrupt: typing.Literal["skip", "raise"] = "skip"
    slice_shuffle_volumes: int = 8  # 2D: slices are shuffled across windows of this many volumes
    affine_prob: float = 0.0  # small RandAffine, applied identically to image, mask, anatomy and label
    rotate_degrees: float = 5.0
    scale_fraction: float = 0.05
    translate_voxels: float = 2.0
    bias_field_prob: float = 0.0
    bias_field_coeff: float = 0.3
    noise_prob: float = 0.0
    noise_std: float = 0.02
    contrast_prob: float = 0.0
    contrast_gamma: tuple[float, float] = (0.8, 1.25)

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_brain_fraction < 1.0:
            raise ValueError(f"min_brain_fraction must be in [0, 1), got {self.min_brain_fraction}")
        if self.slice_shuffle_volumes < 1:
            raise ValueError(f"slice_shuffle_volumes must be >= 1, got {self.slice_shuffle_volumes}")
        probs = (self.affine_prob, self.bias_field_prob, self.noise_prob, self.contrast_prob)
        if any(not 0.0 <= p <= 1.0 for p in probs):
            raise ValueError(f"augmentation probabilities must be in [0, 1], got {probs}")
        if min(self.rotate_degrees, self.scale_fraction, self.translate_voxels, self.noise_std) < 0:
            raise ValueError("rotate_degrees, scale_fraction, translate_voxels and noise_std must be >= 0")
        if not 0 < self.contrast_gamma[0] <= self.contrast_gamma[1]:
            raise ValueError(f"contrast_gamma must be (low, high) with 0 < low <= high, got {self.contrast_gamma}")


@dataclasses.dataclass
class DataConfig:
    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
    shards: ShardConfig = dataclasses.field(default_factory=ShardConfig)
    reader: ReaderConfig = dataclasses.field(default_factory=ReaderConfig)


# --------------------------------------------------------------------------------------------------------------
# Pretraining: one config file drives both stages (VAE, then latent diffusion) of one run.
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PretrainDataSection:
    """Where the shards are and how the streaming reader batches them."""

    shard_dir: str = "shards"
    train_split: str = "train"
    val_split: str = "val"
    mode: typing.Literal["2d", "3d"] = "2d"
    batch_size: int = 8
    num_workers: int = 0
    augment: bool = False  # master switch: false reads the data exactly as stored, whatever reader's probabilities
    reader: ReaderConfig = dataclasses.field(default_factory=ReaderConfig)  # min_brain_fraction, on_corrupt, aug.

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {self.batch_size}, {self.num_workers}")

    def reader_config(self) -> ReaderConfig:
        """The reader settings with augmentation switched off unless ``augment`` is true."""
        if self.augment:
            return self.reader
        return dataclasses.replace(self.reader, affine_prob=0.0, bias_field_prob=0.0, noise_prob=0.0, contrast_prob=0.0)


@dataclasses.dataclass
class VAEStageConfig:
    """``BrainVAE`` architecture, its loss weights and the adversarial schedule."""

    channels: tuple[int, ...] = (32, 64, 128)
    latent_channels: int = 4
    num_res_blocks: int = 1
    attention_levels: tuple[bool, ...] = (False, False, False)
    norm_num_groups: int = 16
    use_flash_attention: bool = False
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.0
    perceptual_weights_path: str | None = None  # local weights only: nothing is downloaded at train time
    adv_weight: float = 0.01
    adv_warmup_steps: int = 100  # the discriminator only joins once reconstructions are reasonable
    disc_lr: float | None = None  # default: optim.lr
    discriminator: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra make_discriminator kwargs

    def __post_init__(self) -> None:
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"vae.channels must be positive, got {self.channels}")
        if len(self.attention_levels) != len(self.channels):
            raise ValueError(
                f"vae.attention_levels needs one entry per level ({len(self.channels)}), got {self.attention_levels}"
            )
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(f"vae.channels {self.channels} must be divisible by norm_num_groups={self.norm_num_groups}")
        if self.latent_channels < 1 or self.num_res_blocks < 1:
            raise ValueError("vae.latent_channels and vae.num_res_blocks must be >= 1")
        if min(self.kl_weight, self.perceptual_weight, self.adv_weight) < 0 or self.adv_warmup_steps < 0:
            raise ValueError("vae loss weights and adv_warmup_steps must be >= 0")
        if self.perceptual_weight > 0 and not self.perceptual_weights_path:
            raise ValueError("vae.perceptual_weight > 0 needs vae.perceptual_weights_path (no downloads at train time)")


@dataclasses.dataclass
class LDMStageConfig:
    """Latent diffusion: UNet and metadata encoder kwargs, noise schedule, and where the frozen VAE is."""

    vae_path: str | None = None  # default: <train.output_dir>/vae/vae, the export of the VAE stage
    unet: dict[str, Any] = dataclasses.field(default_factory=dict)  # LatentUNet kwargs beyond dims/channels
    encoder: dict[str, Any] = dataclasses.field(default_factory=dict)  # ConditionEncoder kwargs
    scheduler: typing.Literal["ddpm", "ddim", "dpm++"] = "ddpm"  # training uses its noise schedule only
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    prediction_type: typing.Literal["epsilon", "v_prediction"] = "epsilon"
    cond_drop_prob: float = 0.1  # conditioning dropout: unconditional sampling and guidance need it
    cache_latents: bool = False  # encode the training split once and train from memory (frozen VAE, no aug)
    sample_steps: int = 20  # sampler steps for the preview grids

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise ValueError(f"ldm.num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"ldm.cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")
        if self.sample_steps < 1:
            raise ValueError("ldm.sample_steps must be >= 1")


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: typing.Literal["cosine", "constant"] = "cosine"
    max_steps: int = 1000  # optimizer steps, not micro-batches
    grad_accum: int = 1
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.lr must be > 0 and betas in [0, 1), got {self.lr}, {self.betas}")
        if self.max_steps < 1 or self.grad_accum < 1 or self.warmup_steps < 0:
            raise ValueError("optim.max_steps and optim.grad_accum must be >= 1, warmup_steps >= 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"optim.grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.weight_decay < 0:
            raise ValueError("optim.weight_decay must be >= 0")


@dataclasses.dataclass
class TrainConfig:
    seed: int = 0
    mixed_precision: typing.Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    ema_decay: float | None = 0.999  # null disables EMA; exports use EMA weights when enabled
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # >= 2 so a corrupt newest checkpoint always has a predecessor
    log_every: int = 10
    sample_every: int = 500  # 0 disables preview grids
    output_dir: str = "runs/pretrain"
    nonfinite_policy: typing.Literal["abort", "skip"] = "abort"
    max_nonfinite_skips: int = 10

    def __post_init__(self) -> None:
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.checkpoint_every < 1 or self.log_every < 1 or self.sample_every < 0:
            raise ValueError("train.checkpoint_every and log_every must be >= 1, sample_every >= 0")
        if self.keep_checkpoints < 2:
            raise ValueError(f"train.keep_checkpoints must be >= 2, got {self.keep_checkpoints}")
        if self.max_nonfinite_skips < 0:
            raise ValueError("train.max_nonfinite_skips must be >= 0")


@dataclasses.dataclass
class PretrainConfig:
    """Both pretraining stages; ``brainfm pretrain vae|ldm --config`` picks the stage."""

    data: PretrainDataSection = dataclasses.field(default_factory=PretrainDataSection)
    vae: VAEStageConfig = dataclasses.field(default_factory=VAEStageConfig)
    ldm: LDMStageConfig = dataclasses.field(default_factory=LDMStageConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    @property
    def spatial_dims(self) -> int:
        return 2 if self.data.mode == "2d" else 3


# --------------------------------------------------------------------------------------------------------------
# Anomaly: deviation maps, their post-processing and the healthy-cohort calibration (saved with the model).
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DeviationConfig:
    """How residuals become z-maps, binary masks and subject scores; every report records these values
    because each of them changes the published numbers."""

    normalisation: typing.Literal["voxelwise", "regional", "global"] = "voxelwise"
    smoothing_sigma_vox: float = 1.0  # Gaussian smoothing of the voxelwise mean/variance maps (0 = off)
    std_floor: float = 1e-3  # relative to the pooled healthy std: no division by a near-zero local std
    median_filter_size: int = 3  # median filter of the z-map (0 or 1 = off)
    mask_erosion_vox: int = 1  # brain-mask erosion: skull-stripping edges are the commonest false positives
    min_component_vox: int = 5  # connected components (26-connectivity) smaller than this are dropped
    target_fpr: float = 0.01  # fraction of healthy brain voxels above the calibrated threshold
    subject_score: typing.Literal["p99", "mean_top1pct", "lesion_load"] = "mean_top1pct"
    residual: typing.Literal["abs", "signed_pos", "signed_neg"] = "abs"

    def __post_init__(self) -> None:
        if self.smoothing_sigma_vox < 0:
            raise ValueError(f"smoothing_sigma_vox must be >= 0, got {self.smoothing_sigma_vox}")
        if self.std_floor <= 0:
            raise ValueError(f"std_floor must be > 0, got {self.std_floor}")
        if self.median_filter_size < 0 or self.mask_erosion_vox < 0 or self.min_component_vox < 0:
            raise ValueError("median_filter_size, mask_erosion_vox and min_component_vox must be >= 0")
        if not 0.0 < self.target_fpr < 1.0:
            raise ValueError(f"target_fpr must be in (0, 1), got {self.target_fpr}")


# --------------------------------------------------------------------------------------------------------------
# Fine-tuning: heads on [scan, pseudo-healthy, z-map, UNet features]; semi-supervised curve, cross-disease matrix.
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FinetuneDataSection:
    """Which foundation model, which cohort, and how it is split; the split is a pure function of ``seed``."""

    model: str = "runs/model"  # model folder (brainfm detect --model), calibrated
    manifest: str = "cohort/manifest.csv"  # cohort CSV with label and lesion_type columns (brainfm data synth)
    batch_size: int = 8  # labelled samples (2D slices or 3D volumes) per step
    unlabelled_batch_size: int = 8  # unlabelled samples per step (0 = labelled only)
    n_calibration_healthy: int = 4  # healthy scans held out to calibrate head thresholds (never trained on)
    test_fraction: float = 0.5  # of the lesion scans of each kind, held out for the curve / matrix
    negative_slices_per_lesion_slice: float = 1.0  # 2D: lesion-free brain slices kept per lesion slice
    min_brain_fraction: float = 0.05  # 2D: slices with less brain than this are not used
    max_scans: int | None = None  # cap on manifest rows (smoke runs)
    vae_only: bool = False  # features from the VAE-only baseline instead of the LDM reconstruction
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.unlabelled_batch_size < 0:
            raise ValueError("data.batch_size must be >= 1 and data.unlabelled_batch_size >= 0")
        if self.n_calibration_healthy < 1:
            raise ValueError("data.n_calibration_healthy must be >= 1: head thresholds are calibrated on healthy scans")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"data.test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.negative_slices_per_lesion_slice < 0 or not 0.0 <= self.min_brain_fraction < 1.0:
            raise ValueError("data.negative_slices_per_lesion_slice must be >= 0, min_brain_fraction in [0, 1)")


@dataclasses.dataclass
class HeadSection:
    """``LesionHead`` architecture and inputs; ``unet_features`` adds the frozen latent UNet's last up-block."""

    channels: tuple[int, ...] = (8, 16, 32)
    num_res_units: int = 1
    inputs: tuple[str, ...] = ("scan", "pseudo_healthy", "zmap")
    unet_features: bool = False
    feature_timestep: float = 0.05  # fraction of the training timesteps at which the clean latent is presented
    disease_mode: typing.Literal["none", "outputs", "film"] = "outputs"
    disease_token_drop: float = 0.3  # film: fraction of samples trained with the "any lesion" token
    z_clip: float = 10.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if len(self.channels) < 2 or any(c < 1 for c in self.channels):
            raise ValueError(f"head.channels needs >= 2 positive levels, got {self.channels}")
        allowed = ("scan", "pseudo_healthy", "zmap")
        if not self.inputs or any(i not in allowed for i in self.inputs):
            raise ValueError(f"head.inputs must be among {list(allowed)}, got {list(self.inputs)}")
        if not 0.0 <= self.feature_timestep < 1.0 or not 0.0 <= self.disease_token_drop <= 1.0:
            raise ValueError("head.feature_timestep must be in [0, 1) and head.disease_token_drop in [0, 1]")
        if self.z_clip <= 0:
            raise ValueError(f"head.z_clip must be > 0, got {self.z_clip}")


@dataclasses.dataclass
class LoRASection:
    """LoRA adapters on the latent UNet (only meaningful with ``head.unet_features``); base weights stay frozen."""

    enabled: bool = False
    rank: int = 4
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "out_proj", "conv1.conv", "conv2.conv")

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0 or not self.target_modules:
            raise ValueError("lora.rank must be >= 1, alpha > 0, dropout in [0, 1), target_modules non-empty")


@dataclasses.dataclass
class SemiSection:
    """Semi-supervised objective and the label-efficiency curve."""

    labelled_counts: tuple[int | typing.Literal["all"], ...] = (0, 1, 3, 10, "all")  # 0 = the unsupervised map
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    pseudo_labels: bool = True  # confident z-map voxels of unlabelled scans as targets
    pseudo_low_z: float = 0.5  # z below this (inside the brain) = confident background
    pseudo_weight: float = 0.5
    consistency_weight: float = 0.5  # prediction agreement under flip + intensity augmentation
    baseline: bool = True  # also train a scan-only MONAI UNet from scratch on the same labels

    def __post_init__(self) -> None:
        if not self.labelled_counts:
            raise ValueError("semi.labelled_counts must not be empty")
        if any(isinstance(c, int) and c < 0 for c in self.labelled_counts):
            raise ValueError(f"semi.labelled_counts must be >= 0 or 'all', got {self.labelled_counts}")
        if min(self.dice_weight, self.bce_weight, self.pseudo_weight, self.consistency_weight) < 0:
            raise ValueError("semi loss weights must be >= 0")


@dataclasses.dataclass
class CrossSection:
    """Cross-disease matrix: one head per training group, tested on every lesion kind."""

    train_groups: tuple[tuple[str, ...], ...] = (("tumour",), ("ms",), ("stroke",), ("svd",))
    test_kinds: tuple[str, ...] = ("tumour", "ms", "stroke", "svd")

    def __post_init__(self) -> None:
        kinds = {"tumour", "ms", "stroke", "svd"}
        if not self.train_groups or any(not g for g in self.train_groups) or not self.test_kinds:
            raise ValueError("cross.train_groups and cross.test_kinds must be non-empty")
        unknown = {k for g in self.train_groups for k in g} | set(self.test_kinds)
        if unknown - kinds:
            raise ValueError(f"unknown lesion kinds {sorted(unknown - kinds)}; known: {sorted(kinds)}")


def _finetune_train_defaults() -> TrainConfig:
    # few hundred steps: EMA would export weights close to the initialisation, so it is off by default
    return TrainConfig(ema_decay=None, checkpoint_every=50, log_every=10, sample_every=0,
                       output_dir="runs/finetune")


@dataclasses.dataclass
class FinetuneConfig:
    """``brainfm finetune semi|cross --config``; optim/train are the pretraining sections (same loop)."""

    data: FinetuneDataSection = dataclasses.field(default_factory=FinetuneDataSection)
    head: HeadSection = dataclasses.field(default_factory=HeadSection)
    lora: LoRASection = dataclasses.field(default_factory=LoRASection)
    semi: SemiSection = dataclasses.field(default_factory=SemiSection)
    cross: CrossSection = dataclasses.field(default_factory=CrossSection)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-3, max_steps=200,
                                                                                warmup_steps=10))
    train: TrainConfig = dataclasses.field(default_factory=_finetune_train_defaults)

    def __post_init__(self) -> None:
        if self.lora.enabled and not self.head.unet_features:
            raise ValueError("lora.enabled needs head.unet_features: true (adapters act through the UNet features)")
        if self.lora.enabled and self.train.ema_decay is not None:
            raise ValueError("lora.enabled needs train.ema_decay: null (adapters are exported from the live weights)")


# --------------------------------------------------------------------------------------------------------------
# Published protocols (configs/protocols/): healthy training data, labelled evaluation data, resolution, threshold
# protocols, and the numbers papers report under them, so a brainfm run is compared like for like.
# --------------------------------------------------------------------------------------------------------------

HEALTHY_DATASETS = ("ixi", "oasis3", "bids")  # layouts of `brainfm data manifest` without lesion labels
LESION_DATASETS = ("brats2021", "atlas2", "mslub", "wmh2017")  # layouts whose rows carry voxel labels
# healthy_fpr: threshold at a fixed false-positive rate of healthy validation brain voxels (Bercea et al.);
# greedy_dice_lesion_val: the threshold maximising Dice on a labelled validation split of the lesion dataset, Dice
# reported on the rest (Behrendt et al.); best_on_test: the best threshold on the test labels (an upper bound).
ThresholdProtocolName = typing.Literal["healthy_fpr", "greedy_dice_lesion_val", "best_on_test"]


@dataclasses.dataclass
class ProtocolDataSection:
    """One side of a protocol: a dataset layout and the manifest ``brainfm data manifest`` wrote for it."""

    dataset: typing.Literal["ixi", "brats2021", "atlas2", "mslub", "wmh2017", "oasis3", "cq500", "bids"]
    manifest: str  # `brainfm data manifest --dataset <dataset> --root <download> --out <manifest>`
    modality: str  # the rows of the manifest this protocol uses

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality {self.modality!r} is not one of {list(MODALITIES)}")


@dataclasses.dataclass
class ProtocolThresholdSection:
    """Which threshold protocols are reported (each separately, by name) and their parameters."""

    reported: tuple[ThresholdProtocolName, ...] = ("healthy_fpr", "greedy_dice_lesion_val")
    healthy_fpr: tuple[float, ...] = (0.01,)  # fractions of healthy validation brain voxels above threshold
    lesion_val_fraction: float = 0.33  # of the lesion subjects, held out to choose the greedy-Dice threshold
    split_seed: int = 0  # the lesion validation/test split is a pure function of (subjects, seed)

    def __post_init__(self) -> None:
        if not self.reported:
            raise ValueError("threshold.reported must name at least one threshold protocol")
        if "healthy_fpr" in self.reported and not self.healthy_fpr:
            raise ValueError("threshold.healthy_fpr must list at least one rate when healthy_fpr is reported")
        if any(not 0.0 < f < 1.0 for f in self.healthy_fpr):
            raise ValueError(f"threshold.healthy_fpr values must be in (0, 1), got {self.healthy_fpr}")
        if not 0.0 < self.lesion_val_fraction < 1.0:
            raise ValueError(f"threshold.lesion_val_fraction must be in (0, 1), got {self.lesion_val_fraction}")


@dataclasses.dataclass
class PublishedResult:
    """A number a paper reports for this protocol, with the threshold protocol it was measured under."""

    method: str
    dice: float | None  # percent
    auprc: float | None  # percent
    threshold: ThresholdProtocolName
    source: str  # paper (arXiv id or DOI) and table
    note: str = ""

    def __post_init__(self) -> None:
        values = [v for v in (self.dice, self.auprc) if v is not None]
        if not values or any(not 0.0 <= v <= 100.0 for v in values):
            raise ValueError(f"published {self.method!r}: dice/auprc must be percentages, at least one given")


@dataclasses.dataclass
class ProtocolConfig:
    """A published evaluation protocol: train on ``train`` (healthy), evaluate on ``evaluate`` (labelled), at
    ``preprocess``'s resolution, in ``mode``, with ``pretrain_config``'s models; report every threshold protocol
    in ``threshold.reported`` beside ``published``."""

    name: str
    description: str
    train: ProtocolDataSection
    evaluate: ProtocolDataSection
    mode: typing.Literal["2d", "3d"]
    preprocess: PreprocessConfig
    pretrain_config: str  # configs/pretrain/<name>.yaml; the runner points its data.shard_dir at this protocol's
    threshold: ProtocolThresholdSection
    published: tuple[PublishedResult, ...] = ()
    ignore_label_values: tuple[int, ...] = ()  # label values left out of positives and negatives (WMH: 2)
    source: str = ""  # where the protocol (data, preprocessing, splits) is described
    notes: str = ""  # where brainfm's run necessarily differs from the published one

    def __post_init__(self) -> None:
        if self.train.dataset not in HEALTHY_DATASETS:
            raise ValueError(f"train.dataset must be a healthy cohort {list(HEALTHY_DATASETS)}, "
                             f"got {self.train.dataset!r}")
        if self.evaluate.dataset not in LESION_DATASETS:
            raise ValueError(f"evaluate.dataset must be a labelled lesion dataset {list(LESION_DATASETS)}, "
                             f"got {self.evaluate.dataset!r}")
        if self.train.modality != self.evaluate.modality:
            raise ValueError(f"train.modality {self.train.modality!r} and evaluate.modality "
                             f"{self.evaluate.modality!r} differ: the published protocols train and test on one "
                             "contrast")
        if any(v < 1 for v in self.ignore_label_values):
            raise ValueError("ignore_label_values must be positive label values (0 is background)")
