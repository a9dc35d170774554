"""Partial noising, few-step partial denoising (the pseudo-healthy reconstruction) and full sampling.

Guidance follows classifier-free guidance: the unconditional branch drops both metadata (learned null context) and
anatomy (zeros), exactly as conditioning dropout did in ``diffusion_loss``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from brainfm.diffusion.objective import check_prediction_type
from brainfm.diffusion.schedulers import q_sample
from brainfm.models.conditioning import ConditionEncoder
from brainfm.models.unet import LatentUNet


def noise_to(
    latents: Tensor,
    t_start: int | Tensor,
    scheduler: SchedulerMixin,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample q(z_t | z_0) at timestep ``t_start`` (an int, or one per sample)."""
    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.as_tensor(t_start, device=latents.device).reshape(-1)
    if timesteps.numel() == 1:
        timesteps = timesteps.expand(latents.shape[0])
    return q_sample(scheduler, latents, noise, timesteps)


def inference_timesteps(scheduler: SchedulerMixin, num_inference_steps: int, t_start: int) -> Tensor:
    """The timesteps ``denoise`` will visit: the scheduler's grid for ``num_inference_steps`` (over the FULL range,
    as in diffusers img2img), keeping those <= ``t_start``. Noise with ``noise_to(..., t_start=grid[0])`` to start
    exactly on the grid; ``set_timesteps`` is called here."""
    scheduler.set_timesteps(num_inference_steps)
    return scheduler.timesteps[scheduler.timesteps <= int(t_start)]


def guided_prediction(
    unet: LatentUNet,
    z_t: Tensor,
    timestep: Tensor | int,
    anatomy: Tensor | None,
    context: Tensor,
    null_context: Tensor,
    guidance_scale: float = 1.0,
) -> Tensor:
    """UNet output; with ``guidance_scale != 1`` the CFG mix uncond + s * (cond - uncond), both in one batch."""
    if guidance_scale == 1.0:
        return unet(z_t, timestep, anatomy, context)
    batch = z_t.shape[0]
    doubled_anatomy = None if anatomy is None else torch.cat([anatomy, anatomy])
    drop = torch.cat([torch.zeros(batch, dtype=torch.bool), torch.ones(batch, dtype=torch.bool)]).to(
        z_t.device
    )
    output = unet(
        torch.cat([z_t, z_t]),
        timestep,
        doubled_anatomy,
        torch.cat([context, null_context]),
        anatomy_drop_mask=drop,
    )
    conditional, unconditional = output.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def _run_steps(
    unet: LatentUNet,
    encoder: ConditionEncoder,
    z: Tensor,
    timesteps: Sequence[Tensor] | Tensor,
    anatomy: Tensor | None,
    meta_tokens: Mapping[str, Tensor],
    scheduler: SchedulerMixin,
    guidance_scale: float,
    generator: torch.Generator | None,
) -> Tensor:
    check_prediction_type(unet, scheduler)
    context = encoder(meta_tokens)
    null_context = encoder.null_context(z.shape[0]).to(context.dtype)
    for t in timesteps:
        model_input = scheduler.scale_model_input(z, t)
        prediction = guided_prediction(unet, model_input, t, anatomy, context, null_context, guidance_scale)
        z = scheduler.step(prediction, t, z, generator=generator).prev_sample
    return z


@torch.no_grad()
def denoise(
    unet: LatentUNet,
    encoder: ConditionEncoder,
    z_t: Tensor,
    t_start: int,
    anatomy: Tensor | None,
    meta_tokens: Mapping[str, Tensor],
    scheduler: SchedulerMixin,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Denoise ``z_t`` (noised to ``t_start``) to a clean latent with a DDIM or DPM-Solver++ scheduler.

    ``num_inference_steps`` sets the grid over the whole [0, T) range; only grid timesteps <= ``t_start`` are run
    (see ``inference_timesteps``), so a small ``t_start`` means few UNet calls. With no grid timestep <= t_start
    (e.g. t_start=0 on a "trailing" grid) ``z_t`` is returned unchanged.
    """
    timesteps = inference_timesteps(scheduler, num_inference_steps, t_start).to(z_t.device)
    if len(timesteps) == 0:
        return z_t.clone()
    if hasattr(scheduler, "set_begin_index"):
        # multistep solvers index their sigma table by position: start at the first kept timestep
        scheduler.set_begin_index(len(scheduler.timesteps) - len(timesteps))
    return _run_steps(
        unet, encoder, z_t, timesteps, anatomy, meta_tokens, scheduler, guidance_scale, generator
    )


@torch.no_grad()
def sample(
    unet: LatentUNet,
    encoder: ConditionEncoder,
    shape: Sequence[int],
    anatomy: Tensor | None,
    meta_tokens: Mapping[str, Tensor],
    scheduler: SchedulerMixin,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Generate latents of ``shape`` (B, latent_channels, *latent_shape) from pure noise."""
    scheduler.set_timesteps(num_inference_steps)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    z = randn_tensor(tuple(shape), generator=generator, device=unet.device, dtype=unet.dtype)
    z = z * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps.to(unet.device)
    return _run_steps(unet, encoder, z, timesteps, anatomy, meta_tokens, scheduler, guidance_scale, generator)
