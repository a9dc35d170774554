"""Training configs: pretraining (one file drives both stages, VAE then latent diffusion) and fine-tuning
(heads on [scan, pseudo-healthy, z-map, UNet features]: label-efficiency curve, cross-disease matrix)."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic.dataclasses import dataclass

from brainfm.config.data import ReaderConfig
from brainfm.config.loader import PATH, SCHEMA, ConfigPath, MustExist
from brainfm.config.networks import (
    CONDITIONER_NETWORK,
    DISCRIMINATOR_NETWORK,
    HEAD_NETWORK,
    UNET_NETWORK,
    VAE_NETWORK,
)

SHARDS = MustExist("dir", inside="index.json", hint="build it with brainfm data shards")
MODEL_DIR = MustExist("dir", hint="a model folder made by brainfm calibrate")


@dataclass(config=SCHEMA)
class PretrainDataSection:
    """Where the shards are and how the streaming reader batches them."""

    shard_dir: Annotated[str, PATH, SHARDS]  # the folder `brainfm data shards` wrote; required
    # Read the shards from URLs instead ({name} = shard file name; shard_dir then only needs index.json), e.g.
    # "pipe:curl -fsS --connect-timeout 10 --speed-time 60 --speed-limit 1024 http://host:8000/shards/{name}"
    shard_url: str | None = None
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
        if self.shard_url is not None and "{name}" not in self.shard_url:
            raise ValueError(f"shard_url needs a {{name}} placeholder for the shard file name, got {self.shard_url!r}")

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
    """Stage 2: ``unet`` = ``LatentUNet``'s arguments, ``conditioner`` = the metadata ``Conditioner``'s; then
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
    # latent shards of the training split (`brainfm data latents`, same VAE): read from disk instead of encoding
    latent_dir: ConfigPath | None = None
    # the latent the denoiser learns: the VAE posterior mean, or mean + std * eps drawn afresh at every step
    # (from the task's seeded generator, saved in checkpoints)
    posterior: Literal["mean", "sample"] = "mean"
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
        if self.cache_latents and self.latent_dir:
            raise ValueError("cache_latents and latent_dir are two sources of latents: set one of them")


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
    # Longest wait of one process for the others at a collective (all-reduce, barrier) before the run stops with
    # an error: a lost node ends the run after at most this long instead of hanging. It must exceed the longest
    # one-sided phase (the main process writing a checkpoint or the VAE export while the others wait).
    collective_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if self.collective_timeout_s <= 0:
            raise ValueError(f"collective_timeout_s must be > 0, got {self.collective_timeout_s}")
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
    # which subjects the foundation model has seen (pretraining shards' train/val splits, its calibration scans):
    # "from_model" reads them off the model folder's record and keeps them out of head calibration and every
    # test set; "disjoint" states that this cohort shares no subject with that data (e.g. a released model on a
    # new site's cohort), for a model folder whose training data cannot be read
    pretraining_subjects: Literal["from_model", "disjoint"] = "from_model"
    min_healthy_test: int = 2  # unseen healthy scans kept for the heads' healthy false-positive rate, at least

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.unlabelled_batch_size < 0:
            raise ValueError("batch_size must be >= 1 and unlabelled_batch_size >= 0")
        if self.n_calibration_healthy < 1:
            raise ValueError(
                "n_calibration_healthy must be >= 1: head thresholds are calibrated on healthy scans"
            )
        if self.min_healthy_test < 1:
            raise ValueError("min_healthy_test must be >= 1: heads' healthy false-positive rate needs test scans")
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
    min_test_scans: int = 5  # a cell with fewer test subjects says "too few scans (n)" instead of a number

    def __post_init__(self) -> None:
        if self.min_test_scans < 1:
            raise ValueError(f"min_test_scans must be >= 1, got {self.min_test_scans}")
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


@dataclass(config=SCHEMA)
class AdaptDataSection:
    """How a site's healthy scans are split (by subject, seeded) and batched for LoRA fine-tuning."""

    check_fraction: float = 0.4  # subjects held out to check the healthy false-positive rate (at least one)
    seed: int = 0  # the subject split
    batch_size: int = 8  # 2D slices (or 3D volumes) per step
    min_brain_fraction: float = 0.1  # 2D: slices with less brain than this are not trained on (as the reader)

    def __post_init__(self) -> None:
        if not 0.0 < self.check_fraction < 1.0:
            raise ValueError(f"check_fraction must be in (0, 1), got {self.check_fraction}")
        if self.batch_size < 1 or not 0.0 <= self.min_brain_fraction < 1.0:
            raise ValueError("batch_size must be >= 1 and min_brain_fraction in [0, 1)")


@dataclass(config=SCHEMA)
class AdaptCalibrationSection:
    """The recalibration on the site's scans; null keeps the model's own setting."""

    target_fpr: float | None = None
    # leave_one_out: the threshold is set on each adaptation scan scored against the OTHER scans' statistics (what a
    # new scan of the site meets; needs 3 adaptation scans, else in_sample); in_sample: as `brainfm calibrate`
    threshold: Literal["leave_one_out", "in_sample"] = "leave_one_out"

    def __post_init__(self) -> None:
        if self.target_fpr is not None and not 0.0 < self.target_fpr < 1.0:
            raise ValueError(f"target_fpr must be in (0, 1), got {self.target_fpr}")


def _adapt_train_defaults() -> TrainConfig:
    # LoRA adapters are exported from the live weights (no EMA), as for fine-tuning heads
    return TrainConfig(ema_decay=None, checkpoint_every=50, log_every=10, sample_every=0, output_dir="runs/adapt")


@dataclass(config=SCHEMA)
class AdaptConfig:
    """``brainfm adapt``: recalibration on a site's healthy scans and, with ``lora.enabled``, ``optim.max_steps``
    steps of LoRA fine-tuning of the latent UNet on them (same objective as pretraining, same Trainer)."""

    data: AdaptDataSection = dataclasses.field(default_factory=AdaptDataSection)
    lora: LoRASection = dataclasses.field(default_factory=LoRASection)
    calibration: AdaptCalibrationSection = dataclasses.field(default_factory=AdaptCalibrationSection)
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(lr=1e-4, max_steps=100, warmup_steps=10, lr_scheduler="constant")
    )
    train: TrainConfig = dataclasses.field(default_factory=_adapt_train_defaults)

    def __post_init__(self) -> None:
        if self.lora.enabled and self.train.ema_decay is not None:
            raise ValueError("lora.enabled needs train.ema_decay: null (adapters are exported from the live weights)")
