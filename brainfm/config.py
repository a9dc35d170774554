"""Every config of brainfm, in one place: pydantic dataclasses with unknown keys forbidden.

A typo in a config key must fail at start-up, not silently fall back to a default after hours of training; how
config files are read, merged, path-resolved and validated (one-line errors naming the file and the key path) is
in :mod:`brainfm.config_loader`. A network's section holds its constructor's keyword arguments, validated against
the constructor's own signature (:class:`~brainfm.config_loader.NetworkArgs`): the config never repeats a
network's arguments, and the arguments derived from the data (dimensions, channel counts) are filled by the
trainer. The classes stay standard dataclasses for ``dataclasses.replace`` / ``fields``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic.dataclasses import dataclass

from brainfm.config_loader import (
    PATH,
    SCHEMA,
    ConfigError,
    ConfigPath,
    MustExist,
    NetworkArgs,
    from_dict,
    load_config,
    save_config,
    to_dict,
)

# the loading API, used as brainfm.config.X by every room
__all__ = ["ConfigError", "from_dict", "load_config", "save_config", "to_dict"]
SHARDS = MustExist("dir", inside="index.json", hint="build it with brainfm data shards")
MODEL_DIR = MustExist("dir", hint="a model folder made by brainfm calibrate")


# ---- The networks a config describes, by their constructors ----------------------------------------------------
def _network(name: str) -> type:
    """The network class ``name``, imported on first use (the networks pull in torch)."""
    from brainfm.models.conditioning import ConditionEncoder
    from brainfm.models.heads import LesionHead
    from brainfm.models.unet import LatentUNet
    from brainfm.models.vae import BrainDiscriminator, BrainVAE

    networks = (BrainVAE, BrainDiscriminator, LatentUNet, ConditionEncoder, LesionHead)
    return {network.__name__: network for network in networks}[name]


VAE_NETWORK = NetworkArgs(
    "BrainVAE", _network, ("spatial_dims", "in_channels", "out_channels", "scaling_factor"), __name__
)
DISCRIMINATOR_NETWORK = NetworkArgs("BrainDiscriminator", _network, ("spatial_dims", "in_channels"), __name__)
UNET_NETWORK = NetworkArgs(
    "LatentUNet",
    _network,
    ("spatial_dims", "latent_channels", "anatomy_channels", "prediction_type"),
    __name__,
)
CONDITIONER_NETWORK = NetworkArgs("ConditionEncoder", _network, (), __name__)
HEAD_NETWORK = NetworkArgs("LesionHead", _network, ("spatial_dims", "feature_channels", "diseases"), __name__)
_NETWORKS = {
    f"{n.name}Args": n
    for n in (VAE_NETWORK, DISCRIMINATOR_NETWORK, UNET_NETWORK, CONDITIONER_NETWORK, HEAD_NETWORK)
}


def __getattr__(name: str) -> Any:
    """The generated argument models (``BrainVAEArgs``, ...) by name, so pickle can find them."""
    if name in _NETWORKS:
        return _NETWORKS[name].model()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- Data: the preprocessing recipe (stored with every shard set and every model) and shard-building settings ---

MODALITIES = ("T1", "T2", "FLAIR", "PD", "CT", "T1CE")  # T1CE: post-contrast T1 (BraTS t1ce, MSLUB T1WKS)


@dataclass(config=SCHEMA)
class PreprocessConfig:
    """The exact recipe that turns a scan into model input; inference repeats it from the stored copy."""

    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)  # mm, RAS axis order
    shape: tuple[int, int, int] = (96, 112, 96)  # voxels after crop/pad around the brain
    mri_percentiles: tuple[float, float] = (0.5, 99.5)  # clip inside the brain mask, then scale to [0, 1]
    ct_window: tuple[float, float] = (0.0, 80.0)  # Hounsfield window mapped to [0, 1] (brain window)
    mask_threshold: float = 0.5  # for given probabilistic masks
    tissue_priors: tuple[str, ...] = ("gm", "wm")  # template priors brought onto the scan grid
    template_resolution: int = 2  # mm of the nilearn ICBM152 template used for registration/priors
    # HU range of intracranial soft tissue for derived CT masks
    ct_brain_hu: tuple[float, float] = (-15.0, 100.0)

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


@dataclass(config=SCHEMA)
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


@dataclass(config=SCHEMA)
class ReaderConfig:
    """How the streaming shard reader filters, shuffles and augments; probabilities of 0 switch a MONAI
    augmentation off, so the default reads the data exactly as stored."""

    min_brain_fraction: float = 0.05  # 2D: skip axial slices with less brain than this
    on_corrupt: Literal["skip", "raise"] = "skip"
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
            raise ValueError(
                f"contrast_gamma must be (low, high) with 0 < low <= high, got {self.contrast_gamma}"
            )


@dataclass(config=SCHEMA)
class DataConfig:
    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
    shards: ShardConfig = dataclasses.field(default_factory=ShardConfig)
    reader: ReaderConfig = dataclasses.field(default_factory=ReaderConfig)


# ---- Pretraining: one config file drives both stages (VAE, then latent diffusion) of one run -------------------


@dataclass(config=SCHEMA)
class PretrainDataSection:
    """Where the shards are and how the streaming reader batches them."""

    shard_dir: Annotated[str, PATH, SHARDS]  # the folder `brainfm data shards` wrote; required
    train_split: str = "train"
    val_split: str = "val"
    mode: Literal["2d", "3d"] = "2d"
    batch_size: int = 8
    num_workers: int = 0
    # master switch: false reads the data exactly as stored, whatever the reader's probabilities say
    augment: bool = False
    reader: ReaderConfig = dataclasses.field(default_factory=ReaderConfig)  # filters, augmentation

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError(
                f"batch_size must be >= 1 and num_workers >= 0, got {self.batch_size}, {self.num_workers}"
            )

    def reader_config(self) -> ReaderConfig:
        """The reader settings with augmentation switched off unless ``augment`` is true."""
        if self.augment:
            return self.reader
        return dataclasses.replace(
            self.reader, affine_prob=0.0, bias_field_prob=0.0, noise_prob=0.0, contrast_prob=0.0
        )


@dataclass(config=SCHEMA)
class VAEStageConfig:
    """Stage 1: ``network`` = ``BrainVAE``'s arguments, ``discriminator`` = the PatchGAN's; then the loss weights
    and the adversarial schedule."""

    network: Annotated[Any, VAE_NETWORK] = dataclasses.field(default_factory=VAE_NETWORK.default)
    discriminator: Annotated[Any, DISCRIMINATOR_NETWORK] = dataclasses.field(
        default_factory=DISCRIMINATOR_NETWORK.default
    )
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.0
    perceptual_weights_path: ConfigPath | None = None  # local weights only: nothing is downloaded in training
    adv_weight: float = 0.01  # 0 = no discriminator
    adv_warmup_steps: int = 100  # the discriminator only joins once reconstructions are reasonable
    disc_lr: float | None = None  # default: optim.lr

    def __post_init__(self) -> None:
        # cheap cross-argument checks: `brainfm config check` catches them before a job runs
        net = self.network
        if not net.channels or any(c < 1 for c in net.channels):
            raise ValueError(f"network.channels must be positive, got {list(net.channels)}")
        if any(net.attention_levels) and len(net.attention_levels) != len(net.channels):
            raise ValueError(
                f"network.attention_levels needs one entry per level ({len(net.channels)}), "
                f"got {list(net.attention_levels)}"
            )
        if any(c % net.norm_num_groups for c in net.channels):
            raise ValueError(
                f"network.channels {list(net.channels)} must be divisible by "
                f"network.norm_num_groups={net.norm_num_groups}"
            )
        if min(self.kl_weight, self.perceptual_weight, self.adv_weight) < 0 or self.adv_warmup_steps < 0:
            raise ValueError("loss weights and adv_warmup_steps must be >= 0")
        if self.perceptual_weight > 0 and not self.perceptual_weights_path:
            raise ValueError(
                "perceptual_weight > 0 needs perceptual_weights_path (no downloads at train time)"
            )


@dataclass(config=SCHEMA)
class LDMStageConfig:
    """Stage 2: ``unet`` = ``LatentUNet``'s arguments, ``conditioner`` = the metadata ``ConditionEncoder``'s; then
    the training noise schedule and where the frozen VAE is."""

    vae_path: ConfigPath | None = None  # default: <train.output_dir>/vae/vae, the export of the VAE stage
    unet: Annotated[Any, UNET_NETWORK] = dataclasses.field(default_factory=UNET_NETWORK.default)
    conditioner: Annotated[Any, CONDITIONER_NETWORK] = dataclasses.field(
        default_factory=CONDITIONER_NETWORK.default
    )
    noise_scheduler: Literal["ddpm", "ddim", "dpm++"] = "ddpm"  # training uses its noise schedule only
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    cond_drop_prob: float = 0.1  # conditioning dropout: unconditional sampling and guidance need it
    cache_latents: bool = False  # encode the training split once and train from memory (frozen VAE, no aug)
    sample_steps: int = 20  # sampler steps for the preview grids

    def __post_init__(self) -> None:
        if self.unet.cross_attention_dim != self.conditioner.cross_attention_dim:
            raise ValueError(
                f"unet.cross_attention_dim ({self.unet.cross_attention_dim}) must equal "
                f"conditioner.cross_attention_dim ({self.conditioner.cross_attention_dim}): the UNet "
                "attends to the conditioner's tokens"
            )
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")
        if self.sample_steps < 1:
            raise ValueError("sample_steps must be >= 1")


@dataclass(config=SCHEMA)
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler: Literal["cosine", "constant"] = "cosine"  # warm-up, then cosine decay or constant
    max_steps: int = 1000  # optimizer steps, not micro-batches
    grad_accum: int = 1
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"lr must be > 0 and betas in [0, 1), got {self.lr}, {self.betas}")
        if self.max_steps < 1 or self.grad_accum < 1 or self.warmup_steps < 0:
            raise ValueError("max_steps and grad_accum must be >= 1, warmup_steps >= 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.weight_decay < 0:
            raise ValueError("weight_decay must be >= 0")


@dataclass(config=SCHEMA)
class TrainConfig:
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    ema_decay: float | None = 0.999  # null disables EMA; exports use EMA weights when enabled
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # >= 2 so a corrupt newest checkpoint always has a predecessor
    log_every: int = 10
    sample_every: int = 500  # 0 disables preview grids
    output_dir: ConfigPath = "runs/pretrain"
    nonfinite_policy: Literal["abort", "skip"] = "abort"
    max_nonfinite_skips: int = 10

    def __post_init__(self) -> None:
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.checkpoint_every < 1 or self.log_every < 1 or self.sample_every < 0:
            raise ValueError("checkpoint_every and log_every must be >= 1, sample_every >= 0")
        if self.keep_checkpoints < 2:
            raise ValueError(f"keep_checkpoints must be >= 2, got {self.keep_checkpoints}")
        if self.max_nonfinite_skips < 0:
            raise ValueError("max_nonfinite_skips must be >= 0")


@dataclass(config=SCHEMA)
class PretrainConfig:
    """Both pretraining stages; ``brainfm pretrain vae|ldm --config`` picks the stage."""

    data: PretrainDataSection  # required: shard_dir has no sensible default
    vae: VAEStageConfig = dataclasses.field(default_factory=VAEStageConfig)
    ldm: LDMStageConfig = dataclasses.field(default_factory=LDMStageConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    @property
    def spatial_dims(self) -> int:
        return 2 if self.data.mode == "2d" else 3


# ---- Anomaly: deviation maps, their post-processing and the healthy-cohort calibration (saved with the model) ---


@dataclass(config=SCHEMA)
class DeviationConfig:
    """How residuals become z-maps, binary masks and subject scores; every report records these values
    because each of them changes the published numbers."""

    normalisation: Literal["voxelwise", "regional", "global"] = "voxelwise"
    smoothing_sigma_vox: float = 1.0  # Gaussian smoothing of the voxelwise mean/variance maps (0 = off)
    std_floor: float = 1e-3  # relative to the pooled healthy std: no division by a near-zero local std
    median_filter_size: int = 3  # median filter of the z-map (0 or 1 = off)
    mask_erosion_vox: int = 1  # brain-mask erosion: skull-stripping edges are the commonest false positives
    min_component_vox: int = 5  # connected components (26-connectivity) smaller than this are dropped
    target_fpr: float = 0.01  # fraction of healthy brain voxels above the calibrated threshold
    subject_score: Literal["p99", "mean_top1pct", "lesion_load"] = "mean_top1pct"
    residual: Literal["abs", "signed_pos", "signed_neg"] = "abs"

    def __post_init__(self) -> None:
        if self.smoothing_sigma_vox < 0:
            raise ValueError(f"smoothing_sigma_vox must be >= 0, got {self.smoothing_sigma_vox}")
        if self.std_floor <= 0:
            raise ValueError(f"std_floor must be > 0, got {self.std_floor}")
        if self.median_filter_size < 0 or self.mask_erosion_vox < 0 or self.min_component_vox < 0:
            raise ValueError("median_filter_size, mask_erosion_vox and min_component_vox must be >= 0")
        if not 0.0 < self.target_fpr < 1.0:
            raise ValueError(f"target_fpr must be in (0, 1), got {self.target_fpr}")


@dataclass(config=SCHEMA)
class ReconstructionConfig:
    """Pseudo-healthy reconstruction settings, stored in a model folder's ``brainfm_config.json``."""

    t_star: tuple[float, ...] = (0.5,)  # noise levels as fractions of the training timesteps, one member each
    num_inference_steps: int = 20  # sampler grid over the FULL [0, T) range; only steps <= t* are run
    sampler: Literal["ddim", "dpm++"] = "ddim"
    guidance_scale: float = 1.0  # 1 = plain conditional prediction; > 1 = classifier-free guidance
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 16  # 2D slices (or 3D volumes) per network call

    def __post_init__(self) -> None:
        if not self.t_star or any(not 0.0 < t <= 1.0 for t in self.t_star):
            raise ValueError(f"t_star must be fractions in (0, 1], got {self.t_star}")
        if self.num_inference_steps < 1 or self.batch_size < 1:
            raise ValueError("num_inference_steps and batch_size must be >= 1")
        if not self.seeds:
            raise ValueError("seeds must hold at least one seed")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")


