"""PseudoHealthyReconstructor on a small volume cut from the real ICBM152 template, with tiny random networks.

MONAI zero-initialises the UNet's output convolution (an untrained UNet predicts zero noise for every input), so
the fixture re-initialises it: otherwise seeds, samplers and guidance could not change anything and the tests
below could not fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from brainfm.anomaly.reconstruct import PseudoHealthyReconstructor
from brainfm.config import ReconstructionConfig
from brainfm.diffusion import make_scheduler
from brainfm.models import BrainVAE, Conditioner, LatentUNet

META = {"modality": "T1", "age": 61.0, "sex": "F", "site": "siteA",
        "scalars": {"brain_volume_ml": 1200.0, "gm_fraction": 0.45, "wm_fraction": 0.35}}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny convolutions on a shared 2-core machine: one intra-op thread avoids oversubscription (about 4x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def volume(mni_t1_2mm) -> tuple[torch.Tensor, torch.Tensor]:
    """(image (1, 16, 16, 6), anatomy (3, 16, 16, 6)): axial slabs of the template with empty slabs at both ends."""
    from nilearn.datasets import load_mni152_brain_mask

    t1 = torch.from_numpy(np.asarray(mni_t1_2mm.get_fdata(), dtype=np.float32))
    mask = torch.from_numpy(np.asarray(load_mni152_brain_mask(resolution=2).get_fdata(), dtype=np.float32))
    t1 = (t1 / torch.quantile(t1.flatten(), 0.995)).clamp(0, 1) * mask
    grey = mask * (1.0 - (t1 - 0.55).abs() / 0.2).clamp(0, 1)
    stack = torch.stack([t1, mask, grey])[None]
    small = F.interpolate(stack, size=(16, 16, 8), mode="area")[0]
    small[..., 0] = 0.0  # below the brain: nothing to reconstruct
    small[..., -1] = 0.0
    small[1] = (small[1] > 0.5).float()
    return small[:1].contiguous(), small[1:].contiguous()


def _networks(spatial_dims: int) -> tuple[BrainVAE, LatentUNet, Conditioner]:
    torch.manual_seed(0)
    vae = BrainVAE(spatial_dims=spatial_dims, channels=(8, 16), latent_channels=2, attention_levels=(False, False),
                   norm_num_groups=8)
    unet = LatentUNet(spatial_dims=spatial_dims, latent_channels=2, anatomy_channels=2, channels=(16, 16),
                      attention_levels=(False, True), num_head_channels=8, cross_attention_dim=16, norm_num_groups=8)
    for module in unet.unet.out.modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.Conv3d):
            torch.nn.init.normal_(module.weight, std=0.5)
    conditioner = Conditioner(hidden_size=16, num_heads=2, cross_attention_dim=16)
    return vae.eval(), unet.eval(), conditioner.eval()


@pytest.fixture(scope="module")
def nets_2d():
    return _networks(2)


def _reconstructor(nets, **kwargs) -> PseudoHealthyReconstructor:
    vae, unet, conditioner = nets
    settings = {"t_star": 0.4, "num_inference_steps": 10, "seeds": (0,), "batch_size": 16, **kwargs}
    return PseudoHealthyReconstructor(vae, unet, conditioner, make_scheduler("ddpm", 1000), **settings)


def test_deterministic_single_member_has_zero_spread(nets_2d, volume):
    image, anatomy = volume
    first, spread = _reconstructor(nets_2d).reconstruct(image, anatomy, META)
    again, _ = _reconstructor(nets_2d).reconstruct(image, anatomy, META)
    assert first.shape == image.shape
    assert torch.equal(first, again)
    assert torch.count_nonzero(spread) == 0
    assert 0.0 <= float(first.min()) and float(first.max()) <= 1.0
    # empty end slabs are passed through untouched, brain slabs are reconstructed (not copied)
    assert torch.equal(first[..., 0], image[..., 0])
    assert not torch.allclose(first[..., 3], image[..., 3])


def test_seeds_and_noise_levels_form_an_ensemble(nets_2d, volume):
    image, anatomy = volume
    one, _ = _reconstructor(nets_2d, seeds=(0,)).reconstruct(image, anatomy, META)
    other, _ = _reconstructor(nets_2d, seeds=(1,)).reconstruct(image, anatomy, META)
    assert not torch.allclose(one, other)
    mean, spread = _reconstructor(nets_2d, seeds=(0, 1)).reconstruct(image, anatomy, META)
    stacked = torch.stack([one, other])
    assert torch.allclose(mean, stacked.mean(0), atol=1e-6)
    assert torch.allclose(spread, stacked.std(0, unbiased=False), atol=1e-6)
    assert float(spread[..., 2:6].max()) > 0
    levels = _reconstructor(nets_2d, t_star=(0.2, 0.4), seeds=(0, 1))
    assert levels.settings()["ensemble_members"] == 4
    # a higher noise level starts later on the sampler grid and runs more UNet steps
    assert levels.unet_calls(0.4) > levels.unet_calls(0.2) > 0


def test_slicewise_batching_equals_unbatched(nets_2d, volume):
    image, anatomy = volume
    whole, whole_spread = _reconstructor(nets_2d, batch_size=64, seeds=(0, 3)).reconstruct(image, anatomy, META)
    piecewise, piece_spread = _reconstructor(nets_2d, batch_size=1, seeds=(0, 3)).reconstruct(image, anatomy, META)
    torch.testing.assert_close(piecewise, whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(piece_spread, whole_spread, atol=1e-5, rtol=0)


def test_vae_only_is_the_plain_autoencoder(nets_2d, volume):
    image, anatomy = volume
    vae = nets_2d[0]
    recon, spread = PseudoHealthyReconstructor(vae, None, None, None, vae_only=True).reconstruct(image, anatomy, META)
    slices = image[..., 1:7].permute(3, 0, 1, 2)
    with torch.no_grad():
        expected = vae.decode_latent(vae.encode_latent(slices)).clamp(0, 1).permute(1, 2, 3, 0)
    torch.testing.assert_close(recon[..., 1:7], expected, atol=1e-5, rtol=0)
    assert torch.count_nonzero(spread) == 0
    ldm, _ = _reconstructor(nets_2d).reconstruct(image, anatomy, META)
    assert not torch.allclose(ldm, recon)


def test_conditioning_changes_the_reconstruction(nets_2d, volume):
    image, anatomy = volume
    base, _ = _reconstructor(nets_2d).reconstruct(image, anatomy, META)
    guided, _ = _reconstructor(nets_2d, guidance_scale=3.0).reconstruct(image, anatomy, META)
    other_anatomy, _ = _reconstructor(nets_2d).reconstruct(image, anatomy.flip(2), META)  # anterior-posterior
    dpm, _ = _reconstructor(nets_2d, sampler="dpm++").reconstruct(image, anatomy, META)
    for name, variant in (("guidance", guided), ("anatomy", other_anatomy), ("dpm++", dpm)):
        assert float((variant - base).abs().max()) > 1e-4, name


def test_guidance_zero_is_the_unconditional_path(nets_2d, volume):
    """Classifier-free guidance at scale 0 is the unconditional model: neither metadata (here the modality token of a
    pooled model) nor anatomy can change the reconstruction, while guidance on/off (scale 0, 1, 3) changes it."""
    image, anatomy = volume
    ct = {**META, "modality": "CT"}
    unconditional, _ = _reconstructor(nets_2d, guidance_scale=0.0).reconstruct(image, anatomy, META)
    for other_meta, other_anatomy in ((ct, anatomy), (META, anatomy.flip(2)), (ct, anatomy.flip(2))):
        again, _ = _reconstructor(nets_2d, guidance_scale=0.0).reconstruct(image, other_anatomy, other_meta)
        torch.testing.assert_close(again, unconditional, atol=1e-5, rtol=0)
    conditional, _ = _reconstructor(nets_2d, guidance_scale=1.0).reconstruct(image, anatomy, META)
    guided, _ = _reconstructor(nets_2d, guidance_scale=3.0).reconstruct(image, anatomy, META)
    assert float((conditional - unconditional).abs().max()) > 1e-3  # guidance off vs the conditional model
    flipped, _ = _reconstructor(nets_2d, guidance_scale=1.0).reconstruct(image, anatomy.flip(2), META)
    assert float((flipped - conditional).abs().max()) > 1e-3  # ... which does see the anatomy
    assert float((guided - conditional).abs().max()) > 1e-3


def test_3d_runs_on_the_whole_volume(volume):
    image, anatomy = volume
    nets = _networks(3)
    recon, spread = _reconstructor(nets, seeds=(0, 1)).reconstruct(image, anatomy, META)
    assert recon.shape == image.shape
    assert torch.isfinite(recon).all() and float(spread.max()) > 0


def test_rejects_bad_shapes_and_settings(nets_2d, volume):
    image, anatomy = volume
    with pytest.raises(ValueError, match="divisible"):
        _reconstructor(nets_2d).reconstruct(image[:, :15], anatomy[:, :15], META)
    with pytest.raises(ValueError, match="anatomy"):
        _reconstructor(nets_2d).reconstruct(image, None, META)
    with pytest.raises(ValueError, match="t_star"):
        ReconstructionConfig(t_star=(1.5,))
