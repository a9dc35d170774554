"""Pseudo-healthy reconstruction: partial noising of a scan's latent and anatomy-conditioned denoising.

A lesion is an off-manifold detail of the latent; noising the latent to an intermediate level t* destroys such
details while keeping the coarse anatomy, and denoising under the scan's OWN anatomy (brain mask, tissue priors)
and metadata brings it back onto the healthy manifold. The difference between scan and reconstruction is the
anomaly evidence. Several noise levels and seeds give an ensemble: the mean is the pseudo-healthy scan, the spread
an uncertainty map (where the model could plausibly have reconstructed something else).

2D models run slice by slice along the last (axial) axis with the same ``slice_position`` convention as the shard
reader (z / (Z - 1)); the noise of the whole stack is drawn once per ensemble member so the result does not depend
on ``batch_size``. ``vae_only=True`` skips diffusion: the plain VAE reconstruction, the usual baseline.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from brainfm.anomaly.windows import WindowedUNet
from brainfm.config import ReconstructionConfig
from brainfm.diffusion import denoise, inference_timesteps, make_scheduler, noising_schedule
from brainfm.models.conditioning import Conditioner
from brainfm.models.unet import LatentUNet
from brainfm.models.vae import BrainVAE

Sampler = Literal["ddim", "dpm++"]


def _as_levels(t_star: float | Sequence[float]) -> tuple[float, ...]:
    return (float(t_star),) if isinstance(t_star, int | float) else tuple(float(t) for t in t_star)


class PseudoHealthyReconstructor:
    """Encode → noise to t* → denoise under the scan's anatomy and metadata → decode, ensembled."""

    def __init__(
        self,
        vae: BrainVAE,
        unet: LatentUNet | None,
        conditioner: Conditioner | None,
        noise_scheduler: SchedulerMixin | None,
        *,
        spatial_dims: int | None = None,
        t_star: float | Sequence[float] = 0.5,
        num_inference_steps: int = 20,
        sampler: Sampler = "ddim",
        guidance_scale: float = 1.0,
        seeds: Sequence[int] = (0,),
        batch_size: int = 16,
        tiled_vae: bool = False,
        latent_window: Sequence[int] | None = None,
        window_overlap: float = 0.5,
        vae_only: bool = False,
    ) -> None:
        self.config = ReconstructionConfig(
            t_star=_as_levels(t_star), num_inference_steps=int(num_inference_steps), sampler=sampler,
            guidance_scale=float(guidance_scale), seeds=tuple(int(s) for s in seeds), batch_size=int(batch_size),
            tiled_vae=bool(tiled_vae), window_overlap=float(window_overlap),
            latent_window=None if latent_window is None else tuple(int(w) for w in latent_window),
        )
        self.vae = vae.eval()
        self.spatial_dims = int(spatial_dims or vae.config.spatial_dims)
        if self.spatial_dims != vae.config.spatial_dims:
            raise ValueError(f"spatial_dims={self.spatial_dims} but the VAE is {vae.config.spatial_dims}D")
        self.vae_only = bool(vae_only)
        self.unet = None if unet is None else unet.eval()
        self.conditioner = None if conditioner is None else conditioner.eval()
        self.sampler: SchedulerMixin | None = None
        self.forward_process: SchedulerMixin | None = None
        if not self.vae_only:
            if unet is None or conditioner is None or noise_scheduler is None:
                raise ValueError("diffusion reconstruction needs unet, conditioner and noise_scheduler (or vae_only=True)")
            if unet.config.spatial_dims != self.spatial_dims:
                raise ValueError(f"UNet is {unet.config.spatial_dims}D but the VAE is {self.spatial_dims}D")
            self.sampler = self._make_sampler(noise_scheduler, sampler, unet)
            self.forward_process = noising_schedule(noise_scheduler)
        self.denoiser: LatentUNet | WindowedUNet | None = self.unet
        if self.unet is not None and self.config.latent_window is not None:
            self.denoiser = WindowedUNet(self.unet, self.config.latent_window, self.config.window_overlap)

    @classmethod
    def from_config(
        cls, vae: BrainVAE, unet: LatentUNet | None, conditioner: Conditioner | None,
        noise_scheduler: SchedulerMixin | None, config: ReconstructionConfig, vae_only: bool = False,
    ) -> PseudoHealthyReconstructor:
        return cls(vae, unet, conditioner, noise_scheduler, **dataclasses.asdict(config), vae_only=vae_only)

    @staticmethod
    def _make_sampler(trained: SchedulerMixin, kind: Sampler, unet: LatentUNet) -> SchedulerMixin:
        """A few-step sampler on the SAME noise schedule the UNet was trained with (betas, T, parameterisation)."""
        config = trained.config
        return make_scheduler(
            kind,
            num_train_timesteps=int(config.num_train_timesteps),
            beta_schedule=config.beta_schedule,
            prediction_type=unet.config.prediction_type,
            beta_start=float(config.beta_start),
            beta_end=float(config.beta_end),
        )

    # ------------------------------------------------------------------------------------------ bookkeeping
    @property
    def num_train_timesteps(self) -> int:
        return int(self.sampler.config.num_train_timesteps) if self.sampler is not None else 0

    def start_timestep(self, level: float) -> int | None:
        """The first sampler-grid timestep at or below t* = level * T (None: no step to run at this level)."""
        if self.sampler is None:
            return None
        t_max = min(self.num_train_timesteps - 1, max(0, int(math.ceil(level * self.num_train_timesteps)) - 1))
        grid = inference_timesteps(self.sampler, self.config.num_inference_steps, t_max)
        return int(grid[0]) if len(grid) else None

    def unet_calls(self, level: float) -> int:
        if self.sampler is None:
            return 0
        start = self.start_timestep(level)
        if start is None:
            return 0
        return len(inference_timesteps(self.sampler, self.config.num_inference_steps, start))

    def settings(self) -> dict[str, Any]:
        """What a report or output JSON needs to reproduce this reconstruction."""
        if self.vae_only:
            return {"method": "vae", "spatial_dims": self.spatial_dims}
        return {
            "method": "ldm",
            "spatial_dims": self.spatial_dims,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.config).items()},
            "num_train_timesteps": self.num_train_timesteps,
            "start_timesteps": [self.start_timestep(t) for t in self.config.t_star],
            "unet_calls_per_member": [self.unet_calls(t) for t in self.config.t_star],
            "ensemble_members": len(self.config.t_star) * len(self.config.seeds),
        }

    # ------------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def reconstruct(self, image: Tensor, anatomy: Tensor | None, meta: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """(mean reconstruction, ensemble std), both shaped like ``image`` (C, X, Y, Z), values clamped to [0, 1];
        C is the VAE's input channels (1, or a multi-channel model's contrasts).

        ``anatomy`` is the UNet's spatial conditioning at image resolution, (C, X, Y, Z) = brain mask + tissue
        priors; ``meta`` is the scan's metadata in the shard reader's format (modality, age, sex, site, ...).
        """
        image = torch.as_tensor(image, dtype=torch.float32)
        channels = int(self.vae.config.in_channels)
        if image.ndim != 4 or image.shape[0] != channels:
            raise ValueError(f"image must be ({channels}, X, Y, Z), got {tuple(image.shape)}")
        if anatomy is not None:
            anatomy = torch.as_tensor(anatomy, dtype=torch.float32)
            if anatomy.ndim != 4 or tuple(anatomy.shape[1:]) != tuple(image.shape[1:]):
                raise ValueError(f"anatomy must be (C, X, Y, Z) on the image grid, got {tuple(anatomy.shape)}")
        if not self.vae_only and self.unet.config.anatomy_channels and anatomy is None:
            raise ValueError("this UNet is anatomy-conditioned: pass the scan's anatomy maps")
        factor = self.vae.downsample_factor
        spatial = image.shape[1:] if self.spatial_dims == 3 else image.shape[1:3]
        if any(int(s) % factor for s in spatial):
            raise ValueError(f"image grid {tuple(spatial)} is not divisible by the VAE downsampling {factor}")
        if self.spatial_dims == 2:
            members, slices = self._reconstruct_2d(image, anatomy, meta)
            out = torch.zeros((len(members), *image.shape), dtype=torch.float32)
            for m, stack in enumerate(members):
                out[m][..., slices] = stack.permute(1, 2, 3, 0)
            empty = sorted(set(range(image.shape[-1])) - set(slices))
            out[..., empty] = image[..., empty]  # slices without brain or anatomy: nothing to reconstruct
        else:
            members = self._reconstruct_3d(image, anatomy, meta)
            out = torch.stack([m[0] for m in members])
        out = out.clamp(0.0, 1.0)
        return out.mean(dim=0), out.std(dim=0, unbiased=False)

    def _members(self) -> list[tuple[float, int]]:
        if self.vae_only:
            return [(0.0, 0)]
        return [(level, seed) for level in self.config.t_star for seed in self.config.seeds]

    def _batches(self, n: int) -> list[slice]:
        step = self.config.batch_size
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def _encode(self, x: Tensor) -> Tensor:
        device, tiled = self.vae.device, self.config.tiled_vae
        return torch.cat([self.vae.encode_latent(x[b].to(device), tiled=tiled).float().cpu()
                          for b in self._batches(len(x))])

    def _decode(self, z: Tensor) -> Tensor:
        device, tiled = self.vae.device, self.config.tiled_vae
        return torch.cat([self.vae.decode_latent(z[b].to(device), tiled=tiled).float().cpu()
                          for b in self._batches(len(z))])

    def _denoise(self, z0: Tensor, anatomy: Tensor | None, tokens: Mapping[str, Tensor], level: float,
                 seed: int) -> Tensor:
        """One ensemble member in latent space: noise the whole stack once (batch-size invariant), then denoise
        batch by batch; DDIM (eta = 0) and DPM-Solver++ steps are deterministic given the noised latent."""
        start = self.start_timestep(level)
        if start is None:
            return z0
        generator = torch.Generator().manual_seed(int(seed))
        noise = randn_tensor(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
        z_t = self.forward_process.add_noise(z0, noise, torch.full((len(z0),), start, device=z0.device))
        device = self.unet.device
        out = []
        for b in self._batches(len(z_t)):
            out.append(
                denoise(
                    self.denoiser, self.conditioner, z_t[b].to(device), start,
                    None if anatomy is None else anatomy[b].to(device),
                    {k: v[b].to(device) for k, v in tokens.items()},
                    self.sampler, self.config.num_inference_steps, self.config.guidance_scale,
                ).float().cpu()
            )
        return torch.cat(out)

    def _reconstruct_2d(self, image: Tensor, anatomy: Tensor | None, meta: Mapping[str, Any]
                        ) -> tuple[list[Tensor], list[int]]:
        depth = image.shape[-1]
        occupied = image.abs().sum(0).flatten(0, 1).sum(0) > 0
        if anatomy is not None:
            occupied |= anatomy.flatten(1, 2).abs().sum(dim=(0, 1)) > 0
        slices = [int(z) for z in torch.nonzero(occupied).flatten()]
        if not slices:
            return [torch.zeros((0, image.shape[0], *image.shape[1:3]))] * len(self._members()), []
        x = image[..., slices].permute(3, 0, 1, 2).contiguous()  # (n, C, X, Y)
        a = None if anatomy is None else anatomy[..., slices].permute(3, 0, 1, 2).contiguous()
        z0 = self._encode(x)
        if self.vae_only:
            return [self._decode(z0)], slices
        positions = torch.tensor([z / max(1, depth - 1) for z in slices], dtype=torch.float32)
        tokens = self.conditioner.tokenize([dict(meta)] * len(slices), slice_position=positions)
        return [self._decode(self._denoise(z0, a, tokens, level, seed)) for level, seed in self._members()], slices

    def _reconstruct_3d(self, image: Tensor, anatomy: Tensor | None, meta: Mapping[str, Any]) -> list[Tensor]:
        x = image[None]  # (1, C, X, Y, Z)
        a = None if anatomy is None else anatomy[None]
        z0 = self._encode(x)
        if self.vae_only:
            return [self._decode(z0)]
        tokens = self.conditioner.tokenize([dict(meta)])
        return [self._decode(self._denoise(z0, a, tokens, level, seed)) for level, seed in self._members()]
