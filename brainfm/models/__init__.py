"""Networks: VAE, latent UNet, conditioner, heads. They know nothing about training loops."""

from brainfm.models.conditioning import Conditioner
from brainfm.models.losses import ResNetPerceptualLoss, VAELoss, kl_divergence
from brainfm.models.unet import LatentUNet, resize_to_grid
from brainfm.models.vae import BrainDiscriminator, BrainVAE, make_discriminator

__all__ = [
    "BrainDiscriminator",
    "BrainVAE",
    "Conditioner",
    "LatentUNet",
    "ResNetPerceptualLoss",
    "VAELoss",
    "kl_divergence",
    "make_discriminator",
    "resize_to_grid",
]
