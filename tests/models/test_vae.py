from __future__ import annotations

import torch

from brainfm.models import BrainVAE, make_discriminator


def tiny_vae(spatial_dims: int) -> BrainVAE:
    return BrainVAE(spatial_dims=spatial_dims, channels=(8, 16), latent_channels=4, norm_num_groups=8)


def test_shapes_and_posterior(brain_batch):
    spatial_dims, batch = brain_batch
    vae = tiny_vae(spatial_dims)
    x = batch["image"]
    recon, mu, sigma = vae(x)
    assert vae.downsample_factor == 2
    assert recon.shape == x.shape
    assert mu.shape == (2, 4, *[s // 2 for s in x.shape[2:]])
    assert sigma.shape == mu.shape and bool((sigma > 0).all())
    assert vae.encode_latent(x).shape == mu.shape
    assert vae.decode_latent(vae.encode_latent(x)).shape == x.shape


def test_save_load_round_trip_is_exact_and_safetensors_only(brain_batch, tmp_path):
    spatial_dims, batch = brain_batch
    vae = tiny_vae(spatial_dims).eval()
    with torch.no_grad():
        vae.set_scaling_factor(vae.encode(batch["image"])[0])
        vae.save_pretrained(tmp_path)
        loaded = BrainVAE.from_pretrained(tmp_path).eval()
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "config.json",
            "diffusion_pytorch_model.safetensors",
        ]
        assert loaded.config.scaling_factor == vae.config.scaling_factor != 1.0
        assert torch.equal(loaded.encode_latent(batch["image"]), vae.encode_latent(batch["image"]))
        z = vae.encode_latent(batch["image"])
        assert torch.equal(loaded.decode_latent(z), vae.decode_latent(z))


def test_scaling_factor_gives_unit_std_latents(brain_2d):
    vae = tiny_vae(2).eval()
    x = brain_2d["image"]
    with torch.no_grad():
        mu, _ = vae.encode(x)
        factor = vae.set_scaling_factor(mu)
        latents = vae.encode_latent(x)
        assert abs(float(latents.std()) - 1.0) < 1e-4
        assert abs(factor - 1.0 / float(mu.std())) < 1e-6
        assert torch.allclose(vae.decode_latent(latents), vae.decode(mu), atol=1e-5)
        sampled = vae.encode_latent(x, sample=True, generator=torch.Generator().manual_seed(1))
        again = vae.encode_latent(x, sample=True, generator=torch.Generator().manual_seed(1))
        assert torch.equal(sampled, again) and not torch.equal(sampled, latents)


def test_gradient_checkpointing_matches(brain_2d):
    vae = tiny_vae(2)
    x = brain_2d["image"]

    def grads() -> list[torch.Tensor]:
        vae.zero_grad()
        recon, mu, sigma = vae(x, generator=torch.Generator().manual_seed(0))
        (recon.square().mean() + mu.square().mean() + sigma.mean()).backward()
        return [p.grad.clone() for p in vae.parameters()]

    plain = grads()
    vae.enable_gradient_checkpointing()
    assert vae.is_gradient_checkpointing
    checkpointed = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed, strict=True))


def test_discriminator_patch_logits(brain_batch, tmp_path):
    spatial_dims, batch = brain_batch
    disc = make_discriminator(spatial_dims, channels=8, num_layers_d=2).eval()
    logits = disc(batch["image"])
    assert logits.shape[:2] == (2, 1) and logits.ndim == batch["image"].ndim
    disc.save_pretrained(tmp_path)
    loaded = type(disc).from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(batch["image"]), logits)
