"""LesionHead shapes, disease outputs and tokens; LoRA adapters on the latent UNet save and load."""

from __future__ import annotations

import pytest
import torch

from brainfm.models import LatentUNet
from brainfm.models.heads import LesionHead, UNetFeatures, add_lora, load_lora, save_lora


def test_head_outputs_per_disease_and_round_trips(brain_batch, tmp_path):
    dims, batch = brain_batch  # 2D and 3D
    image = batch["image"][:, :, :15] if dims == 2 else batch["image"][..., :15]  # odd size: padded inside
    head = LesionHead(spatial_dims=dims, channels=(4, 8), diseases=("tumour", "ms"), disease_mode="outputs")
    x = head.assemble(image, image * 0.9, torch.full_like(image, 25.0))
    assert float(x[:, 2].max()) == 1.0  # z clipped at z_clip=10 and scaled to [-1, 1]
    logits = head(x)
    assert logits.shape == (image.shape[0], 3, *image.shape[2:])
    assert head.output_channel("ms") == 2 and head.output_channel("stroke") == 0
    head.save_pretrained(tmp_path / "head", safe_serialization=True)
    again = LesionHead.from_pretrained(tmp_path / "head")
    assert torch.equal(again.eval()(x), head.eval()(x))


def test_film_token_changes_the_map_and_unknown_disease_uses_any_token(brain_2d):
    image = brain_2d["image"]
    head = LesionHead(spatial_dims=2, channels=(4, 8), diseases=("tumour",), disease_mode="film").eval()
    x = head.assemble(image, image, torch.zeros_like(image))
    tokens = head.disease_index(["tumour", "svd"])
    assert tokens.tolist() == [0, 1]  # 1 = the "any lesion" token
    any_map = head(x)
    assert torch.equal(head(x, head.disease_index([None, None])), any_map)
    assert torch.equal(head(x, tokens), any_map)  # FiLM starts as identity
    with torch.no_grad():
        head.film.weight[0].fill_(0.5)
    assert not torch.equal(head(x, tokens)[0], any_map[0])
    assert torch.equal(head(x, tokens)[1], any_map[1])


def test_scan_only_head_rejects_missing_inputs(brain_2d):
    image = brain_2d["image"]
    head = LesionHead(spatial_dims=2, channels=(4, 8), inputs=("scan",), disease_mode="none")
    assert head.assemble(image, None, None).shape[1] == 1
    full = LesionHead(spatial_dims=2, channels=(4, 8))
    with pytest.raises(ValueError, match="pseudo_healthy"):
        full.assemble(image, None, torch.zeros_like(image))
    with pytest.raises(ValueError, match="order"):
        LesionHead(inputs=("zmap", "scan"))


def _unet() -> LatentUNet:
    """MONAI zero-initialises the output convolution; re-initialised here so outputs depend on the weights."""
    torch.manual_seed(0)
    unet = LatentUNet(spatial_dims=2, latent_channels=2, anatomy_channels=3, channels=(8, 8),
                      attention_levels=(False, True), num_head_channels=8, cross_attention_dim=16, norm_num_groups=8)
    for module in unet.unet.out.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=0.5)
    return unet


def test_lora_adapters_save_and_load(brain_2d, tmp_path):
    anatomy = brain_2d["anatomy"]
    z = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(1))
    context = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([10, 500])
    base = _unet().eval()
    base_out = base(z, t, anatomy, context)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    adapted = add_lora(base, rank=2, alpha=4.0)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("attn1.to_q" in n for n in trainable) and any("conv1.conv" in n for n in trainable)
    assert torch.allclose(adapted(z, t, anatomy, context), base_out)  # LoRA B starts at zero
    with torch.no_grad():  # what training would do: move the adapters
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    adapted_out = adapted(z, t, anatomy, context)
    assert not torch.allclose(adapted_out, base_out, atol=1e-4)
    save_lora(adapted, tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").stat().st_size < 200_000  # adapters only

    reloaded = load_lora(_unet().eval(), tmp_path / "lora")
    assert torch.allclose(reloaded(z, t, anatomy, context), adapted_out, atol=1e-6)
    # the frozen base weights were never touched by adapter training
    fresh = _unet()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in base_state.items())


def test_unet_features_are_upsampled_to_the_image_grid(brain_2d):
    from brainfm.models import BrainVAE, Conditioner

    torch.manual_seed(0)
    vae = BrainVAE(spatial_dims=2, channels=(8, 16), latent_channels=2, attention_levels=(False, False),
                   norm_num_groups=8)
    conditioner = Conditioner(hidden_size=16, num_heads=2, cross_attention_dim=16)
    extractor = UNetFeatures(vae, _unet(), conditioner, timestep=5)
    meta = [{"modality": "T1", "age": 50.0}] * 2
    features = extractor(brain_2d["image"], brain_2d["anatomy"], meta, torch.tensor([0.4, 0.5]))
    assert features.shape == (2, extractor.channels, 32, 32)
    assert torch.isfinite(features).all() and float(features.std()) > 0
    assert not torch.allclose(features[0], features[1])
