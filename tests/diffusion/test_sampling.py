from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from brainfm.diffusion import (
    alpha_terms,
    denoise,
    guided_prediction,
    inference_timesteps,
    make_scheduler,
    noise_to,
    sample,
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
        sqrt_a, sqrt_1ma = alpha_terms(self.scheduler, t, z_t)
        return sqrt_a * self.noise - sqrt_1ma * self.clean


@pytest.mark.parametrize("kind", ["ddim", "dpm++"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoise_with_oracle_recovers_clean_latent(brain_2d, meta_records, kind, prediction_type):
    scheduler = make_scheduler(kind, prediction_type=prediction_type)
    clean = torch.nn.functional.avg_pool2d(brain_2d["anatomy"][:, :2], 2).repeat(1, 2, 1, 1) * 2 - 1
    t_start = int(inference_timesteps(scheduler, 20, 400)[0])  # 399: on the grid
    assert t_start == 399
    z_t = noise_to(clean, t_start, scheduler, torch.Generator().manual_seed(5))
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(5))
    encoder = Conditioner(hidden_size=16, num_heads=2, cross_attention_dim=16)
    oracle = OracleUNet(clean, noise, scheduler, prediction_type)
    out = denoise(
        oracle, encoder, z_t, t_start, brain_2d["anatomy"], encoder.tokenize(meta_records), scheduler, 20
    )
    assert (z_t - clean).abs().max() > 0.1
    assert torch.allclose(out, clean, atol=1e-4)


@pytest.mark.parametrize("kind", ["ddim", "dpm++"])
def test_denoise_t_start_zero_is_identity_and_larger_changes(brain_batch, meta_records, kind):
    spatial_dims, batch = brain_batch
    unet, encoder = tiny_models(spatial_dims)
    scheduler = make_scheduler(kind)
    tokens = encoder.tokenize(meta_records)
    latent_shape = [s // 2 for s in batch["image"].shape[2:]]
    z0 = torch.randn(2, 4, *latent_shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(denoise(unet, encoder, z0, 0, batch["anatomy"], tokens, scheduler, 10), z0)
    steps = inference_timesteps(scheduler, 10, 300)
    assert steps.tolist() == [299, 199, 99]
    z_t = noise_to(z0, 299, scheduler, torch.Generator().manual_seed(1))
    out = denoise(unet, encoder, z_t, 300, batch["anatomy"], tokens, scheduler, 10)
    assert out.shape == z0.shape and torch.isfinite(out).all()
    assert (out - z_t).abs().max() > 1e-2
    again = denoise(unet, encoder, z_t, 300, batch["anatomy"], tokens, scheduler, 10)
    assert torch.equal(out, again)  # deterministic samplers


def test_guidance(brain_2d, meta_records):
    unet, encoder = tiny_models()
    tokens = encoder.tokenize(meta_records)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    anatomy, t = brain_2d["anatomy"], torch.tensor(500)
    with torch.no_grad():
        context, null = encoder(tokens), encoder.null_context(2)
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
    z_t = noise_to(z, 499, scheduler, torch.Generator().manual_seed(1))
    plain = denoise(unet, encoder, z_t, 500, anatomy, tokens, scheduler, 4)
    with_guidance = denoise(unet, encoder, z_t, 500, anatomy, tokens, scheduler, 4, guidance_scale=2.0)
    assert (plain - with_guidance).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["ddim", "dpm++"])
def test_sample_runs_and_is_seeded(brain_2d, meta_records, kind):
    unet, encoder = tiny_models()
    scheduler = make_scheduler(kind)
    tokens = encoder.tokenize(meta_records)
    args = (unet, encoder, (2, 4, 16, 16), brain_2d["anatomy"], tokens, scheduler, 3)
    first = sample(*args, guidance_scale=1.5, generator=torch.Generator().manual_seed(2))
    second = sample(*args, guidance_scale=1.5, generator=torch.Generator().manual_seed(2))
    other = sample(*args, guidance_scale=1.5, generator=torch.Generator().manual_seed(3))
    assert first.shape == (2, 4, 16, 16) and torch.isfinite(first).all()
    assert torch.equal(first, second) and not torch.equal(first, other)
