from __future__ import annotations

import pytest
import torch

from brainfm.diffusion import diffusion_loss, make_scheduler
from brainfm.models import Conditioner, LatentUNet


def tiny_models(prediction_type: str) -> tuple[LatentUNet, Conditioner]:
    unet = LatentUNet(
        channels=(16, 32),
        attention_levels=(False, True),
        num_head_channels=16,
        cross_attention_dim=16,
        norm_num_groups=8,
        prediction_type=prediction_type,
    )
    return unet, Conditioner(hidden_size=16, num_heads=2, cross_attention_dim=16)


def template_latents(brain_2d) -> torch.Tensor:
    """A fixed 'latent' batch (2, 4, 16, 16) made from real template slices and their anatomy."""
    maps = torch.cat([brain_2d["image"], brain_2d["anatomy"]], dim=1)
    return torch.nn.functional.avg_pool2d(maps, 2) * 2.0 - 1.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_decreases_when_overfitting(brain_2d, meta_records, prediction_type):
    unet, conditioner = tiny_models(prediction_type)
    scheduler = make_scheduler("ddpm", prediction_type=prediction_type)
    latents, anatomy = template_latents(brain_2d), brain_2d["anatomy"]
    tokens = conditioner.tokenize(meta_records)
    optimizer = torch.optim.Adam([*unet.parameters(), *conditioner.parameters()], lr=3e-3)
    losses = []
    for _ in range(30):
        # same timesteps, noise and dropout every step: a fixed tiny problem the model must fit
        loss = diffusion_loss(
            unet,
            conditioner,
            latents,
            anatomy,
            tokens,
            scheduler,
            cond_drop_prob=0.0,
            generator=torch.Generator().manual_seed(0),
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses


def test_conditioning_dropout_drops_metadata_and_anatomy(brain_2d, meta_records):
    unet, conditioner = tiny_models("epsilon")
    with torch.no_grad():
        for param in unet.parameters():  # MONAI's zero-initialised output/attention projections
            if param.ndim > 1 and not param.any():
                param.normal_(std=0.05)
    scheduler = make_scheduler("ddpm")
    latents, anatomy = template_latents(brain_2d), brain_2d["anatomy"]
    tokens = conditioner.tokenize(meta_records)
    other_tokens = conditioner.tokenize([{"modality": "CT", "age": 5.0}, {"modality": "PD", "sex": "F"}])

    def loss(tok, anat, p):
        with torch.no_grad():
            return float(
                diffusion_loss(
                    unet,
                    conditioner,
                    latents,
                    anat,
                    tok,
                    scheduler,
                    cond_drop_prob=p,
                    generator=torch.Generator().manual_seed(7),
                )
            )

    # every sample dropped: neither metadata nor anatomy can change the loss
    assert loss(tokens, anatomy, 1.0) == pytest.approx(loss(other_tokens, anatomy.flip(-1), 1.0), abs=1e-6)
    # nothing dropped: both matter
    assert abs(loss(tokens, anatomy, 0.0) - loss(other_tokens, anatomy, 0.0)) > 1e-6
    assert abs(loss(tokens, anatomy, 0.0) - loss(tokens, anatomy.flip(-1), 0.0)) > 1e-6


def test_prediction_type_mismatch_rejected(brain_2d, meta_records):
    unet, conditioner = tiny_models("epsilon")
    with pytest.raises(ValueError, match="v_prediction"):
        diffusion_loss(
            unet,
            conditioner,
            template_latents(brain_2d),
            brain_2d["anatomy"],
            conditioner.tokenize(meta_records),
            make_scheduler("ddpm", prediction_type="v_prediction"),
        )