# ---- Fine-tuning: heads on [scan, pseudo-healthy, z-map, UNet features]; label-efficiency curve, cross-disease ---


@dataclass(config=SCHEMA)
class FinetuneDataSection:
    """Which foundation model, which cohort, and how it is split; the split is a pure function of ``seed``."""

    model: Annotated[str, PATH, MODEL_DIR] = "runs/model"  # model folder (brainfm detect --model), calibrated
    # cohort CSV with label and lesion_type columns (brainfm data synth)
    manifest: Annotated[str, PATH, MustExist("file", hint="a cohort CSV")] = "cohort/manifest.csv"
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
            raise ValueError("batch_size must be >= 1 and unlabelled_batch_size >= 0")
        if self.n_calibration_healthy < 1:
            raise ValueError(
                "n_calibration_healthy must be >= 1: head thresholds are calibrated on healthy scans"
            )
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.negative_slices_per_lesion_slice < 0 or not 0.0 <= self.min_brain_fraction < 1.0:
            raise ValueError("negative_slices_per_lesion_slice must be >= 0, min_brain_fraction in [0, 1)")


@dataclass(config=SCHEMA)
class HeadSection:
    """``network`` = ``LesionHead``'s arguments (``inputs``, ``channels``, ``disease_mode``, ...); ``unet_features``
    adds the frozen latent UNet's last up-block as input."""

    network: Annotated[Any, HEAD_NETWORK] = dataclasses.field(default_factory=HEAD_NETWORK.default)
    unet_features: bool = False
    feature_timestep: float = 0.05  # fraction of the training timesteps at which the clean latent is shown
    disease_token_drop: float = 0.3  # film: fraction of samples trained with the "any lesion" token

    def __post_init__(self) -> None:
        from brainfm.models.heads import HEAD_INPUTS  # imported already: the network schema needs the module

        net = self.network
        if len(net.channels) < 2 or any(c < 1 for c in net.channels):
            raise ValueError(f"network.channels needs >= 2 positive levels, got {list(net.channels)}")
        if not net.inputs or any(i not in HEAD_INPUTS for i in net.inputs):
            raise ValueError(f"network.inputs must be among {list(HEAD_INPUTS)}, got {list(net.inputs)}")
        if not 0.0 <= self.feature_timestep < 1.0 or not 0.0 <= self.disease_token_drop <= 1.0:
            raise ValueError("feature_timestep must be in [0, 1) and disease_token_drop in [0, 1]")


