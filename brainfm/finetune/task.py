"""The head-training *task*: ``HeadTask`` implements ``brainfm.train.tasks.Task``, so heads train on the same
``Trainer`` as pretraining (same checkpoints, guards and resume).

Each step takes a labelled batch (Dice + BCE against the label; per-disease channels or a disease token) and an
unlabelled batch (BCE against pseudo-labels read off the calibrated z-map — z above the healthy threshold is
lesion, z below ``pseudo_low_z`` is background, the rest is ignored — and agreement of the predictions under a
left-right flip plus intensity jitter). Samples are 2D axial slices or 3D volumes held in memory; their order is a
seeded permutation per epoch, so the stream's state (epoch, position) restores it exactly on resume.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brainfm.anomaly.deviation import binarize
from brainfm.anomaly.head import HEAD_CONFIG, HEAD_SUBDIR, LORA_SUBDIR
from brainfm.config import DeviationConfig, FinetuneConfig
from brainfm.finetune.features import ScanRecord
from brainfm.io import BrainFMInputError, write_json
from brainfm.models.heads import LesionHead, UNetFeatures
from brainfm.train.tasks import Batch, GeneratorState, Objective, Stateful, make_optimizer

if TYPE_CHECKING:
    from accelerate import Accelerator

_TENSOR_KEYS = ("scan", "pseudo_healthy", "zmap", "mask", "target", "weight", "anatomy")


# ------------------------------------------------------------------------------------------------ samples
@dataclasses.dataclass
class Samples:
    """Training samples as stacked tensors: (N, 1, *spatial) maps, (N, C, *spatial) anatomy, per-sample info."""

    tensors: dict[str, Tensor]
    meta: list[dict[str, Any]]
    disease: list[str | None]
    slice_position: Tensor | None

    def __len__(self) -> int:
        return len(self.meta)

    def take(self, index: Tensor) -> dict[str, Any]:
        rows = index.tolist()
        return {
            **{k: v[index] for k, v in self.tensors.items()},
            "meta": [self.meta[i] for i in rows],
            "disease": [self.disease[i] for i in rows],
            "slice_position": None if self.slice_position is None else self.slice_position[index],
        }


def _volume_channels(record: ScanRecord, target: np.ndarray, weight: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "scan": record.image[None], "pseudo_healthy": record.pseudo_healthy[None], "zmap": record.zmap[None],
        "mask": record.mask[None].astype(np.float32), "target": target[None].astype(np.float32),
        "weight": weight[None].astype(np.float32), "anatomy": record.anatomy.astype(np.float32),
    }


def _targets(record: ScanRecord, z_threshold: float, low_z: float,
             deviation: DeviationConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Labelled: the label everywhere (0 outside the brain). Unlabelled: confident z-map voxels only — above the
    calibrated threshold after the map's own post-processing (``deviation``: erosion, small components dropped,
    so isolated healthy false positives do not become lesion targets), or below ``low_z``."""
    if record.label is not None:
        return (record.label > 0).astype(np.float32), np.ones(record.image.shape, np.float32)
    if deviation is not None:
        positive = binarize(record.zmap, z_threshold, record.mask, deviation)
    else:
        positive = record.mask & (record.zmap > z_threshold)
    negative = record.mask & (record.zmap < low_z)
    return positive.astype(np.float32), (positive | negative).astype(np.float32)


