"""The latent-diffusion training objective with conditioning dropout."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from brainfm.diffusion.schedulers import noising_schedule
from brainfm.models.conditioning import Conditioner
from brainfm.models.unet import LatentUNet


def check_prediction_type(unet: LatentUNet, noise_scheduler: SchedulerMixin) -> str:
    """The UNet's and the scheduler's parameterisations must agree, or training targets and sampling disagree."""
    unet_type = unet.config.prediction_type
    scheduler_type = noise_scheduler.config.prediction_type
    if unet_type != scheduler_type:
        raise ValueError(f"UNet predicts {unet_type!r} but the scheduler expects {scheduler_type!r}")
    return unet_type


def diffusion_loss(
    unet: LatentUNet,
    conditioner: Conditioner,
    latents: Tensor,
    anatomy: Tensor | None,
    meta_tokens: Mapping[str, Tensor],
    noise_scheduler: SchedulerMixin,
    *,
    cond_drop_prob: float = 0.1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """MSE between the UNet's prediction and the noise (epsilon) or velocity target at a random timestep.

    One Bernoulli(cond_drop_prob) mask per sample drops BOTH the metadata context and the anatomy, so the same
    network also learns the fully unconditional score used by classifier-free guidance. The forward process and
    the velocity target are the scheduler's own ``add_noise`` / ``get_velocity``.
    """
    if not 0.0 <= cond_drop_prob <= 1.0:
        raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
    prediction_type = check_prediction_type(unet, noise_scheduler)
    forward_process = noising_schedule(noise_scheduler)
    batch = latents.shape[0]
    rng_device = generator.device if generator is not None else latents.device
    num_train = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_train, (batch,), generator=generator, device=rng_device).to(
        latents.device
    )
    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    drop_mask = (torch.rand(batch, generator=generator, device=rng_device) < cond_drop_prob).to(
        latents.device
    )
    z_t = forward_process.add_noise(latents, noise, timesteps)
    context = conditioner(meta_tokens, drop_mask=drop_mask)
    prediction = unet(z_t, timesteps, anatomy, context, anatomy_drop_mask=drop_mask)
    target = noise if prediction_type == "epsilon" else forward_process.get_velocity(latents, noise, timesteps)
    return F.mse_loss(prediction.float(), target.float())