@dataclass(config=SCHEMA)
class LoRASection:
    """LoRA adapters on the latent UNet (only meaningful with ``head.unet_features``); base weights stay frozen."""

    enabled: bool = False
    rank: int = 4
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "out_proj", "conv1.conv", "conv2.conv")

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0 or not self.target_modules:
            raise ValueError("rank must be >= 1, alpha > 0, dropout in [0, 1), target_modules non-empty")


@dataclass(config=SCHEMA)
class SemiSection:
    """Semi-supervised objective and the label-efficiency curve."""

    labelled_counts: tuple[int | Literal["all"], ...] = (0, 1, 3, 10, "all")  # 0 = the unsupervised map
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    pseudo_labels: bool = True  # confident z-map voxels of unlabelled scans as targets
    pseudo_low_z: float = 0.5  # z below this (inside the brain) = confident background
    pseudo_weight: float = 0.5
    consistency_weight: float = 0.5  # prediction agreement under flip + intensity augmentation
    baseline: bool = True  # also train a scan-only MONAI UNet from scratch on the same labels

    def __post_init__(self) -> None:
        if not self.labelled_counts:
            raise ValueError("labelled_counts must not be empty")
        if any(isinstance(c, int) and c < 0 for c in self.labelled_counts):
            raise ValueError(f"labelled_counts must be >= 0 or 'all', got {self.labelled_counts}")
        if min(self.dice_weight, self.bce_weight, self.pseudo_weight, self.consistency_weight) < 0:
            raise ValueError("semi loss weights must be >= 0")