def build_samples(records: Sequence[ScanRecord], spatial_dims: int, *, z_threshold: float, low_z: float,
                  min_brain_fraction: float = 0.05, negatives_per_positive: float | None = None,
                  seed: int = 0, with_anatomy: bool = False, deviation: DeviationConfig | None = None) -> Samples:
    """Volumes (3D) or axial slices (2D) of ``records``. In 2D, labelled lesion-free slices are subsampled to
    ``negatives_per_positive`` per lesion slice (seeded) so that small lesions are not drowned out."""
    rng = np.random.default_rng(seed)
    stacks: dict[str, list[np.ndarray]] = {k: [] for k in _TENSOR_KEYS}
    meta, disease, positions = [], [], []
    for record in records:
        target, weight = _targets(record, z_threshold, low_z, deviation)
        channels = _volume_channels(record, target, weight)
        kind = record.lesion_type if record.has_lesion else None
        if spatial_dims == 3:
            picks = [None]
        else:
            depth = record.image.shape[-1]
            brain = record.mask.reshape(-1, depth).mean(axis=0)
            candidates = np.flatnonzero(brain > min_brain_fraction)
            if record.label is not None and negatives_per_positive is not None and record.has_lesion:
                lesion = record.label.reshape(-1, depth).any(axis=0)
                positive = [z for z in candidates if lesion[z]]
                negative = [z for z in candidates if not lesion[z]]
                keep = min(len(negative), int(round(negatives_per_positive * len(positive))))
                chosen = rng.choice(len(negative), size=keep, replace=False) if keep else []
                candidates = np.asarray(sorted(positive + [negative[i] for i in chosen]), dtype=int)
            picks = [int(z) for z in candidates]
        for z in picks:
            for key, value in channels.items():
                stacks[key].append(value if z is None else value[..., z])
            meta.append({**record.meta, "__key__": record.name if z is None else f"{record.name}@{z}"})
            disease.append(kind)
            if z is not None:
                positions.append(z / max(1, record.image.shape[-1] - 1))
    if not meta:
        raise BrainFMInputError(None, "no training samples (no scan with enough brain)")
    if not with_anatomy:
        stacks.pop("anatomy")
    tensors = {k: torch.from_numpy(np.stack(v)).float() for k, v in stacks.items()}
    slice_position = torch.tensor(positions, dtype=torch.float32) if positions else None
    return Samples(tensors=tensors, meta=meta, disease=disease, slice_position=slice_position)


