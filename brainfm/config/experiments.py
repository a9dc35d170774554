"""End-to-end experiments: the demo's settings (everything that decides its numbers, stored in the demo folder)
and the published evaluation protocols (configs/protocols/) a brainfm run is compared with like for like."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic.dataclasses import dataclass

from brainfm.config.anomaly import DeviationConfig, ReconstructionConfig
from brainfm.config.data import MODALITIES, PreprocessConfig
from brainfm.config.loader import PATH, SCHEMA, MustExist

# the repository's configs/ folder (a source checkout): the demo's default data and pretraining configs
_REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass(config=SCHEMA)
class DemoSettings:
    """``brainfm demo`` settings; ``data`` and ``pretrain`` are nested overrides of the two config files.

    The cohort is split by ANATOMY as well as by subject: training subjects come from ``train_anatomies``,
    calibration (healthy) and small-lesion validation subjects from ``val_anatomies``, test subjects from
    ``test_anatomies``, an anatomy held out of training, validation and the conditioning priors (ICBM152's tissue
    maps; ICBM152 and FSL's MNI152 are both MNI averages, brain-mask Dice 0.95, so neither can be the test
    anatomy)."""

    # Sizes: every subject is scanned in four contrasts, so a subject costs four scans (176 in all). The 25-minute
    # budget on 2 cores is what sizes them: shard building about 2 s per scan (affine registration and N4), the
    # two trainings about 5 min each on one thread beside their loader worker, evaluation with every baseline
    # about 4 s per scan on one thread; the site-adapted model's evaluation reads the LDM's reconstructions back.
    # Measured wall times are in run.json and the README. The headline lesion kinds (tumour, stroke) come twice
    # as often as the small ones.
    n_train: int = 10  # healthy training subjects
    n_val: int = 4  # healthy calibration subjects (a voxelwise threshold needs several)
    n_val_lesion: int = 6  # SIMULATED-lesion validation subjects: the small ones choose the small-lesion setting
    n_test_healthy: int = 4  # healthy test subjects: false positives (subject AUROC needs >= 10 per class)
    n_test_lesion: int = 16  # SIMULATED-lesion test subjects, cycling through lesion_kinds
    # site adaptation (`brainfm adapt`) to the held-out anatomy: n_adapt healthy subjects of it, none a test subject
    # (0: no adaptation stage); adapt_steps > 0 adds LoRA steps before the recalibration; adapt: nested overrides
    # of AdaptConfig (its check_fraction of these subjects is held out to check the false-positive rate)
    n_adapt: int = 4  # x 4 contrasts: 16 scans (the budget; adapt's minimum is 3 subjects)
    # 300 LoRA steps: the held-out check subject's false-positive rate after recalibration falls from 0.64 % to
    # 0.48 % with them (the site's own data; a rerun of the adapted model's test evaluation costs about 100 s)
    adapt_steps: int = 300
    adapt: dict[str, Any] = dataclasses.field(default_factory=lambda: {"data": {"check_fraction": 0.25}})
    lesion_kinds: tuple[str, ...] = ("tumour", "stroke", "ms", "tumour", "stroke", "svd")
    # the contrast sets a subject is scanned with, cycled over the subjects of each split: one pooled model
    # learns every contrast (modality token); a subject's contrasts share its geometry, lesion and subject id.
    # One set for all: the intervals resample subjects, and subjects seen in different contrasts would differ
    # by contrast (a FLAIR lesion scores far above the same lesion on CT) rather than by anatomy and lesion.
    protocols: tuple[tuple[str, ...], ...] = (("T1", "T2", "FLAIR", "CT"),)
    train_anatomies: tuple[str, ...] = ("icbm152", "mni152fsl")
    val_anatomies: tuple[str, ...] = ("oasis",)
    test_anatomies: tuple[str, ...] = ("pydeface",)
    seed: int = 0
    dims: Literal[2, 3] = 2  # 2: axial slices; 3: whole volumes (the pretrain config's data.mode must agree)
    resolution: int = 3  # mm of the grid the subjects are synthesised on (the demo's model grid)
    data_config: Annotated[str, PATH, MustExist("file")] = str(_REPO_CONFIGS / "data" / "demo.yaml")
    pretrain_config: Annotated[str, PATH, MustExist("file")] = str(
        _REPO_CONFIGS / "pretrain" / "demo-2d.yaml"
    )
    vae_steps: int | None = 1200  # None: the pretrain config's optim.max_steps
    ldm_steps: int | None = 1500
    data: dict[str, Any] = dataclasses.field(default_factory=dict)  # nested overrides of the data config
    pretrain: dict[str, Any] = dataclasses.field(default_factory=dict)  # nested overrides of the pretrain cfg
    # chosen on the validation anatomy by `brainfm study ablate` at this size (README, "Studies"): t* 0.3 over 0.5
    # and 0.7, two seeds over one, conditional over unconditional
    reconstruction: ReconstructionConfig = dataclasses.field(
        default_factory=lambda: ReconstructionConfig(
            t_star=(0.3,), num_inference_steps=10, seeds=(0, 1), batch_size=48
        )
    )
    deviation: DeviationConfig = dataclasses.field(default_factory=DeviationConfig)

    def __post_init__(self) -> None:
        if self.n_train < 2 or self.n_val < 2 or self.n_test_healthy < 1 or self.n_test_lesion < 1:
            raise ValueError("need n_train >= 2, n_val >= 2, n_test_healthy >= 1 and n_test_lesion >= 1")
        if self.n_val_lesion < 0 or not self.lesion_kinds:
            raise ValueError("n_val_lesion must be >= 0 and lesion_kinds non-empty")
        if not self.protocols or any(not p or len(set(p)) < len(p) or set(p) - set(MODALITIES)
                                     for p in self.protocols):
            raise ValueError(f"protocols must be non-empty sets of distinct modalities from {list(MODALITIES)}, "
                             f"got {[list(p) for p in self.protocols]}")
        covered = {m for p in self.protocols for m in p}
        if (uncovered := [m for m in sorted(covered) if sum(m in self.protocols[i % len(self.protocols)]
                                                           for i in range(self.n_val)) < 2]):
            raise ValueError(f"calibration needs at least 2 healthy validation scans of every modality; with "
                             f"n_val={self.n_val} and these protocols {uncovered} get fewer: raise n_val")
        if self.n_adapt < 0 or self.adapt_steps < 0 or 0 < self.n_adapt < 3:
            raise ValueError("n_adapt must be 0 (no site adaptation) or >= 3 (brainfm adapt's minimum), "
                             "adapt_steps >= 0")
        splits = {"train": self.train_anatomies, "val": self.val_anatomies, "test": self.test_anatomies}
        if any(not anatomies for anatomies in splits.values()):
            raise ValueError("train_anatomies, val_anatomies and test_anatomies must each name an anatomy")
        if set(self.test_anatomies) & (set(self.train_anatomies) | set(self.val_anatomies)):
            raise ValueError("test_anatomies must be held out of training and validation")
        if {"icbm152", "mni152fsl"} & set(self.test_anatomies):
            raise ValueError("test_anatomies must be held out of the conditioning priors too: those are ICBM152's "
                             "tissue maps, and icbm152 and mni152fsl are both MNI averages")


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
            raise ValueError(
                f"train.dataset must be a healthy cohort {list(HEALTHY_DATASETS)}, got {self.train.dataset!r}"
            )
        if self.evaluate.dataset not in LESION_DATASETS:
            raise ValueError(
                f"evaluate.dataset must be a labelled lesion dataset {list(LESION_DATASETS)}, "
                f"got {self.evaluate.dataset!r}"
            )
        if self.train.modality != self.evaluate.modality:
            raise ValueError(
                f"train.modality {self.train.modality!r} and evaluate.modality "
                f"{self.evaluate.modality!r} differ: the published protocols train and test on one "
                "contrast"
            )
        if any(v < 1 for v in self.ignore_label_values):
            raise ValueError("ignore_label_values must be positive label values (0 is background)")
