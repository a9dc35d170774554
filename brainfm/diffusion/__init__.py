"""Noise schedules, the latent-diffusion training objective and samplers."""

from brainfm.diffusion.objective import check_prediction_type, diffusion_loss, velocity
from brainfm.diffusion.sampling import denoise, guided_prediction, inference_timesteps, noise_to, sample
from brainfm.diffusion.schedulers import alpha_terms, make_scheduler, q_sample

__all__ = [
    "alpha_terms",
    "check_prediction_type",
    "denoise",
    "diffusion_loss",
    "guided_prediction",
    "inference_timesteps",
    "make_scheduler",
    "noise_to",
    "q_sample",
    "sample",
    "velocity",
]
