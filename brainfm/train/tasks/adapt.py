"""Site adaptation task: LoRA adapters on the latent UNet, trained on a site's few healthy scans.

The objective is the pretraining one (the denoising loss of ``LDMTask``, conditioning dropout included, so
classifier-free guidance keeps working); only the adapters train: the VAE, the conditioner and the UNet's own
weights stay frozen, so a handful of scans shift the model toward the site without overwriting what it learnt.
The scans are preprocessed by the caller (``brainfm.anomaly.adapt``) and encoded once by the frozen VAE, like
``ldm.cache_latents``; the run is checkpointed and resumable like every task on the :class:`Trainer`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from brainfm.config import AdaptConfig
from brainfm.io import BrainFMInputError
from brainfm.train.tasks import Batch, GeneratorState, Objective, Stateful, make_optimizer, unwrap
from brainfm.train.tasks.ldm import Denoiser, LatentCache

if TYPE_CHECKING:
    from accelerate import Accelerator

LORA_DIR = "lora"  # the adapters inside the run folder (peft's adapter_config.json + adapter_model.safetensors)
_ENCODE_BATCH = 32


@dataclasses.dataclass
class SiteVolume:
    """One healthy scan on the model grid: ``anatomy`` is the UNet's conditioning (brain mask + tissue priors)."""

    name: str
    image: np.ndarray  # (X, Y, Z)
    anatomy: np.ndarray  # (1 + priors, X, Y, Z); channel 0 is the brain mask
    meta: dict[str, Any]


class SiteAdaptTask:
    """LoRA on a copy of the model's latent UNet, trained with the pretraining objective on a site's scans."""

    name = "adapt-site"

    def __init__(self, config: AdaptConfig, vae: nn.Module, unet: nn.Module, conditioner: nn.Module,
                 noise_scheduler: Any, volumes: Sequence[SiteVolume], *, cond_drop_prob: float, seed: int) -> None:
        from brainfm.models.heads import add_lora

        if not volumes:
            raise BrainFMInputError(None, "site adaptation needs at least one healthy scan to train on")
        self.config = config
        self.vae = vae.eval().requires_grad_(False)
        self.volumes = list(volumes)
        lora = config.lora
        trained = copy.deepcopy(unet)  # the caller's UNet is never altered
        self.peft_model = add_lora(trained, lora.rank, lora.alpha, lora.dropout, lora.target_modules)
        self.model = Denoiser(trained, copy.deepcopy(conditioner).requires_grad_(False), noise_scheduler,
                              cond_drop_prob)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.objectives = [Objective("denoiser", self.model, make_optimizer(trainable, config.optim.lr, config.optim),
                                     ema=True)]
        self.noise = GeneratorState(seed)

    def extra_state(self) -> list[Stateful]:
        return [self.noise]

    def enable_gradient_checkpointing(self) -> None:
        self.model.unet.enable_gradient_checkpointing()

    @torch.no_grad()
    def _encode(self, images: Tensor, device: torch.device) -> Tensor:
        return torch.cat([self.vae.encode_latent(images[i:i + _ENCODE_BATCH].to(device)).float().cpu()
                          for i in range(0, len(images), _ENCODE_BATCH)])

    def make_stream(self, accelerator: Accelerator) -> LatentCache:
        """This rank's share of the scans (2D: of their brain slices), encoded once by the frozen VAE."""
        rank, world = accelerator.process_index, accelerator.num_processes
        batches: list[Batch] = []
        position = 0
        for volume in self.volumes:
            image = torch.from_numpy(np.asarray(volume.image, dtype=np.float32))[None]  # (1, X, Y, Z)
            anatomy = torch.from_numpy(np.asarray(volume.anatomy, dtype=np.float32))
            meta = {**volume.meta, "key": volume.name}
            if self.vae.config.spatial_dims == 3:
                keep = position % world == rank
                position += 1
                if keep:
                    batches.append({"latents": self._encode(image[None], accelerator.device), "mask": anatomy[None, :1],
                                    "anatomy": anatomy[None, 1:], "meta": [meta], "slice_position": None})
                continue
            depth = image.shape[-1]
            needed = self.config.data.min_brain_fraction * image.shape[1] * image.shape[2]
            brain = anatomy[0].flatten(0, 1).sum(0)
            slices = [z for z in range(depth) if float(brain[z]) > 0 and float(brain[z]) >= needed]
            mine = [z for i, z in enumerate(slices, start=position) if i % world == rank]
            position += len(slices)
            if not mine:
                continue
            stack = image[..., mine].permute(3, 0, 1, 2).contiguous()  # (n, 1, X, Y)
            maps = anatomy[..., mine].permute(3, 0, 1, 2).contiguous()  # (n, C, X, Y)
            batches.append({"latents": self._encode(stack, accelerator.device), "mask": maps[:, :1],
                            "anatomy": maps[:, 1:], "meta": [dict(meta) for _ in mine],
                            "slice_position": torch.tensor([z / max(1, depth - 1) for z in mine])})
        if not batches:
            raise BrainFMInputError(None, f"no training sample for rank {rank} of {world}: too few brain slices")
        return LatentCache(batches, self.config.data.batch_size, self.config.train.seed * 1000 + rank)

    def losses(self, accelerator: Accelerator, batch: Batch, step: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        device = accelerator.device
        model = self.objectives[0].model
        tokens = unwrap(accelerator, model).conditioner.tokenize(batch["meta"], batch.get("slice_position"))
        anatomy = torch.cat([batch["mask"], batch["anatomy"]], dim=1).to(device)
        loss = model(batch["latents"].to(device), anatomy, tokens, self.noise.generator)
        return {"denoiser": loss}, {"mse": loss.detach()}

    @torch.no_grad()
    def preview(self, model: nn.Module, batch: Batch, device: torch.device) -> list[tuple[str, Tensor]]:
        """The scans as the VAE gives them back, and the adapted denoiser's reconstruction from half-way noise."""
        from brainfm.diffusion import denoise, make_scheduler

        n = min(4, len(batch["meta"]))
        latents = batch["latents"][:n].to(device)
        anatomy = torch.cat([batch["mask"][:n], batch["anatomy"][:n]], dim=1).to(device)
        positions = None if batch.get("slice_position") is None else batch["slice_position"][:n]
        tokens = {k: v.to(device) for k, v in model.conditioner.tokenize(batch["meta"][:n], positions).items()}
        schedule = model.noise_scheduler.config
        sampler = make_scheduler("ddim", int(schedule.num_train_timesteps), schedule.beta_schedule,
                                 model.unet.config.prediction_type, beta_start=float(schedule.beta_start),
                                 beta_end=float(schedule.beta_end))
        start = int(schedule.num_train_timesteps) // 2
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)).to(device)
        noised = model.noise_scheduler.add_noise(latents, noise, torch.full((n,), start, device=device))
        denoised = denoise(model.unet, model.conditioner, noised, start, anatomy, tokens, sampler, 10)
        return [("scan (VAE)", self.vae.decode_latent(latents).clamp(0, 1)), ("brain mask", batch["mask"][:n].to(device)),
                ("reconstruction from t = T/2", self.vae.decode_latent(denoised).clamp(0, 1))]

    def export(self, model: nn.Module, run_dir: Path, device: torch.device) -> None:
        """``RUN/lora``: the adapters only (safetensors), never the frozen base weights."""
        from brainfm.train.export import save_pretrained

        save_pretrained(self.peft_model, run_dir / LORA_DIR)


__all__ = ["LORA_DIR", "SiteAdaptTask", "SiteVolume"]
