"""Noise schedules from diffusers (shape-agnostic, so the same objects serve 2D and 3D latents)."""

from __future__ import annotations

from typing import Any, Literal

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

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


def noising_schedule(scheduler: SchedulerMixin) -> SchedulerMixin:
    """The forward process q(z_t | z_0) of ``scheduler``'s noise schedule as a scheduler whose ``add_noise`` and
    ``get_velocity`` accept any training timestep: DDPM and DDIM schedulers themselves; for others (DPM-Solver's
    ``add_noise`` indexes its inference sigmas) a DDPM scheduler built from the same config (same betas, T)."""
    if isinstance(scheduler, DDPMScheduler | DDIMScheduler):
        return scheduler
    return DDPMScheduler.from_config(scheduler.config)
