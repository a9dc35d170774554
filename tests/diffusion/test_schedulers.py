from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from brainfm.diffusion import make_scheduler, noising_schedule


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


@pytest.mark.parametrize("kind", ["ddpm", "ddim", "dpm++"])
def test_noising_schedule_is_the_closed_form_forward_process(kind):
    """q(z_t | z_0) = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) noise at ANY training timestep, for every
    scheduler kind (DPM-Solver's own add_noise only knows its inference grid), bit for bit in float32."""
    scheduler = make_scheduler(kind)
    forward = noising_schedule(scheduler)
    assert (forward is scheduler) == (kind != "dpm++")
    assert torch.equal(forward.alphas_cumprod, make_scheduler("ddpm").alphas_cumprod)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 401, 999])
    alpha_bar = forward.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    assert torch.equal(forward.add_noise(latents, noise, t), alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise)
    velocity = forward.get_velocity(latents, noise, t)
    assert torch.equal(velocity, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents)
    assert float(alpha_bar[0]) > 0.99 and float(alpha_bar[2]) < 0.01