@dataclass(config=SCHEMA)
class CrossSection:
    """Cross-disease matrix: one head per training group, tested on every lesion kind."""

    train_groups: tuple[tuple[str, ...], ...] = (("tumour",), ("ms",), ("stroke",), ("svd",))
    test_kinds: tuple[str, ...] = ("tumour", "ms", "stroke", "svd")

    def __post_init__(self) -> None:
        kinds = {"tumour", "ms", "stroke", "svd"}
        if not self.train_groups or any(not g for g in self.train_groups) or not self.test_kinds:
            raise ValueError("train_groups and test_kinds must be non-empty")
        unknown = {k for g in self.train_groups for k in g} | set(self.test_kinds)
        if unknown - kinds:
            raise ValueError(f"unknown lesion kinds {sorted(unknown - kinds)}; known: {sorted(kinds)}")


def _finetune_train_defaults() -> TrainConfig:
    # few hundred steps: EMA would export weights close to the initialisation, so it is off by default
    return TrainConfig(
        ema_decay=None, checkpoint_every=50, log_every=10, sample_every=0, output_dir="runs/finetune"
    )


@dataclass(config=SCHEMA)
class FinetuneConfig:
    """``brainfm finetune semi|cross --config``; optim/train are the pretraining sections (same loop)."""

    data: FinetuneDataSection = dataclasses.field(default_factory=FinetuneDataSection)
    head: HeadSection = dataclasses.field(default_factory=HeadSection)
    lora: LoRASection = dataclasses.field(default_factory=LoRASection)
    semi: SemiSection = dataclasses.field(default_factory=SemiSection)
    cross: CrossSection = dataclasses.field(default_factory=CrossSection)
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(lr=1e-3, max_steps=200, warmup_steps=10)
    )
    train: TrainConfig = dataclasses.field(default_factory=_finetune_train_defaults)

    def __post_init__(self) -> None:
        if self.lora.enabled and not self.head.unet_features:
            raise ValueError(
                "lora.enabled needs head.unet_features: true (adapters act through the UNet features)"
            )
        if self.lora.enabled and self.train.ema_decay is not None:
            raise ValueError(
                "lora.enabled needs train.ema_decay: null (adapters are exported from the live weights)"
            )


