from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from brainfm.diffusion import (
    denoise,
    guided_prediction,
    inference_timesteps,
    make_scheduler,
    noising_schedule,
)
from brainfm.models import Conditioner, LatentUNet


def tiny_models(spatial_dims: int = 2) -> tuple[LatentUNet, Conditioner]:
    unet = LatentUNet(
        spatial_dims=spatial_dims,
        channels=(16, 32),
        attention_levels=(False, True),
        num_head_channels=16,
        cross_attention_dim=16,
        norm_num_groups=8,
    ).eval()
    with torch.no_grad():
        for param in unet.parameters():  # MONAI zero-initialises output and attention projections
            if param.ndim > 1 and not param.any():
                param.normal_(std=0.05)
    return unet, Conditioner(hidden_size=16, num_heads=2, cross_attention_dim=16).eval()


def noised(latents: torch.Tensor, t: int, scheduler, seed: int) -> torch.Tensor:
    """q(z_t | z_0) with seeded noise, as the reconstructor draws it."""
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    return noising_schedule(scheduler).add_noise(latents, noise, torch.full((latents.shape[0],), t))


class OracleUNet(nn.Module):
    """Predicts the TRUE noise (or velocity) of a latent noised from ``clean`` with ``noise``: any correct sampler
    must then return ``clean`` exactly, which pins down the t_start / begin-index bookkeeping."""

    def __init__(self, clean: torch.Tensor, noise: torch.Tensor, scheduler, prediction_type: str) -> None:
        super().__init__()
        self.clean, self.noise, self.scheduler = clean, noise, scheduler
        self.config = SimpleNamespace(prediction_type=prediction_type)

    def forward(self, z_t, timesteps, anatomy, context, anatomy_drop_mask=None):
        if self.config.prediction_type == "epsilon":
            return self.noise
        t = torch.as_tensor(timesteps).reshape(-1).expand(z_t.shape[0])
        return noising_schedule(self.scheduler).get_velocity(self.clean, self.noise, t)


@pytest.mark.parametrize("kind", ["ddim", "dpm++"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoise_with_oracle_recovers_clean_latent(brain_2d, meta_records, kind, prediction_type):
    scheduler = make_scheduler(kind, prediction_type=prediction_type)
    clean = torch.nn.functional.avg_pool2d(brain_2d["anatomy"][:, :2], 2).repeat(1, 2, 1, 1) * 2 - 1
    t_start = int(inference_timesteps(scheduler, 20, 400)[0])  # 399: on the grid
    assert t_start == 399
    z_t = noised(clean, t_start, scheduler, 5)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(5))
    conditioner = Conditioner(hidden_size=16, num_heads=2, cross_attention_dim=16)
    oracle = OracleUNet(clean, noise, scheduler, prediction_type)
    out = denoise(
        oracle, conditioner, z_t, t_start, brain_2d["anatomy"], conditioner.tokenize(meta_records), scheduler, 20
    )
    assert (z_t - clean).abs().max() > 0.1
    assert torch.allclose(out, clean, atol=1e-4)


@pytest.mark.parametrize("kind", ["ddim", "dpm++"])
def test_denoise_t_start_zero_is_identity_and_larger_changes(brain_batch, meta_records, kind):
    spatial_dims, batch = brain_batch
    unet, conditioner = tiny_models(spatial_dims)
    scheduler = make_scheduler(kind)
    tokens = conditioner.tokenize(meta_records)
    latent_shape = [s // 2 for s in batch["image"].shape[2:]]
    z0 = torch.randn(2, 4, *latent_shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(denoise(unet, conditioner, z0, 0, batch["anatomy"], tokens, scheduler, 10), z0)
    steps = inference_timesteps(scheduler, 10, 300)
    assert steps.tolist() == [299, 199, 99]
    z_t = noised(z0, 299, scheduler, 1)
    out = denoise(unet, conditioner, z_t, 300, batch["anatomy"], tokens, scheduler, 10)
    assert out.shape == z0.shape and torch.isfinite(out).all()
    assert (out - z_t).abs().max() > 1e-2
    again = denoise(unet, conditioner, z_t, 300, batch["anatomy"], tokens, scheduler, 10)
    assert torch.equal(out, again)  # deterministic samplers


def test_guidance(brain_2d, meta_records):
    unet, conditioner = tiny_models()
    tokens = conditioner.tokenize(meta_records)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    anatomy, t = brain_2d["anatomy"], torch.tensor(500)
    with torch.no_grad():
        context, null = conditioner(tokens), conditioner.null_context(2)
        conditional = unet(z, t, anatomy, context)
        unconditional = unet(z, t, anatomy, null, anatomy_drop_mask=torch.ones(2, dtype=torch.bool))
        assert torch.equal(guided_prediction(unet, z, t, anatomy, context, null, 1.0), conditional)
        # the batched cond/uncond path reproduces the separate passes
        nearly_one = guided_prediction(unet, z, t, anatomy, context, null, 1.0 + 1e-6)
        assert torch.allclose(nearly_one, conditional, atol=1e-4)
        guided = guided_prediction(unet, z, t, anatomy, context, null, 3.0)
        assert torch.allclose(guided, unconditional + 3.0 * (conditional - unconditional), atol=1e-4)
        assert (guided - conditional).abs().max() > 1e-3
    scheduler = make_scheduler("ddim")
    z_t = noised(z, 499, scheduler, 1)
    plain = denoise(unet, conditioner, z_t, 500, anatomy, tokens, scheduler, 4)
    with_guidance = denoise(unet, conditioner, z_t, 500, anatomy, tokens, scheduler, 4, guidance_scale=2.0)
    assert (plain - with_guidance).abs().max() > 1e-3
