"""Tiled (slab-wise) VAE encode/decode equals the whole-volume forward, on a template-derived volume, with slabs
one row thick so every layer really runs in many slabs with halos."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL

from brainfm.models import tiling
from brainfm.models.vae import BrainVAE

TOLERANCE = 1e-4  # float32 rounding: GroupNorm statistics merged across slabs, convolutions on slab-sized inputs


def _vae(spatial_dims: int, **kwargs) -> BrainVAE:
    torch.manual_seed(0)
    return BrainVAE(spatial_dims=spatial_dims, latent_channels=3, **kwargs).eval()


@pytest.mark.parametrize(
    ("dims", "kwargs"),
    [
        (3, {"channels": (8, 16, 16), "norm_num_groups": 8}),  # two downsamplings, a channel change
        (3, {"channels": (8, 16), "norm_num_groups": 4, "attention_levels": (False, True), "with_nonlocal_attn": True}),
        (2, {"channels": (8, 16, 32), "norm_num_groups": 8, "num_res_blocks": 2}),
    ],
    ids=["3d", "3d-attention", "2d-two-res-blocks"],
)
def test_tiled_encode_and_decode_equal_the_whole_volume(dims, kwargs, template_volumes, monkeypatch) -> None:
    vae = _vae(dims, **kwargs)
    volume = template_volumes["image"][None, None]
    if dims == 3:
        x = F.interpolate(volume, size=(24, 28, 20), mode="area")
    else:
        x = F.interpolate(volume[..., 45], size=(32, 40), mode="area")
    x = torch.cat([x, x.flip(2)])  # two samples: per-sample GroupNorm statistics
    slabs = []
    real_conv = tiling._Slabs.conv

    def counting(self, conv, source, *args, **kw):
        out = real_conv(self, conv, source, *args, **kw)
        slabs.append(-(-out.shape[self.axis] // self._rows((source.shape[0], max(conv.in_channels, conv.out_channels),
                                                             *out.shape[2:]), 1)))
        return out

    monkeypatch.setattr(tiling._Slabs, "conv", counting)
    with torch.no_grad():
        mu, sigma = vae.encode(x)
        tiled_mu, tiled_sigma = tiling.tiled_encode(vae.autoencoder, x, slab_elements=1)
        decoded = vae.decode(mu)
        tiled_decoded = tiling.tiled_decode(vae.autoencoder, mu, slab_elements=1)
    assert max(slabs) > 8  # one row per slab: the layers ran in many slabs
    torch.testing.assert_close(tiled_mu, mu, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(tiled_sigma, sigma, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(tiled_decoded, decoded, atol=TOLERANCE, rtol=0)
    assert float(decoded.abs().max()) > 100 * TOLERANCE  # the comparison is not between near-zero maps


def test_brainvae_tiled_flag_and_its_limits(template_volumes) -> None:
    vae = _vae(3, channels=(8, 16), norm_num_groups=8, scaling_factor=0.7)
    x = F.interpolate(template_volumes["image"][None, None], size=(16, 20, 16), mode="area")
    with torch.no_grad():
        z = vae.encode_latent(x, tiled=True)
        torch.testing.assert_close(z, vae.encode_latent(x), atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(vae.decode_latent(z, tiled=True), vae.decode_latent(z), atol=TOLERANCE, rtol=0)
    with pytest.raises(RuntimeError, match="inference only"):
        vae.encode(x, tiled=True)  # gradients enabled: tiling keeps no autograd graph
    transposed = AutoencoderKL(spatial_dims=3, channels=(8, 8), latent_channels=2, norm_num_groups=4,
                               num_res_blocks=(1, 1), attention_levels=(False, False),
                               use_convtranspose=True).eval()
    with pytest.raises(ValueError, match="unsupported"):
        tiling.tiled_decode(transposed, torch.zeros(1, 2, 4, 4, 4))
