"""Noise schedules from diffusers (shape-agnostic, so the same objects serve 2D and 3D latents)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

SchedulerKind = Literal["ddpm", "ddim", "dpm++"]
# The brain LDM schedule (Pinaya et al. 2022, MONAI tutorials): scaled-linear betas from 0.0015 to 0.0195.
DEFAULT_BETA_START = 0.0015
DEFAULT_BETA_END = 0.0195


def make_scheduler(
    kind: SchedulerKind,
    num_train_timesteps: int = 1000,
    beta_schedule: str = "scaled_linear",
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
    **kw: Any,
) -> SchedulerMixin:
    """Build a DDPM (training / ancestral sampling), DDIM or DPM-Solver++ (few-step) scheduler.

    Defaults differ from diffusers' where latents need it: no sample clipping (latents are not in [-1, 1]) and
    "trailing" timestep spacing for the few-step samplers, so their first step starts at the noisiest timestep and
    the last one ends at a clean latent (Lin et al. 2023). Any diffusers argument can be overridden through ``kw``.
    """
    common: dict[str, Any] = {
        "num_train_timesteps": num_train_timesteps,
        "beta_schedule": beta_schedule,
        "beta_start": DEFAULT_BETA_START,
        "beta_end": DEFAULT_BETA_END,
        "prediction_type": prediction_type,
    }
    if kind == "ddpm":
        return DDPMScheduler(**{**common, "clip_sample": False, **kw})
    if kind == "ddim":
        return DDIMScheduler(**{**common, "clip_sample": False, "timestep_spacing": "trailing", **kw})
    if kind == "dpm++":
        return DPMSolverMultistepScheduler(
            **{
                **common,
                "algorithm_type": "dpmsolver++",
                "solver_order": 2,
                "timestep_spacing": "trailing",
                **kw,
            }
        )
    raise ValueError(f"unknown scheduler kind {kind!r}; expected 'ddpm', 'ddim' or 'dpm++'")


def alpha_terms(scheduler: SchedulerMixin, timesteps: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), shaped to broadcast against ``like`` (B, C, *spatial)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=like.device, dtype=torch.float32)
    timesteps = timesteps.to(device=like.device, dtype=torch.long).reshape(-1)
    num_train = alphas_cumprod.shape[0]
    if bool((timesteps < 0).any()) or bool((timesteps >= num_train).any()):
        raise ValueError(f"timesteps must lie in [0, {num_train - 1}], got {timesteps.tolist()}")
    alpha_bar = alphas_cumprod[timesteps].reshape(-1, *([1] * (like.ndim - 1)))
    return alpha_bar.sqrt().to(like.dtype), (1.0 - alpha_bar).sqrt().to(like.dtype)


def q_sample(scheduler: SchedulerMixin, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) noise — DDPM/DDIM ``add_noise`` for any scheduler
    (DPM-Solver's ``add_noise`` needs ``set_timesteps`` first and indexes its inference sigmas)."""
    sqrt_alpha, sqrt_one_minus = alpha_terms(scheduler, timesteps, latents)
    return sqrt_alpha * latents + sqrt_one_minus * noise
