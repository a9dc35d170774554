from __future__ import annotations

import torch

from brainfm.models import Conditioner, LatentUNet, resize_to_grid


def tiny_unet(spatial_dims: int, prediction_type: str = "epsilon") -> LatentUNet:
    unet = LatentUNet(
        spatial_dims=spatial_dims,
        channels=(16, 32),
        attention_levels=(False, True),
        num_head_channels=16,
        cross_attention_dim=16,
        norm_num_groups=8,
        prediction_type=prediction_type,
    )
    # MONAI zero-initialises the output conv and attention projections (a trained net has neither at zero)
    with torch.no_grad():
        for param in unet.parameters():
            if param.ndim > 1 and not param.any():
                param.normal_(std=0.05)
    return unet


def inputs(spatial_dims: int, batch: dict[str, torch.Tensor], meta: list[dict]):
    conditioner = Conditioner(hidden_size=16, num_heads=2, cross_attention_dim=16)
    context = conditioner(conditioner.tokenize(meta))
    latent_shape = [s // 2 for s in batch["image"].shape[2:]]
    z_t = torch.randn(2, 4, *latent_shape, generator=torch.Generator().manual_seed(3))
    return z_t, torch.tensor([10, 700]), batch["anatomy"], context.detach()


def test_output_shape_and_anatomy_dependence(brain_batch, meta_records):
    spatial_dims, batch = brain_batch
    unet = tiny_unet(spatial_dims).eval()
    z_t, t, anatomy, context = inputs(spatial_dims, batch, meta_records)
    with torch.no_grad():
        out = unet(z_t, t, anatomy, context)
        assert out.shape == z_t.shape and torch.isfinite(out).all()
        other_anatomy = anatomy.flip(-1)
        changed = unet(z_t, t, other_anatomy, context)
        assert (changed - out).abs().max() > 1e-4
        drop = torch.tensor([True, False])
        dropped = unet(z_t, t, anatomy, context, anatomy_drop_mask=drop)
        dropped_other = unet(z_t, t, other_anatomy, context, anatomy_drop_mask=drop)
        zeros = unet(z_t, t, torch.zeros_like(anatomy), context)
        assert torch.allclose(dropped[0], dropped_other[0], atol=1e-6)  # dropped row ignores its anatomy
        assert torch.allclose(dropped[0], zeros[0], atol=1e-6)
        assert torch.allclose(dropped[1], out[1], atol=1e-6)  # kept row unchanged
        assert (unet(z_t, t, anatomy, context * 0) - out).abs().max() > 1e-5  # context is used too
        assert (
            unet(z_t, torch.tensor([500, 10]), anatomy, context) - out
        ).abs().max() > 1e-5  # and timesteps


def test_gradient_checkpointing_same_gradients(brain_2d, meta_records):
    unet = tiny_unet(2)
    z_t, t, anatomy, context = inputs(2, brain_2d, meta_records)

    def grads() -> list[torch.Tensor]:
        unet.zero_grad()
        unet(z_t, t, anatomy, context).square().mean().backward()
        return [p.grad.clone() for p in unet.parameters()]

    plain = grads()
    unet.enable_gradient_checkpointing()
    assert unet.is_gradient_checkpointing
    checkpointed = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed, strict=True))
    assert sum(float(g.abs().sum()) for g in checkpointed) > 0


def test_resize_to_grid_averages_masks(brain_batch):
    spatial_dims, batch = brain_batch
    mask = batch["anatomy"][:, :1]
    grid = [s // 4 for s in mask.shape[2:]]
    pooled = resize_to_grid(mask, grid)
    assert list(pooled.shape[2:]) == grid
    assert torch.allclose(pooled.mean(), mask.mean(), atol=1e-5)  # area averaging keeps the brain fraction
    assert resize_to_grid(pooled, grid) is pooled
    assert list(resize_to_grid(pooled, mask.shape[2:]).shape) == list(mask.shape)
