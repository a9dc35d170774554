"""Noise schedules, the latent-diffusion training objective and the few-step partial denoiser."""

from brainfm.diffusion.objective import check_prediction_type, diffusion_loss
from brainfm.diffusion.sampling import denoise, guided_prediction, inference_timesteps
from brainfm.diffusion.schedulers import make_scheduler, noising_schedule

__all__ = [
    "check_prediction_type",
    "denoise",
    "diffusion_loss",
    "guided_prediction",
    "inference_timesteps",
    "make_scheduler",
    "noising_schedule",
]
