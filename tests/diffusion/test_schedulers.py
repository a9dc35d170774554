from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from brainfm.diffusion import alpha_terms, make_scheduler, noise_to, q_sample


@pytest.mark.parametrize(
    ("kind", "cls"),
    [("ddpm", DDPMScheduler), ("ddim", DDIMScheduler), ("dpm++", DPMSolverMultistepScheduler)],
)
def test_make_scheduler(kind, cls):
    scheduler = make_scheduler(kind, num_train_timesteps=200, prediction_type="v_prediction")
    assert isinstance(scheduler, cls)
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.num_train_timesteps == 200
    assert scheduler.config.beta_schedule == "scaled_linear"
    if kind != "dpm++":
        assert scheduler.config.clip_sample is False  # latents are not confined to [-1, 1]
    else:
        assert scheduler.config.algorithm_type == "dpmsolver++"
    # alpha_bar decreases from ~1 to near 0
    assert 0.99 < float(scheduler.alphas_cumprod[0]) <= 1.0 and float(scheduler.alphas_cumprod[-1]) < 0.2
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("euler")  # type: ignore[arg-type]


def test_q_sample_matches_diffusers_add_noise_and_noise_to():
    scheduler = make_scheduler("ddpm")
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 400, 999])
    assert torch.allclose(
        q_sample(scheduler, latents, noise, t), scheduler.add_noise(latents, noise, t), atol=1e-6
    )
    noised = noise_to(latents, 400, scheduler, torch.Generator().manual_seed(1))
    sqrt_a, sqrt_1ma = alpha_terms(scheduler, torch.tensor([400] * 3), latents)
    assert torch.allclose(noised, sqrt_a * latents + sqrt_1ma * noise, atol=1e-6)
    with pytest.raises(ValueError, match="timesteps"):
        noise_to(latents, 1000, scheduler)
