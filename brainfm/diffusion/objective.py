"""The latent-diffusion training objective with conditioning dropout."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from brainfm.diffusion.schedulers import alpha_terms, q_sample
from brainfm.models.conditioning import ConditionEncoder
from brainfm.models.unet import LatentUNet


def check_prediction_type(unet: LatentUNet, scheduler: SchedulerMixin) -> str:
    """The UNet's and the scheduler's parameterisations must agree, or training targets and sampling disagree."""
    unet_type = unet.config.prediction_type
    scheduler_type = scheduler.config.prediction_type
    if unet_type != scheduler_type:
        raise ValueError(f"UNet predicts {unet_type!r} but the scheduler expects {scheduler_type!r}")
    return unet_type


def velocity(scheduler: SchedulerMixin, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * z_0 (Salimans & Ho 2022)."""
    if hasattr(scheduler, "get_velocity"):
        return scheduler.get_velocity(latents, noise, timesteps.to(latents.device))
    sqrt_alpha, sqrt_one_minus = alpha_terms(scheduler, timesteps, latents)
    return sqrt_alpha * noise - sqrt_one_minus * latents


def diffusion_loss(
    unet: LatentUNet,
    encoder: ConditionEncoder,
    latents: Tensor,
    anatomy: Tensor | None,
    meta_tokens: Mapping[str, Tensor],
    scheduler: SchedulerMixin,
    *,
    cond_drop_prob: float = 0.1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """MSE between the UNet's prediction and the noise (epsilon) or velocity target at a random timestep.

    One Bernoulli(cond_drop_prob) mask per sample drops BOTH the metadata context and the anatomy, so the same
    network also learns the fully unconditional score used by classifier-free guidance.
    """
    if not 0.0 <= cond_drop_prob <= 1.0:
        raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
    prediction_type = check_prediction_type(unet, scheduler)
    batch = latents.shape[0]
    rng_device = generator.device if generator is not None else latents.device
    num_train = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_train, (batch,), generator=generator, device=rng_device).to(
        latents.device
    )
    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    drop_mask = (torch.rand(batch, generator=generator, device=rng_device) < cond_drop_prob).to(
        latents.device
    )
    z_t = q_sample(scheduler, latents, noise, timesteps)
    context = encoder(meta_tokens, drop_mask=drop_mask)
    prediction = unet(z_t, timesteps, anatomy, context, anatomy_drop_mask=drop_mask)
    target = noise if prediction_type == "epsilon" else velocity(scheduler, latents, noise, timesteps)
    return F.mse_loss(prediction.float(), target.float())