# ---- The demo: everything that decides its numbers, stored in the demo folder ----------------------------------
_REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass(config=SCHEMA)
class DemoSettings:
    """``brainfm demo`` settings; ``data`` and ``pretrain`` are nested overrides of the two config files."""

    n_healthy: int = 32  # healthy subjects: train + val (calibration) + test (false positives)
    n_lesion: int = 12  # SIMULATED-lesion subjects, cycling tumour, ms, stroke, svd
    n_val: int = 6  # healthy subjects held out for calibration (a voxelwise threshold needs several)
    n_test_healthy: int = 4  # healthy subjects held out for the false-positive rate and subject AUROC
    seed: int = 0
    resolution: int = 2  # mm of the template the subjects are synthesised from
    data_config: Annotated[str, PATH, MustExist("file")] = str(_REPO_CONFIGS / "data" / "demo.yaml")
    pretrain_config: Annotated[str, PATH, MustExist("file")] = str(
        _REPO_CONFIGS / "pretrain" / "demo-2d.yaml"
    )
    vae_steps: int | None = 1200  # None: the pretrain config's optim.max_steps
    ldm_steps: int | None = 1500
    data: dict[str, Any] = dataclasses.field(default_factory=dict)  # nested overrides of the data config
    pretrain: dict[str, Any] = dataclasses.field(default_factory=dict)  # nested overrides of the pretrain cfg
    reconstruction: ReconstructionConfig = dataclasses.field(
        default_factory=lambda: ReconstructionConfig(
            t_star=(0.5,), num_inference_steps=10, seeds=(0, 1), batch_size=48
        )
    )
    deviation: DeviationConfig = dataclasses.field(default_factory=DeviationConfig)

    def __post_init__(self) -> None:
        if self.n_healthy < self.n_val + self.n_test_healthy + 2:
            raise ValueError(
                "n_healthy must leave at least 2 training subjects after n_val and n_test_healthy"
            )
        if self.n_val < 2 or self.n_test_healthy < 1 or self.n_lesion < 1:
            raise ValueError("need n_val >= 2, n_test_healthy >= 1 and n_lesion >= 1")


