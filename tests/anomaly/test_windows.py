"""Patch-wise latent inference vs whole-volume inference, where both fit, with tiny random 3D networks on a volume
cut from the real ICBM152 template.

Tolerances (random networks are the worst case: nothing smooth was learned, every window's GroupNorm and attention
statistics differ from the whole volume's):
- one UNet call on 12^3 windows at 50 % overlap: mean |windowed - whole| below 15 % of the mean |prediction|;
- a whole reconstruction (tiled VAE + windows): mean |windowed - whole| over the brain below 25 % of the mean
  difference between two noise seeds of whole-volume inference (the method's own spread);
- seams: the jump of the error between neighbouring voxels ACROSS a window face is at most 1.15x the jump
  anywhere else; abutting windows without cross-fade (overlap 0) fail that bound on the same networks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from brainfm.anomaly.reconstruct import PseudoHealthyReconstructor
from brainfm.anomaly.windows import WindowedUNet, hann_weights
from brainfm.diffusion import make_scheduler
from brainfm.models import BrainVAE, Conditioner, LatentUNet

META = {"modality": "T1", "age": 61.0, "sex": "F"}
SEAM_BOUND = 1.15


@pytest.fixture(scope="module")
def volume(mni_t1_2mm) -> tuple[torch.Tensor, torch.Tensor]:
    """(image (1, 32, 40, 32), anatomy (2, 32, 40, 32)): the template's brain, mask and a grey-matter-like map."""
    from nilearn.datasets import load_mni152_brain_mask

    t1 = torch.from_numpy(np.asarray(mni_t1_2mm.get_fdata(), dtype=np.float32))
    mask = torch.from_numpy(np.asarray(load_mni152_brain_mask(resolution=2).get_fdata(), dtype=np.float32))
    t1 = (t1 / torch.quantile(t1.flatten(), 0.995)).clamp(0, 1) * mask
    grey = mask * (1.0 - (t1 - 0.55).abs() / 0.2).clamp(0, 1)
    small = F.interpolate(torch.stack([t1, mask, grey])[None], size=(32, 40, 32), mode="area")[0]
    return small[:1].contiguous(), small[1:].contiguous()


@pytest.fixture(scope="module")
def nets() -> tuple[BrainVAE, LatentUNet, Conditioner]:
    torch.manual_seed(0)
    vae = BrainVAE(spatial_dims=3, channels=(8, 16), latent_channels=2, norm_num_groups=8).eval()
    unet = LatentUNet(spatial_dims=3, latent_channels=2, anatomy_channels=2, channels=(16, 16),
                      attention_levels=(False, True), num_head_channels=8, cross_attention_dim=16,
                      norm_num_groups=8).eval()
    for module in unet.unet.out.modules():  # MONAI zero-initialises it: an untrained UNet would predict zeros
        if isinstance(module, torch.nn.Conv3d):
            torch.nn.init.normal_(module.weight, std=0.5)
    return vae, unet, Conditioner(hidden_size=16, num_heads=2, cross_attention_dim=16).eval()


def seam_ratio(difference: torch.Tensor, windows: set, scale: int, inside: torch.Tensor | None = None) -> float:
    """Mean |jump| of ``difference`` (X, Y, Z) between neighbours across an interior window face, over the mean
    jump elsewhere; ``windows`` in latent voxels, ``scale`` image voxels per latent voxel."""
    across, elsewhere = [], []
    for axis in range(3):
        n = difference.shape[axis]
        jump = (difference.narrow(axis, 1, n - 1) - difference.narrow(axis, 0, n - 1)).abs()
        keep = torch.ones_like(jump, dtype=torch.bool) if inside is None else (
            inside.narrow(axis, 1, n - 1) & inside.narrow(axis, 0, n - 1))
        face = torch.zeros_like(keep)
        for edge in {scale * e - 1 for w in windows for e in w[axis] if 0 < scale * e < n}:
            face.select(axis, edge).fill_(True)
        across.append(jump[face & keep])
        elsewhere.append(jump[~face & keep])
    return float(torch.cat(across).mean() / torch.cat(elsewhere).mean())


def test_hann_weights_cross_fade_to_a_constant() -> None:
    profile = hann_weights((8,), torch.float64)
    assert float(profile.min()) < 0.04 and float(profile.max()) > 0.96  # ~0 at the faces, ~1 at the centre
    summed = profile[4:] + profile[:4]  # two windows at 50 % overlap
    torch.testing.assert_close(summed, torch.ones(4, dtype=torch.float64), atol=1e-12, rtol=0)


def test_one_unet_call_over_windows(nets, volume) -> None:
    _, unet, conditioner = nets
    image, anatomy = volume
    torch.manual_seed(1)
    z = torch.randn(1, 2, 24, 28, 24)  # the UNet at t=300 on a latent twice the size of the windows
    anatomy = F.interpolate(anatomy[None], size=(48, 56, 48), mode="trilinear")
    context = conditioner(conditioner.tokenize([META]))
    with torch.no_grad():
        whole = unet(z, 300, anatomy, context)
        single = WindowedUNet(unet, (24, 28, 24))(z, 300, anatomy, context)  # one window = the whole latent
        windowed = WindowedUNet(unet, (12, 12, 12), overlap=0.5)
        blended = windowed(z, 300, anatomy, context)
        abutting = WindowedUNet(unet, (12, 12, 12), overlap=0.0)
        hard = abutting(z, 300, anatomy, context)
    torch.testing.assert_close(single, whole, atol=1e-5, rtol=0)
    assert len(windowed.windows) > len(abutting.windows) > 1
    assert float((blended - whole).abs().mean()) < 0.15 * float(whole.abs().mean())
    assert seam_ratio((blended - whole)[0, 0], windowed.windows, 1) < SEAM_BOUND
    assert seam_ratio((hard - whole)[0, 0], abutting.windows, 1) > SEAM_BOUND  # the measure sees real seams
    with pytest.raises(ValueError, match="multiples"):
        WindowedUNet(unet, (12, 12, 9))
    with pytest.raises(ValueError, match="3 sizes"):
        WindowedUNet(unet, (12, 12))


def _reconstruct(nets, volume, **settings) -> tuple[torch.Tensor, PseudoHealthyReconstructor]:
    vae, unet, conditioner = nets
    reconstructor = PseudoHealthyReconstructor(vae, unet, conditioner, make_scheduler("ddpm", 1000), t_star=0.4,
                                               num_inference_steps=10, **settings)
    return reconstructor.reconstruct(*volume, META)[0], reconstructor


def test_patchwise_reconstruction_matches_whole_volume(nets, volume) -> None:
    image = volume[0]
    brain = image[0] > 0
    whole, _ = _reconstruct(nets, volume)
    other_seed, _ = _reconstruct(nets, volume, seeds=(1,))
    tiled, _ = _reconstruct(nets, volume, tiled_vae=True)
    torch.testing.assert_close(tiled, whole, atol=1e-4, rtol=0)  # the tiled VAE changes nothing
    patched, reconstructor = _reconstruct(nets, volume, tiled_vae=True, latent_window=(8, 8, 8))
    assert len(reconstructor.denoiser.windows) >= 8
    seed_spread = float((other_seed - whole).abs()[0][brain].mean())
    error = float((patched - whole).abs()[0][brain].mean())
    assert 0 < error < 0.25 * seed_spread, (error, seed_spread)
    factor = nets[0].downsample_factor
    assert seam_ratio((patched - whole)[0], reconstructor.denoiser.windows, factor, brain) < SEAM_BOUND
    assert reconstructor.settings()["latent_window"] == [8, 8, 8]
