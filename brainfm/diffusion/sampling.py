"""Few-step partial denoising: the pseudo-healthy reconstruction's reverse process.

Guidance follows classifier-free guidance: the unconditional branch drops both metadata (learned null context) and
anatomy (zeros), exactly as conditioning dropout did in ``diffusion_loss``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from brainfm.diffusion.objective import check_prediction_type
from brainfm.models.conditioning import Conditioner
from brainfm.models.unet import LatentUNet


def inference_timesteps(sampler: SchedulerMixin, num_inference_steps: int, t_start: int) -> Tensor:
    """The timesteps ``denoise`` will visit: the sampler's grid for ``num_inference_steps`` (over the FULL range,
    as in diffusers img2img), keeping those <= ``t_start``. Noise to ``grid[0]`` to start exactly on the grid;
    ``set_timesteps`` is called here."""
    sampler.set_timesteps(num_inference_steps)
    return sampler.timesteps[sampler.timesteps <= int(t_start)]


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


@torch.no_grad()
def denoise(
    unet: LatentUNet,
    conditioner: Conditioner,
    z_t: Tensor,
    t_start: int,
    anatomy: Tensor | None,
    meta_tokens: Mapping[str, Tensor],
    sampler: SchedulerMixin,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Denoise ``z_t`` (noised to ``t_start``) to a clean latent with a DDIM or DPM-Solver++ sampler.

    ``num_inference_steps`` sets the grid over the whole [0, T) range; only grid timesteps <= ``t_start`` are run
    (see ``inference_timesteps``), so a small ``t_start`` means few UNet calls. With no grid timestep <= t_start
    (e.g. t_start=0 on a "trailing" grid) ``z_t`` is returned unchanged.
    """
    timesteps = inference_timesteps(sampler, num_inference_steps, t_start).to(z_t.device)
    if len(timesteps) == 0:
        return z_t.clone()
    if hasattr(sampler, "set_begin_index"):
        # multistep solvers index their sigma table by position: start at the first kept timestep
        sampler.set_begin_index(len(sampler.timesteps) - len(timesteps))
    check_prediction_type(unet, sampler)
    context = conditioner(meta_tokens)
    null_context = conditioner.null_context(z_t.shape[0]).to(context.dtype)
    z = z_t
    for t in timesteps:
        model_input = sampler.scale_model_input(z, t)
        prediction = guided_prediction(unet, model_input, t, anatomy, context, null_context, guidance_scale)
        z = sampler.step(prediction, t, z, generator=generator).prev_sample
    return z
