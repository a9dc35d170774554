"""Noise schedules, the latent-diffusion training objective and samplers."""