class _Permutation:
    """Endless seeded permutation per epoch over ``n`` items, dealt round-robin to ``world_size`` ranks so that
    ranks read disjoint items (every rank reads all of them when there are fewer items than ranks);
    state = (epoch, position in this rank's share)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = (rank, world_size) if n >= world_size else (0, 1)
        self.epoch = self.position = 0

    def _share(self) -> Tensor:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        return order[self.rank::self.world_size]

    def next(self) -> Tensor:
        if self.position >= len(range(self.rank, self.n, self.world_size)):
            self.epoch, self.position = self.epoch + 1, 0
        index = self._share()[self.position:self.position + self.batch_size]
        self.position += len(index)
        return index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class HeadStream:
    """Batches of labelled samples, each paired with a batch of unlabelled ones (when there are any)."""

    def __init__(self, labelled: Samples, unlabelled: Samples | None, batch_size: int, unlabelled_batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.labelled, self.unlabelled = labelled, unlabelled
        # one seeded order shared by the ranks, each reading its own share of it (the data is held in memory)
        self.order = _Permutation(len(labelled), batch_size, seed * 1000, rank, world_size)
        self.unlabelled_order = None
        if unlabelled is not None and len(unlabelled) and unlabelled_batch_size > 0:
            self.unlabelled_order = _Permutation(len(unlabelled), unlabelled_batch_size, seed * 1000 + 500, rank,
                                                 world_size)

    def next(self) -> dict[str, Any]:
        batch = self.labelled.take(self.order.next())
        batch["unlabelled"] = None if self.unlabelled_order is None else self.unlabelled.take(self.unlabelled_order.next())
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"labelled": self.order.state_dict(),
                "unlabelled": None if self.unlabelled_order is None else self.unlabelled_order.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state["labelled"])
        if self.unlabelled_order is not None and state.get("unlabelled") is not None:
            self.unlabelled_order.load_state_dict(state["unlabelled"])


# ------------------------------------------------------------------------------------------------ module
class HeadModel(nn.Module):
    """Head (+ optional UNet feature extractor with LoRA) as ONE module, the loss inside ``forward`` so that DDP
    sees every trainable parameter through its own hooks."""

    def __init__(self, head: LesionHead, features: UNetFeatures | None, config: FinetuneConfig) -> None:
        super().__init__()
        self.head = head
        self.features = features
        self.semi = config.semi
        self.token_drop = config.head.disease_token_drop
        from monai.losses import DiceLoss

        self.dice = DiceLoss(sigmoid=True, batch=True)

    def logits(self, batch: dict[str, Any], disease: Tensor | None = None, flip: bool = False,
               jitter: Tensor | None = None) -> Tensor:
        scan, pseudo = batch["scan"], batch["pseudo_healthy"]
        if jitter is not None:  # intensity augmentation of the image channels (same for scan and reconstruction)
            scan, pseudo = scan.clamp_min(0) ** jitter, pseudo.clamp_min(0) ** jitter
        features = None
        if self.features is not None:
            features = self.features(scan, batch["anatomy"], batch["meta"], batch.get("slice_position"))
        x = self.head.assemble(scan, pseudo, batch["zmap"], features)
        if flip:
            x = x.flip(2)
        out = self.head(x, disease)
        return out.flip(2) if flip else out

    def supervised_targets(self, batch: dict[str, Any], generator: torch.Generator | None
                           ) -> tuple[Tensor | None, Tensor]:
        """Disease tokens (FiLM) and the per-channel targets: channel 0 = any lesion; per-disease channels are
        one-vs-rest (a scan of another kind, or a healthy one, is background for that disease)."""
        head = self.head
        target = batch["target"]
        mode = head.config.disease_mode
        if mode == "film":
            tokens = head.disease_index(batch["disease"])
            drop = torch.rand(len(tokens), generator=generator) < self.token_drop
            tokens[drop] = len(head.config.diseases)
            return tokens, target
        if mode == "outputs" and head.config.diseases:
            channels = [target]
            for disease in head.config.diseases:
                same = torch.tensor([d == disease for d in batch["disease"]], dtype=target.dtype)
                channels.append(target * same.reshape(-1, *([1] * (target.ndim - 1))))
            return None, torch.cat(channels, dim=1)
        return None, target

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        semi = self.semi
        tokens, target = self.supervised_targets(batch, generator)
        logits = self.logits(batch, tokens)
        dice = self.dice(logits, target)
        bce = F.binary_cross_entropy_with_logits(logits, target)
        total = semi.dice_weight * dice + semi.bce_weight * bce
        parts = {"dice_loss": dice.detach(), "bce": bce.detach()}
        unlabelled = batch.get("unlabelled")
        if unlabelled is not None and (semi.pseudo_labels and semi.pseudo_weight > 0 or semi.consistency_weight > 0):
            plain = self.logits(unlabelled)[:, :1]
            if semi.pseudo_labels and semi.pseudo_weight > 0:
                weight = unlabelled["weight"]
                pseudo = (F.binary_cross_entropy_with_logits(plain, unlabelled["target"], reduction="none") * weight
                          ).sum() / weight.sum().clamp_min(1.0)
                total = total + semi.pseudo_weight * pseudo
                parts["pseudo"] = pseudo.detach()
            if semi.consistency_weight > 0:
                n = plain.shape[0]
                jitter = torch.exp(0.2 * (torch.rand(n, generator=generator) - 0.5)).reshape(
                    -1, *([1] * (plain.ndim - 1)))
                augmented = self.logits(unlabelled, flip=True, jitter=jitter)[:, :1]
                mask = unlabelled["mask"]
                gap = (torch.sigmoid(augmented) - torch.sigmoid(plain).detach()).pow(2) * mask
                consistency = gap.sum() / mask.sum().clamp_min(1.0)
                total = total + semi.consistency_weight * consistency
                parts["consistency"] = consistency.detach()
        parts["total"] = total.detach()
        return total, parts


def make_head(config: FinetuneConfig, spatial_dims: int, diseases: Sequence[str], *, feature_channels: int = 0,
              inputs: Sequence[str] | None = None, disease_mode: str | None = None) -> LesionHead:
    network = dict(config.head.network)  # LesionHead's arguments; inputs / disease_mode overridable per head
    network.update({k: v for k, v in (("inputs", inputs), ("disease_mode", disease_mode)) if v})
    return LesionHead(spatial_dims=spatial_dims, feature_channels=feature_channels, diseases=tuple(diseases),
                      **network)


def foundation_features(model_dir: str | Path, config: FinetuneConfig, lora_dir: str | Path | None = None,
                        trainable_lora: bool = False) -> tuple[UNetFeatures, Any]:
    """Frozen VAE + conditioner + latent UNet from the model folder (optionally with LoRA adapters, fresh or
    loaded) as a feature extractor; returns (extractor, peft model or None)."""
    from brainfm.models.heads import add_lora, load_lora
    from brainfm.pipeline import BrainFMPipeline

    model = BrainFMPipeline.from_pretrained(model_dir)
    for net in (model.vae, model.unet, model.conditioner):
        net.requires_grad_(False)
    peft_model = None
    if lora_dir is not None:
        peft_model = load_lora(model.unet, lora_dir, trainable=trainable_lora)
    elif config.lora.enabled and trainable_lora:
        lora = config.lora
        peft_model = add_lora(model.unet, lora.rank, lora.alpha, lora.dropout, lora.target_modules)
    timestep = int(round(config.head.feature_timestep * int(model.noise_scheduler.config.num_train_timesteps)))
    return UNetFeatures(model.vae, model.unet, model.conditioner, timestep), peft_model


# ------------------------------------------------------------------------------------------------ the task
class HeadTask:
    """A lesion head (+ optional LoRA on the frozen UNet features) as a ``brainfm.train.tasks.Task``."""

    name = "finetune-head"

    def __init__(self, config: FinetuneConfig, labelled: Samples, unlabelled: Samples | None, head: LesionHead,
                 features: UNetFeatures | None, peft_model: Any, description: dict[str, Any]) -> None:
        self.config = config
        self.labelled, self.unlabelled = labelled, unlabelled
        self.model = HeadModel(head, features, config)
        self.peft_model = peft_model
        self.description = description
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.objectives = [Objective("head", self.model, make_optimizer(trainable, config.optim.lr, config.optim),
                                     ema=True)]
        self.noise = GeneratorState(config.train.seed)

    def extra_state(self) -> list[Stateful]:
        return [self.noise]

    def enable_gradient_checkpointing(self) -> None:
        if self.model.features is not None:
            self.model.features.unet.enable_gradient_checkpointing()

    def make_stream(self, accelerator: Accelerator) -> HeadStream:
        data = self.config.data
        return HeadStream(self.labelled, self.unlabelled, data.batch_size, data.unlabelled_batch_size,
                          self.config.train.seed, accelerator.process_index, accelerator.num_processes)

    def losses(self, accelerator: Accelerator, batch: Batch, step: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        from accelerate.utils import send_to_device

        batch = send_to_device(batch, accelerator.device)
        loss, parts = self.objectives[0].model(batch, self.noise.generator)
        return {"head": loss}, parts

    @torch.no_grad()
    def preview(self, model: nn.Module, batch: Batch, device: torch.device) -> list[tuple[str, Tensor]]:
        from accelerate.utils import send_to_device

        batch = send_to_device(batch, device)
        n = min(4, len(batch["meta"]))
        sub = {k: (v[:n] if isinstance(v, Tensor | list) else v) for k, v in batch.items() if k != "unlabelled"}
        probability = torch.sigmoid(model.logits(sub)[:, :1])
        return [("scan", sub["scan"]), ("label", sub["target"]), ("z / 10", (sub["zmap"] / 10).clamp(0, 1)),
                ("head probability", probability)]

    def export(self, model: nn.Module, run_dir: Path, device: torch.device) -> None:
        """``RUN/head`` (save_pretrained), ``RUN/lora`` (adapters only) and ``RUN/head_config.json``."""
        from brainfm.train.export import save_pretrained

        save_pretrained(model.head, run_dir / HEAD_SUBDIR)
        if self.peft_model is not None:
            save_pretrained(self.peft_model, run_dir / LORA_SUBDIR)  # peft saves the adapters only
        write_head_info(run_dir, {**self.description, "lora": self.peft_model is not None})


def write_head_info(run_dir: Path, info: dict[str, Any]) -> None:
    """``head_config.json`` in the run folder and a copy inside ``head/``, so the weights folder alone (what a
    release ships) still carries its threshold and inputs."""
    write_json(run_dir / HEAD_CONFIG, info)
    if (run_dir / HEAD_SUBDIR).is_dir():
        write_json(run_dir / HEAD_SUBDIR / HEAD_CONFIG, info)


__all__ = ["HeadModel", "HeadStream", "HeadTask", "Samples", "build_samples", "make_head"]