# ---- Published protocols (configs/protocols/): data, resolution, thresholds and the numbers papers report --

HEALTHY_DATASETS = ("ixi", "oasis3", "bids")  # layouts of `brainfm data manifest` without lesion labels
LESION_DATASETS = ("brats2021", "atlas2", "mslub", "wmh2017")  # layouts whose rows carry voxel labels
# healthy_fpr: threshold at a fixed false-positive rate of healthy validation brain voxels (Bercea et al.);
# greedy_dice_lesion_val: the threshold maximising Dice on a labelled validation split of the lesion dataset, Dice
# reported on the rest (Behrendt et al.); best_on_test: the best threshold on the test labels (an upper bound).
ThresholdProtocolName = Literal["healthy_fpr", "greedy_dice_lesion_val", "best_on_test"]


@dataclass(config=SCHEMA)
class ProtocolDataSection:
    """One side of a protocol: a dataset layout and the manifest ``brainfm data manifest`` wrote for it."""

    dataset: Literal["ixi", "brats2021", "atlas2", "mslub", "wmh2017", "oasis3", "cq500", "bids"]
    # `brainfm data manifest --dataset <dataset> --root <download> --out <manifest>`
    manifest: Annotated[str, PATH, MustExist("file", hint="write it with brainfm data manifest")]
    modality: str  # the rows of the manifest this protocol uses

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality {self.modality!r} is not one of {list(MODALITIES)}")


@dataclass(config=SCHEMA)
class ProtocolThresholdSection:
    """Which threshold protocols are reported (each separately, by name) and their parameters."""

    reported: tuple[ThresholdProtocolName, ...] = ("healthy_fpr", "greedy_dice_lesion_val")
    healthy_fpr: tuple[float, ...] = (0.01,)  # fractions of healthy validation brain voxels above threshold
    lesion_val_fraction: float = 0.33  # of the lesion subjects, held out to choose the greedy-Dice threshold
    split_seed: int = 0  # the lesion validation/test split is a pure function of (subjects, seed)

    def __post_init__(self) -> None:
        if not self.reported:
            raise ValueError("reported must name at least one threshold protocol")
        if "healthy_fpr" in self.reported and not self.healthy_fpr:
            raise ValueError("healthy_fpr must list at least one rate when healthy_fpr is reported")
        if any(not 0.0 < f < 1.0 for f in self.healthy_fpr):
            raise ValueError(f"healthy_fpr values must be in (0, 1), got {self.healthy_fpr}")
        if not 0.0 < self.lesion_val_fraction < 1.0:
            raise ValueError(f"lesion_val_fraction must be in (0, 1), got {self.lesion_val_fraction}")


@dataclass(config=SCHEMA)
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


@dataclass(config=SCHEMA)
class ProtocolConfig:
    """A published evaluation protocol: train on ``train`` (healthy), evaluate on ``evaluate`` (labelled), at
    ``preprocess``'s resolution, in ``mode``, with ``pretrain_config``'s models; report every threshold protocol
    in ``reported`` beside ``published``."""

    name: str
    description: str
    train: ProtocolDataSection
    evaluate: ProtocolDataSection
    mode: Literal["2d", "3d"]
    preprocess: PreprocessConfig
    # configs/pretrain/<name>.yaml; the runner points its data.shard_dir at this protocol's shards
    pretrain_config: Annotated[str, PATH, MustExist("file")]
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


# ---- The kinds of config file `brainfm config check` knows -----------------------------------------------------
CONFIG_KINDS: dict[str, type] = {
    "data": DataConfig,
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "demo": DemoSettings,
    "protocol": ProtocolConfig,
}
