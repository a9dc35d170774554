from __future__ import annotations

import warnings

import pytest
import torch
from monai.networks.nets.resnet import ResNetFeatures
from safetensors.torch import save_file

from brainfm.io import BrainFMInputError
from brainfm.models import VAELoss, kl_divergence


def test_kl_known_values():
    mu, sigma = torch.zeros(2, 4, 3, 3), torch.ones(2, 4, 3, 3)
    assert float(kl_divergence(mu, sigma)) == 0.0
    assert float(kl_divergence(mu + 1.0, sigma)) == pytest.approx(0.5 * 36)  # 0.5 * mu^2 summed per sample


def test_generator_parts_finite_adversarial_only_with_logits(brain_2d):
    x = brain_2d["image"]
    recon = (x + 0.1).clamp(0, 1)
    mu, sigma = torch.randn(2, 4, 16, 16), torch.rand(2, 4, 16, 16) + 0.5
    loss = VAELoss(kl_weight=1e-3, adv_weight=0.5)
    total, parts = loss.generator_loss(x, recon, mu, sigma, None)
    assert set(parts) == {"recon", "kl", "total"}
    assert float(parts["recon"]) == pytest.approx(float((recon - x).abs().mean()))
    assert float(total) == pytest.approx(float(parts["recon"] + 1e-3 * parts["kl"]), rel=1e-6)
    fake_logits = torch.zeros(2, 1, 4, 4)
    total_adv, parts_adv = loss.generator_loss(x, recon, mu, sigma, fake_logits)
    assert float(parts_adv["adversarial"]) == pytest.approx(1.0)  # least squares: (0 - 1)^2
    assert float(total_adv) == pytest.approx(float(total) + 0.5, rel=1e-6)
    assert all(torch.isfinite(v) for v in parts_adv.values())


def test_discriminator_least_squares():
    loss = VAELoss()
    ones, zeros = torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    assert float(loss.discriminator_loss(real_logits=ones, fake_logits=zeros)) == 0.0
    assert float(loss.discriminator_loss(real_logits=zeros, fake_logits=ones)) == pytest.approx(1.0)


def test_perceptual_absent_without_weights_warns_once(tmp_path, brain_2d):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = VAELoss(perceptual_weight=1.0, perceptual_weights_path=tmp_path / "missing.safetensors")
    assert len([w for w in caught if "perceptual" in str(w.message)]) == 1
    x = brain_2d["image"]
    _, parts = loss.generator_loss(x, x * 0.9, torch.zeros(2, 4, 16, 16), torch.ones(2, 4, 16, 16))
    assert "perceptual" not in parts and loss.perceptual_weight == 0.0


def test_perceptual_from_local_weights(tmp_path, brain_2d):
    weights = tmp_path / "resnet10_2d.safetensors"
    save_file(ResNetFeatures("resnet10", pretrained=False, spatial_dims=2).state_dict(), str(weights))
    loss = VAELoss(perceptual_weight=0.5, perceptual_weights_path=weights, spatial_dims=2)
    x = brain_2d["image"]
    mu, sigma = torch.zeros(2, 4, 16, 16), torch.ones(2, 4, 16, 16)
    _, same = loss.generator_loss(x, x.clone(), mu, sigma)
    recon = torch.roll(x, shifts=3, dims=-1).requires_grad_(True)
    total, shifted = loss.generator_loss(x, recon, mu, sigma)
    assert float(same["perceptual"]) == pytest.approx(0.0, abs=1e-6)
    assert float(shifted["perceptual"]) > 1e-3
    total.backward()
    assert torch.isfinite(recon.grad).all() and float(recon.grad.abs().sum()) > 0

    wrong = tmp_path / "resnet10_3d.safetensors"
    save_file(ResNetFeatures("resnet10", pretrained=False, spatial_dims=3).state_dict(), str(wrong))
    with pytest.raises(BrainFMInputError, match="resnet10_3d.safetensors"):
        VAELoss(perceptual_weight=0.5, perceptual_weights_path=wrong, spatial_dims=2)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(BrainFMInputError, match="corrupt.safetensors"):
        VAELoss(perceptual_weight=0.5, perceptual_weights_path=corrupt)
